r"""The topology, built from the config (as Broadway builds its own from a config map):

    ingress -> Producer -> work -> Processor xN -> images/<model> -> Batcher -> results -> Router
                        \-> text/<model> -> TextFeeder -> decode loop (engine thread)

Only wiring: which links exist, how big each is, which stage reads and writes which. Admission,
deadlines and metrics live in ``server/pipeline.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.engine import Engine
from engine.registry import ModelRegistry
from server.config import ServerConfig
from server.jobs import Job
from server.links import Link
from server.stages.base import ImageDone, ImageWork, Stage
from server.stages.batcher import Batcher
from server.stages.processor import Processor
from server.stages.producer import Producer
from server.stages.router import Router
from server.stages.text import TextFeeder


@dataclass
class Topology:
    ingress: Link[Job]
    work: Link[Job]
    results: Link[ImageDone]
    image_links: dict[str, Link[ImageWork]]
    text_links: dict[str, Link[Job]]
    stages: list[Stage]

    def depth_readers(self) -> dict[str, Callable[[], int]]:
        """Each link's name and a reader of its depth (for the metrics)."""
        links: list[Link[Job] | Link[ImageDone] | Link[ImageWork]] = [self.ingress, self.work, self.results]
        links += [*self.image_links.values(), *self.text_links.values()]
        return {link.name: link.__len__ for link in links}


def build_topology(
    config: ServerConfig, registry: ModelRegistry, engine: Engine, *, observe_batch: Callable[[str, int, float], None]
) -> Topology:
    c = config
    size = c.queue_size
    # The ingress holds max_inflight (plus slack for jobs that ended while queued, which the
    # producer drops): admission's limit is the number of unfinished requests, so a burst the
    # credits allowed is not refused for queue room. The links behind are bounded by queue_size.
    ingress: Link[Job] = Link("producer", c.max_inflight + size)
    work: Link[Job] = Link("processor", size)
    results: Link[ImageDone] = Link("router", size)
    image_links: dict[str, Link[ImageWork]] = {}
    text_links: dict[str, Link[Job]] = {}
    for info in registry.list_models():
        if info.image is not None:
            image_links.setdefault(info.name, Link(f"batcher-{info.name}", size))
        elif info.text is not None:
            text_links.setdefault(info.name, Link(f"text-{info.name}", size))
    stages: list[Stage] = [Producer(ingress, work, text_links)]
    stages += [Processor(i, work, image_links, max_chunk=c.batch_size) for i in range(c.processors)]
    for name, link in image_links.items():
        batcher = Batcher(
            name,
            link,
            results,
            engine,
            batch_size=c.batch_size,
            batch_timeout=c.batch_timeout_ms / 1000,
            concurrency=c.batch_concurrency,
            observe_batch=observe_batch,
        )
        stages.append(batcher)
    stages += [TextFeeder(name, link, engine, registry, max_pending=c.decode_pending) for name, link in text_links.items()]
    stages.append(Router(results))
    return Topology(ingress, work, results, image_links, text_links, stages)

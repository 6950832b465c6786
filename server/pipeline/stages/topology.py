r"""The topology, built from the config (as Broadway builds its own from a config map):

    ingress -> Producer -> work -> Processor xN -> images/<model> -> Batcher -> results -> Router
                        \-> text/<model>, steps/<model> -> Feeder -> decode loop (engine thread):
                                                        a text model's decode batch, an iterative model's step batch

Only wiring: which links exist, how big each is, which stage reads and writes which. Admission,
deadlines and metrics live in ``server/pipeline/core.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from engine import Engine, ModelRegistry, ServedModel
from server.config import ServerConfig
from server.pipeline.jobs import Job
from server.pipeline.links import Link
from server.pipeline.stages.base import ImageDone, ImageWork, Stage
from server.pipeline.stages.batcher import Batcher
from server.pipeline.stages.feeder import Feeder
from server.pipeline.stages.names import ModelStage
from server.pipeline.stages.processor import Processor
from server.pipeline.stages.producer import Producer
from server.pipeline.stages.router import Router


class Topology:
    """The links and stages; ``model_stage`` adds a model name's link and stage at run time
    (server/runtime/model_watch.py), with the same wiring as at start."""

    def __init__(
        self,
        config: ServerConfig,
        registry: ModelRegistry,
        engine: Engine,
        *,
        observe_batch: Callable[[str, int, float], None],
        inflight: Callable[[], int] | None = None,
    ) -> None:
        c = self.config = config
        self.registry = registry
        self.engine = engine
        self.observe_batch = observe_batch
        self.inflight = inflight  # the pipeline's unfinished requests: a batcher with nobody else to wait for closes at once
        size = c.queue_size
        # The ingress holds max_inflight (plus slack for jobs that ended while queued, which the
        # producer drops): admission's limit is the number of unfinished requests, so a burst the
        # credits allowed is not refused for queue room. The links behind are bounded by queue_size.
        self.ingress: Link[Job] = Link("producer", c.max_inflight + size)
        self.work: Link[Job] = Link("processor", size)
        self.results: Link[ImageDone] = Link("router", size)
        # shared with the producer and the processors (the same dicts): a link added later is routed to at once
        self.image_links: dict[str, Link[ImageWork]] = {}
        self.feeder_links: dict[str, Link[Job]] = {}
        self.batchers: dict[str, Batcher] = {}  # model name -> its batcher (admission reads its window in force)
        self.feeders: dict[str, Feeder] = {}  # model name -> its feeder (admission reads its text's wait to start)
        models = [stage for served in registry.served() if (stage := self.model_stage(served)) is not None]
        self.stages: list[Stage] = [Producer(self.ingress, self.work, self.feeder_links)]
        self.stages += [Processor(i, self.work, self.image_links, engine, max_chunk=c.batch_size) for i in range(c.processors)]
        self.stages += models
        self.stages.append(Router(self.results))

    def model_stage(self, served: ServedModel) -> Stage | None:
        """The link and stage ``served``'s model name needs (a batcher for images, a text feeder for
        text), registered in the routing dicts; None when the name has them already."""
        c, name = self.config, served.name
        if served.images is not None:
            if name in self.image_links:
                return None
            link: Link[ImageWork] = Link(ModelStage.BATCHER.stage_name(name), c.queue_size)
            self.image_links[name] = link
            batcher = self.batchers[name] = Batcher(
                name,
                link,
                self.results,
                self.engine,
                batch_size=c.batch_size,
                batch_timeout=c.batch_timeout_ms / 1000,
                concurrency=c.batch_concurrency,
                observe_batch=self.observe_batch,
                inflight=self.inflight,
            )
            return batcher
        if name in self.feeder_links:
            return None
        stage = ModelStage.of(served)  # TEXT or STEPS
        feeder_link: Link[Job] = Link(stage.stage_name(name), c.queue_size)
        self.feeder_links[name] = feeder_link
        pending = c.step_pending if stage is ModelStage.STEPS else c.decode_pending
        feeder = self.feeders[name] = Feeder(name, stage, feeder_link, self.engine, self.registry, max_pending=pending)
        return feeder

    def depth_readers(self) -> dict[str, Callable[[], int]]:
        """Each link's name and a reader of its depth (for the metrics)."""
        links: list[Link[Job] | Link[ImageDone] | Link[ImageWork]] = [self.ingress, self.work, self.results]
        links += [*self.image_links.values(), *self.feeder_links.values()]
        return {link.name: link.__len__ for link in links}

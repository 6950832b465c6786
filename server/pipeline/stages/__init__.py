"""The pipeline's stages: producer -> processors -> batchers (images) / text feeders -> router.

Each stage is a long-running task that takes work from its input link only by asking for it
(``Link.take(demand)``) and hands it on through a bounded link, so a slow stage holds back the
ones before it, and in the end the ingress, which then refuses new requests (RESOURCE_EXHAUSTED).

User-level errors (a bad request) become the job's status; they never raise out of a stage. A
stage that does fail (a bug, an injected fault, a cancelled task) is restarted by the supervisor,
which first fails the jobs in ``holding()`` with UNAVAILABLE: nothing a stage held is lost.

One stage per module; ``topology.py`` builds the links and stages from the config (and nothing else).
"""

from server.pipeline.stages.base import ImageDone, ImageWork, Stage
from server.pipeline.stages.batcher import Batcher
from server.pipeline.stages.feeder import Feeder
from server.pipeline.stages.processor import Processor
from server.pipeline.stages.producer import Producer
from server.pipeline.stages.router import Router

__all__ = ["Batcher", "Feeder", "ImageDone", "ImageWork", "Processor", "Producer", "Router", "Stage"]

"""An iterative model served end to end (the test's drift kind, tests/engine/drift_kind.py): the
feeder hands its requests to the engine's step batch, like a text model's; the SDK and the CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import Client, InvalidRequest, Unavailable
from engine import ServedModel
from engine.faults import Faults
from server.runtime.app import GenServer
from server.runtime.front import free_port
from tests.engine.drift_kind import drift_file
from tests.paths import ROOT
from tests.server.http_edge.test_http import call, post
from tests.serving import ServerThread

pytestmark = pytest.mark.timeout(120)


def test_an_iterative_model_is_served_end_to_end_with_previews_refusals_and_invariance(tmp_path: Path) -> None:
    """A server with an iterative model (the test's drift kind): ListModels says its steps, Generate
    and the SDK's stream_images give the samples (previews first), a request is bit for bit the same
    beside many others, one-shot fields are checked by name, text params are refused."""
    models = tmp_path / "models"
    models.mkdir()
    drift_file(models / "drift.safetensors")
    shutil.copy(ROOT / "models" / "vae.safetensors", models / "vae.safetensors")
    with ServerThread(models_dir=str(models), step_rows=16) as server, Client(server.address, timeout=30) as client:
        spec = {m.name: m for m in client.list_models()}["drift"].image
        assert spec is not None and (spec.steps_min, spec.steps_max, spec.steps_default, spec.max_n) == (1, 64, 8, 16)
        assert spec.guidance_default == pytest.approx(2.0)
        alone = client.generate_images("drift", 3, seed=5, steps=6, labels=[0, 1, 2])
        steps = list(client.stream_images("drift", 3, seed=5, steps=6, labels=[0, 1, 2], preview_every=2))
        assert [(s.step, s.final) for s in steps] == [(2, False), (4, False), (6, True)]
        np.testing.assert_array_equal(steps[-1].images, alone)
        with client.session() as session:
            futures = [session.submit_images("drift", 1 + i % 4, seed=i, steps=1 + i % 9) for i in range(40)]
            futures.append(session.submit_images("drift", 3, seed=5, steps=6, labels=[0, 1, 2]))
            results = [f.result(timeout=60) for f in futures]
        np.testing.assert_array_equal(results[-1].images, alone)
        with pytest.raises(InvalidRequest, match=re.escape("steps must be an integer from 1 to 64 (default 8), got 65")):
            client.generate_images("drift", 1, steps=65)
        with pytest.raises(InvalidRequest, match="steps is not accepted: model 'vae' is a one-shot vae model"):
            client.generate_images("vae", 1, steps=4)
        with pytest.raises(InvalidRequest, match="n must be an integer from 1 to 16"):
            client.generate_images("drift", 17)
        with pytest.raises(InvalidRequest, match="send image params, not text"):
            client.generate_text("drift", "hi")
        assert client.generate_images("vae", 2, seed=1).shape == (2, 28, 28)  # old requests, unchanged
        assert server.server is not None
        metrics = server.server.metrics.registry
        assert (metrics.get_sample_value("genserve_model_steps_total", {"model": "drift"}) or 0) >= 6  # at least one request's steps
        assert metrics.get_sample_value("genserve_step_active_requests", {"model": "drift"}) == 0
        assert (metrics.get_sample_value("genserve_samples_total", {"model": "drift"}) or 0) >= 3 + 3 + 3
        assert metrics.get_sample_value("genserve_queue_depth", {"stage": "steps-drift"}) == 0


class _MidStep(Faults):
    """At the fifth step of the iterative model's batch after ``arm``: kill its feeder stage (waiting
    on the decode thread until the stage has been cancelled), or fail the step (the engine's fault seam)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app: GenServer) -> None:
        self.loop, self.app = loop, app
        self.plan: str | None = None
        self.steps = 0
        self.done = threading.Event()

    def arm(self, plan: str) -> None:
        self.steps, self.plan = 0, plan
        self.done.clear()

    def before_decode_step(self, served: ServedModel) -> None:
        if self.plan is None or served.name != "drift":
            return
        self.steps += 1
        if self.steps < 5:
            return
        plan, self.plan = self.plan, None
        self.done.set()
        if plan == "kill":
            killed = asyncio.run_coroutine_threadsafe(self._kill(), self.loop)
            killed.result(timeout=10)
        else:
            raise RuntimeError("injected step failure")

    async def _kill(self) -> None:
        self.app.supervisor.kill("steps-drift")
        await asyncio.sleep(0.05)  # the stage is cancelled (and restarted) while this step waits


def test_a_killed_feeder_and_a_failed_step_lose_no_request(tmp_path: Path) -> None:
    """Chaos on the iterative path, mid-step: the steps feeder killed (its requests finish: routing
    lives in the feeder object), then a step that fails (its requests hear UNAVAILABLE, retryable);
    every request gets one answer, and the model serves again afterwards."""
    models = tmp_path / "models"
    models.mkdir()
    drift_file(models / "drift.safetensors")
    with ServerThread(models_dir=str(models), step_rows=64) as server, Client(server.address, timeout=60, retry=None) as client:
        assert server.server is not None and server._loop is not None
        faults = _MidStep(server._loop, server.server)
        server.server.engine.install_faults(faults)
        for plan in ("kill", "fail"):
            faults.arm(plan)
            with client.session(collect=False) as session:
                futures = [session.submit_images("drift", 1 + i % 3, seed=i, steps=60) for i in range(24)]
                outcomes = []
                for f in futures:
                    try:
                        f.result(timeout=60)
                        outcomes.append("ok")
                    except Unavailable:
                        outcomes.append("unavailable")
            assert faults.done.is_set() and len(outcomes) == 24  # it struck mid-steps; one answer each
            if plan == "kill":
                assert set(outcomes) == {"ok"}, outcomes
            else:
                assert "unavailable" in outcomes, outcomes
        assert client.generate_images("drift", 2, seed=1, steps=3).shape == (2, 4, 4)


def test_the_http_edge_serves_an_iterative_model_with_its_steps(tmp_path: Path) -> None:
    """/v1/images/generations takes steps and guidance for an iterative model: the same pixels as gRPC."""
    models = tmp_path / "models"
    models.mkdir()
    drift_file(models / "drift.safetensors")
    port = free_port()
    with ServerThread(models_dir=str(models), http_port=port) as server, Client(server.address, timeout=30) as client:
        status, body, _ = post(
            port, "/v1/images/generations", {"model": "drift", "n": 2, "seed": 4, "steps": 5, "guidance": 1.5, "labels": 1}
        )
        assert status == 200, body
        pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in body["data"]]
        np.testing.assert_array_equal(np.stack(pixels), client.generate_images("drift", 2, seed=4, steps=5, guidance=1.5, labels=1))
        status, body, _ = post(port, "/v1/images/generations", {"model": "drift", "steps": 100})
        assert status == 400 and body["error"]["param"] == "steps" and "from 1 to 64" in body["error"]["message"]
        status, body, _ = call(port, "GET", "/v1/models")
        (drift,) = body["data"]
        assert drift["accepts"]["images"]["steps"] == {"min": 1, "max": 64, "default": 8}


def test_a_new_version_of_an_iterative_model_loads_while_serving(tmp_path: Path) -> None:
    """Live reload: drift@2 dropped into the folder is served beside version 1, each on its own step batch."""
    models = tmp_path / "models"
    models.mkdir()
    drift_file(models / "drift.safetensors")
    with (
        ServerThread(models_dir=str(models), models_poll_s=0.2, models_settle_s=0.2) as server,
        Client(server.address, timeout=30) as client,
    ):
        one = client.generate_images("drift", 2, seed=3, steps=4)
        drift_file(tmp_path / "v2.safetensors", seed=1)
        shutil.move(tmp_path / "v2.safetensors", models / "drift@2.safetensors")  # a rename: never half-written
        deadline = time.monotonic() + 30
        while sorted(m.version for m in client.list_models()) != [1, 2]:
            assert time.monotonic() < deadline, "drift@2 was not loaded"
            time.sleep(0.1)
        two = client.generate_images("drift", 2, seed=3, steps=4)  # the latest
        assert not np.array_equal(one, two)
        np.testing.assert_array_equal(client.generate_images("drift", 2, seed=3, steps=4, version=1), one)

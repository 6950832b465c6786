"""An iterative model served end to end (the test's drift kind, tests/engine/drift_kind.py): the
feeder hands its requests to the engine's step batch, like a text model's; the SDK and the CLI."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from clients import Client, InvalidRequest
from tests.engine.drift_kind import drift_file
from tests.paths import ROOT
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
        with pytest.raises(InvalidRequest, match="one-shot vae model: steps is not accepted"):
            client.generate_images("vae", 1, steps=4)
        with pytest.raises(InvalidRequest, match="n must be an integer from 1 to 16"):
            client.generate_images("drift", 17)
        with pytest.raises(InvalidRequest, match="send image params, not text"):
            client.generate_text("drift", "hi")
        assert client.generate_images("vae", 2, seed=1).shape == (2, 28, 28)  # old requests, unchanged

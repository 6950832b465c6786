"""Device choice (engine/device.py): what 'auto', 'cpu' and 'cuda:N' resolve to or why not, and the
thread pools set, logged, or kept when torch will not change them."""

from __future__ import annotations

import pytest
import structlog
import torch

from engine.device import choose_device, configure_threads, resolve_device
from engine.errors import DeviceUnavailableError


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(
        DeviceUnavailableError, match=r"^device 'cuda' was asked for, but CUDA is not available \(.+\); use 'auto' or 'cpu'$"
    ):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0) and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(
        DeviceUnavailableError, match=r"^device 'cuda:2' was asked for, but only 2 GPU\(s\) are visible \(cuda:0..cuda:1\)$"
    ):
        resolve_device("cuda:2")
    for bad in ("gpu", "cpu:0", "auto:1", "cuda:-1", "mps", ""):
        with pytest.raises(ValueError, match=r"^device "):
            resolve_device(bad)


def test_choose_device_sets_threads_and_logs() -> None:
    before = torch.get_num_threads(), torch.get_num_interop_threads()
    try:
        with structlog.testing.capture_logs() as logs:
            choice = choose_device("cpu", threads=2, interop_threads=before[1])
        assert (choice.device, choice.name, choice.threads, choice.interop_threads, choice.is_cuda) == (
            torch.device("cpu"),
            "cpu",
            2,
            before[1],
            False,
        )
        assert torch.get_num_threads() == 2
        (event,) = [e for e in logs if e["event"] == "device_chosen"]
        assert (event["device"], event["threads"], event["requested"]) == ("cpu", 2, "cpu")
        with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
            configure_threads(0)
        with pytest.raises(ValueError, match="interop_threads must be >= 1, got 0"):
            configure_threads(None, 0)
    finally:
        torch.set_num_threads(before[0])


def test_an_interop_pool_that_cannot_change_is_kept_and_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch refuses a new inter-op pool once parallel work has run: kept, and logged, rather than failing start-up."""
    kept = torch.get_num_interop_threads()
    asked: list[int] = []

    def refuse(n: int) -> None:
        asked.append(n)
        raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    with structlog.testing.capture_logs() as logs:
        assert configure_threads(None, kept + 1) == (torch.get_num_threads(), kept)
    assert asked == [kept + 1]
    assert [(e["event"], e["asked"], e["kept"]) for e in logs] == [("interop_threads_unchanged", kept + 1, kept)]
    with structlog.testing.capture_logs() as logs:
        configure_threads(None, kept)  # already the size asked for: torch is not even asked
    assert asked == [kept + 1] and logs == []

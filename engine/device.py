"""Where model code runs: the device (CPU or a CUDA GPU) and the CPU thread settings.

``choose_device("auto")`` takes the GPU when torch sees one, else the CPU; ``"cpu"`` and ``"cuda"``
(or ``"cuda:N"``) force one, and asking for a GPU that is not there is an error rather than a
silent fall-back: an operator who asked for a GPU wants to know. The choice is logged once and
returned as a ``DeviceChoice`` so the server can show it (health, metrics, ``--help`` defaults).

Threads: ``threads`` is torch's intra-op pool (one matrix product split across cores);
``interop_threads`` its inter-op pool. torch lets the inter-op pool be sized only before any
parallel work has run, so a late change is logged and the size in force is reported instead of
failing start-up over a tuning knob.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.errors import DeviceUnavailableError
from engine.logs import get_logger

log = get_logger("engine.device")


_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d{1,3}))?$")


@dataclass(frozen=True)
class DeviceChoice:
    """The device model code runs on and the CPU thread pools in force."""

    requested: str  # what the operator asked for: auto, cpu, cuda, cuda:N
    device: torch.device
    name: str  # "cpu" or the GPU's marketing name
    threads: int  # torch.get_num_threads() after the choice
    interop_threads: int  # torch.get_num_interop_threads() after the choice
    cuda_available: bool

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(spec: str) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch.device that exists here."""
    m = _SPEC.match(spec.strip().lower()) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r:.40}")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        if index is not None:
            raise ValueError(f"device 'auto' takes no index, got {spec!r}")
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        if index is not None:
            raise ValueError(f"device 'cpu' takes no index, got {spec!r}")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
        raise DeviceUnavailableError(f"device {spec!r} was asked for, but CUDA is not available ({build}); use 'auto' or 'cpu'")
    count = torch.cuda.device_count()
    i = int(index) if index is not None else 0
    if i >= count:
        raise DeviceUnavailableError(f"device {spec!r} was asked for, but only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", i)


def configure_threads(threads: int | None = None, interop_threads: int | None = None) -> tuple[int, int]:
    """Set torch's CPU thread pools (None keeps torch's default); return the sizes in force."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if interop_threads is not None:
        if interop_threads < 1:
            raise ValueError(f"interop_threads must be >= 1, got {interop_threads}")
        if interop_threads != torch.get_num_interop_threads():
            try:
                torch.set_num_interop_threads(interop_threads)
            except RuntimeError as e:  # only allowed before the first parallel work of the process
                log.warning("interop_threads_unchanged", asked=interop_threads, kept=torch.get_num_interop_threads(), reason=str(e))
    return torch.get_num_threads(), torch.get_num_interop_threads()


def choose_device(spec: str = "auto", threads: int | None = None, interop_threads: int | None = None) -> DeviceChoice:
    """Pick the device and thread pools, log the choice once, and describe it."""
    device = resolve_device(spec)
    n_threads, n_interop = configure_threads(threads, interop_threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    choice = DeviceChoice(
        requested=spec,
        device=device,
        name=name,
        threads=n_threads,
        interop_threads=n_interop,
        cuda_available=torch.cuda.is_available(),
    )
    log.info(
        "device_chosen",
        requested=spec,
        device=str(device),
        name=name,
        threads=n_threads,
        interop_threads=n_interop,
        cuda_available=choice.cuda_available,
        torch=torch.__version__,
    )
    return choice

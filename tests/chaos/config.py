"""What a chaos run does (ChaosConfig) and the names its books use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

OK = "OK"
CLIENT_CANCELLED = "CLIENT_CANCELLED"  # the client gave up on it (disconnect, cancelled call): its own terminal outcome
DECODE_LOOP = "decode-loop"
Probe = Literal["", "deadline", "cancel"]
Rpc = Literal["Generate", "GenerateStream"]
Kind = Literal["image", "text"]


@dataclass
class ChaosConfig:
    duration_s: float = 60.0  # load and injection time
    seed: int = 0
    models_dir: str = "models"
    threads: int = 1  # torch intra-op threads of the server
    fault_interval_s: tuple[float, float] = (0.1, 0.4)  # between two faults of the rotation
    forward_error_p: float = 0.3  # per fault tick: arm one failing forward pass of a random image model
    stall_p: float = 0.1  # per fault tick: arm one stalled batch of a random image model (one at a time per model)
    max_stall_s: float = 5.0
    plain_image_clients: int = 3
    plain_text_clients: int = 2
    sessions: int = 3
    session_window: int = 24  # requests one session keeps in flight
    session_requests: tuple[int, int] = (50, 300)  # requests per stream before it is closed and a new one opened
    session_cancel_p: float = 0.02  # per message: also cancel one in-flight request by id
    deadline_probes: int = 1
    disconnectors: int = 1
    image_timeout_s: dict[str, float] = field(default_factory=lambda: {"vae": 2.0, "gan": 4.0, "flow": 8.0})
    text_timeout_s: float = 8.0
    late_tolerance_s: float = 0.25  # an outcome this long past the deadline is late
    safety_s: float = 5.0  # past its deadline, a request with no outcome is given up on (lost)
    min_untouched_success: float = 0.99
    # the server's process RSS (the load runs in a process of its own), against its RSS after warm-up:
    memory_peak_mb: float = 150.0  # the peak during the run may be this much above
    memory_end_mb: float = 50.0  # ... and the end, once drained, BEFORE any gc.collect(): big buffers must not wait for the collector
    drain_timeout_s: float = 10.0
    server: dict[str, Any] = field(default_factory=dict)  # more ServerConfig overrides

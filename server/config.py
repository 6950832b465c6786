"""Server settings: one dataclass, filled from defaults, then GENSERVE_* environment variables, then flags.

Every field is a command-line flag (`--batch-size`) and an environment variable
(`GENSERVE_BATCH_SIZE`); a flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from engine import DECODE_PRECISIONS, EngineLimits, ImageLimits  # no torch: engine/limits.py

ENGINE = EngineLimits()  # the engine's defaults are the server's
IMAGES = ImageLimits()

ENV_PREFIX = "GENSERVE_"
SECRET_FIELDS = ("amqp_url",)  # may hold a password: --help never shows its value
MAX_PORT = 65535
PORT_FIELDS = ("port", "metrics_port", "http_port")
TOKENS_ENV = "GENSERVE_TOKENS"  # comma-separated bearer tokens; read by server/grpc_edge/auth.py, never a config field


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 or [::] for every interface)"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one and logs it)"})
    models_dir: str = field(default="models", metadata={"help": "folder of *.safetensors models to serve"})
    kinds: str = field(
        default="",
        metadata={"help": "more model kinds: comma-separated Python modules or .py files that define them (docs/kinds.md)"},
    )
    models_poll_s: float = field(
        default=2.0, metadata={"help": "seconds between scans of the models folder for new, changed and removed files (0: only on SIGHUP)"}
    )
    models_settle_s: float = field(
        default=1.0, metadata={"help": "a new or changed model file loads once it has not been written for this long"}
    )
    device: str = field(default="auto", metadata={"help": "auto (GPU when there is one), cpu, cuda or cuda:N"})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads (0: all usable cores but one, for the event loop)"})
    image_threads: int = field(default=ENGINE.image_threads, metadata={"help": "engine threads running image batches"})
    switch_interval_ms: float = field(
        default=0.1,
        metadata={
            "help": "the longest a thread holding Python's GIL keeps it from one waiting for it, e.g. a decode thread "
            "back from its forward pass (Python's default: 5)"
        },
    )
    inline_batch_ms: float = field(
        default=ENGINE.inline_image_ms,
        metadata={"help": "image models whose full batch takes less run on the event loop thread, not the pool (0: never)"},
    )
    processors: int = field(default=2, metadata={"help": "processor stages preparing inputs (concurrency)"})
    batch_size: int = field(default=128, metadata={"help": "samples per image batch: a batch closes when full"})
    batch_timeout_ms: float = field(default=2.0, metadata={"help": "... or this long after its first request"})
    batch_concurrency: int = field(default=2, metadata={"help": "batches in flight per model (one runs while the next fills)"})
    decode_batch: int = field(default=ENGINE.decode_batch, metadata={"help": "text sequences decoded together per model"})
    decode_pending: int = field(default=ENGINE.decode_pending, metadata={"help": "text sequences waiting for a decode slot per model"})
    text_wait_ms: float = field(
        default=1000.0,
        metadata={
            "help": "refuse a text request (RESOURCE_EXHAUSTED, with a retry hint) while its model's oldest waiting one "
            "has waited this long for its first token (0: never)"
        },
    )
    decode_precision: str = field(
        default=ENGINE.decode_precision,
        metadata={
            "help": "text models' linear layers: float32, or int8 (about 1.3x the tokens a second; the cost in "
            "validation nats/char: docs/design/decode-loop.md)",
            "choices": DECODE_PRECISIONS,
        },
    )
    step_rows: int = field(
        default=IMAGES.step_rows,
        metadata={"help": "samples an iterative model (flow) advances together; a request's n is at most this"},
    )
    step_pending: int = field(
        default=ENGINE.step_pending, metadata={"help": "requests waiting for room in an iterative model's step batch"}
    )
    step_batching: str = field(
        default=ENGINE.step_batching,
        metadata={
            "help": "iterative models: step (requests join and leave between steps) "
            "or request (a batch runs all its steps, the next waits)",
            "choices": ("step", "request"),  # engine/limits.py STEP_BATCHING
        },
    )
    max_new_tokens: int = field(default=ENGINE.max_new_tokens, metadata={"help": "cap on the tokens one text request may ask for"})
    default_new_tokens: int = field(
        default=ENGINE.default_new_tokens, metadata={"help": "tokens a text request that sets none gets (at most --max-new-tokens)"}
    )
    max_n: int = field(default=IMAGES.max_n, metadata={"help": "samples one image request may ask for"})
    max_inflight: int = field(default=8192, metadata={"help": "accepted requests not yet finished; beyond it RESOURCE_EXHAUSTED"})
    admission_target_ms: float = field(
        default=5.0, metadata={"help": "queueing delay a request may meet; held over it for an interval, new requests are refused"}
    )
    admission_interval_ms: float = field(default=100.0, metadata={"help": "... this long (CoDel's interval; also the retry hint)"})
    max_pending_calls: int = field(
        default=8192,
        metadata={"help": "calls grpc core may hold before the server takes them; beyond it (to twice it) core drops them, CANCELLED"},
    )
    accept_ahead: int = field(
        default=256,
        metadata={"help": "most calls the server asks grpc core for ahead of need, per method (1: grpc.aio's own one at a time)"},
    )
    max_streams_per_connection: int = field(
        default=0, metadata={"help": "HTTP/2 streams (calls) one connection may have open; clients wait for one beyond it (0: no limit)"}
    )
    front_limit: int = field(
        default=0,
        metadata={
            "help": "put a HAProxy front on --port that lets at most this many Generate calls in progress into the server, "
            "queues a few more and refuses the rest itself (RESOURCE_EXHAUSTED, refused in C: goodput holds under a flood; "
            "0: no front)"
        },
    )
    front_queue: int = field(
        default=-1,
        metadata={
            "help": "Generate calls that may wait in the front for a slot (they go in together as calls end, and batch); "
            "a call that finds this many waiting is refused (-1: half of --front-limit; 0: no queue)"
        },
    )
    front_haproxy: str = field(default="haproxy", metadata={"help": "the haproxy program of --front-limit (a name on PATH or a path)"})
    queue_size: int = field(default=1024, metadata={"help": "capacity of each link between stages"})
    stream_credits: int = field(default=512, metadata={"help": "requests one GenerateStream may have in flight (its credit)"})
    stream_interval: int = field(
        default=1,
        metadata={
            "help": "text tokens per Generate message after the first (1: each token as it comes; more: fewer, bigger messages and "
            "more tokens/s under load)"
        },
    )
    request_timeout_s: float = field(default=30.0, metadata={"help": "deadline of a request that brings none"})
    restart_intensity: int = field(default=3, metadata={"help": "stage restarts allowed within the restart period ..."})
    restart_period_s: float = field(default=5.0, metadata={"help": "... past which the server drains and exits non-zero"})
    grace_s: float = field(default=10.0, metadata={"help": "on SIGTERM/SIGINT, time for in-flight work to finish"})
    log_format: str = field(default="console", metadata={"help": "console or json", "choices": ("console", "json")})
    log_level: str = field(
        default="info", metadata={"help": "debug, info, warning or error", "choices": ("debug", "info", "warning", "error")}
    )
    http_port: int = field(
        default=8000,
        metadata={
            "help": "OpenAI-compatible HTTP port: /v1/models, /v1/completions, /v1/chat/completions, /v1/images/generations (0: off)"
        },
    )
    metrics_port: int = field(default=9464, metadata={"help": "Prometheus /metrics port (0: off)"})
    metrics_host: str = field(default="", metadata={"help": "address of /metrics (empty: --host)"})
    max_message_mb: int = field(default=16, metadata={"help": "largest gRPC message accepted or sent, in MiB"})
    # Security (server/grpc_edge/auth.py). Paths only: no secret is ever a field, so none shows in --help or in a log.
    tls_cert: str = field(default="", metadata={"help": "PEM certificate chain: serve TLS (with --tls-key; empty: plaintext)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str = field(
        default="", metadata={"help": "PEM CA certificates: require clients to present a certificate they signed (mutual TLS)"}
    )
    token_file: str = field(
        default="",
        metadata={
            "help": f"file of bearer tokens, one a line (# comments); with it or {TOKENS_ENV} every call needs "
            "'authorization: Bearer <token>'"
        },
    )
    public_health: bool = field(default=True, metadata={"help": "health checks and reflection need no token (--no-public-health: they do)"})
    # Scale-out (server/runtime/workers.py, server/amqp_ingress.py).
    workers: int = field(default=1, metadata={"help": "server processes sharing the port (SO_REUSEPORT); 0: one per usable core"})
    amqp_url: str = field(
        default="",
        metadata={
            "help": "also take requests from RabbitMQ, e.g. amqp://user:pass@host:5672/ (empty: off); "
            "prefer the environment variable, which no process list shows"
        },
    )
    amqp_queue: str = field(
        default="genserve.requests", metadata={"help": "queue of requests with --amqp-url (dead letters go to <queue>.dead)"}
    )

    # Set by the front for the server behind it (server/runtime/front.py), never by a flag or the environment.
    front_address: str = field(default="", metadata={"help": "the front's public address", "internal": True})
    front_tls: bool = field(default=False, metadata={"help": "the front terminates TLS", "internal": True})
    # The HTTP edge is not behind the front: it keeps the public host and TLS files the front took over for gRPC.
    http_host: str = field(default="", metadata={"help": "the HTTP edge's host (empty: --host)", "internal": True})
    http_tls_cert: str = field(default="", metadata={"help": "the HTTP edge's certificate (empty: --tls-cert)", "internal": True})
    http_tls_key: str = field(default="", metadata={"help": "the HTTP edge's key (empty: --tls-key)", "internal": True})
    http_tls_client_ca: str = field(default="", metadata={"help": "the HTTP edge's client CA (empty: --tls-client-ca)", "internal": True})

    def __post_init__(self) -> None:
        positive = [
            "image_threads",
            "processors",
            "batch_size",
            "batch_concurrency",
            "decode_batch",
            "decode_pending",
            "step_rows",
            "step_pending",
        ]
        positive += ["max_pending_calls", "accept_ahead"]
        positive += [
            "max_new_tokens",
            "default_new_tokens",
            "max_n",
            "max_inflight",
            "queue_size",
            "stream_credits",
            "stream_interval",
            "restart_intensity",
        ]
        positive += ["max_message_mb"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        positive_times = ["batch_timeout_ms", "request_timeout_s", "restart_period_s", "grace_s"]
        positive_times += ["admission_target_ms", "admission_interval_ms", "switch_interval_ms"]
        for name in positive_times:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        never_negative = ["threads", "inline_batch_ms", "workers", "max_streams_per_connection", "front_limit"]
        never_negative += ["models_poll_s", "models_settle_s", "text_wait_ms"]
        for name in never_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for f in fields(self):  # a flag's choices are argparse's to check; the environment's are checked here
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in PORT_FIELDS:
            if not 0 <= getattr(self, name) <= MAX_PORT:  # a bigger number wrapped: --port 70000 served on 4464
                raise ValueError(f"{name} must be a port number in 0-{MAX_PORT}, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{given}={getattr(self, given)} needs {missing} too: TLS takes a certificate chain and its key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"tls_client_ca={self.tls_client_ca} needs tls_cert and tls_key: mutual TLS is TLS first")
        if self.front_queue < -1:
            raise ValueError(f"front_queue must be >= 0 (or -1: half of front_limit), got {self.front_queue}")
        if self.amqp_url and not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ValueError("amqp_url must start with amqp:// or amqps://")  # not echoed: it may hold a password
        if self.amqp_url and not self.amqp_queue:
            raise ValueError("amqp_queue is empty: name the queue of requests")

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(
            image_threads=self.image_threads,
            decode_batch=self.decode_batch,
            decode_pending=self.decode_pending,
            inline_image_ms=self.inline_batch_ms,
            max_new_tokens=self.max_new_tokens,
            default_new_tokens=self.default_new_tokens,
            step_pending=self.step_pending,
            step_batching=self.step_batching,
            decode_precision=self.decode_precision,
        )

    def image_limits(self) -> ImageLimits:
        """A request's limits for image models: up to ``max_n`` samples, in batches of ``batch_size`` (bigger requests are split)."""
        return ImageLimits(max_n=self.max_n, max_batch=self.batch_size, step_rows=self.step_rows)

    @property
    def front_queue_calls(self) -> int:
        """--front-queue, with -1 resolved: half the limit (why: docs/design/haproxy-front.md)."""
        return self.front_limit // 2 if self.front_queue < 0 else self.front_queue

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.host

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _convert(kind: Any, raw: str, name: str) -> Any:
    if kind is bool:  # bool("false") is True
        if raw.lower() not in _BOOLS:
            raise ValueError(f"{env_name(name)}={raw!r} is not a valid bool (true/false, yes/no, on/off, 1/0)")
        return _BOOLS[raw.lower()]
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_name(name)}={raw!r} is not a valid {kind.__name__}") from None


def from_env(environ: Mapping[str, str] | None = None, base: ServerConfig | None = None) -> ServerConfig:
    """Defaults (or base) overridden by GENSERVE_* variables."""
    environ = os.environ if environ is None else environ
    base = base or ServerConfig()
    updates = {}
    for f in fields(ServerConfig):
        if f.metadata.get("internal"):
            continue
        raw = environ.get(env_name(f.name))
        if raw is not None and raw != "":
            updates[f.name] = _convert(type(getattr(base, f.name)), raw, f.name)
    return replace(base, **updates)


def build_parser(base: ServerConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve the models of a folder over gRPC (genserve.v1.Generator, health, reflection).",
        epilog="Every option is also read from an environment variable, GENSERVE_<OPTION> (e.g. GENSERVE_BATCH_SIZE=64); "
        "a flag wins over the environment. Bearer tokens come from --token-file and from "
        f"{TOKENS_ENV}=<token>,<token> (no flag, so that no token shows in a process list).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(ServerConfig):
        if f.metadata.get("internal"):
            continue
        assert f.default is not MISSING
        value = getattr(base, f.name)
        kwargs: dict[str, Any] = {"default": value, "type": type(value), "help": f"{f.metadata['help']} [{env_name(f.name)}]"}
        if isinstance(value, bool):  # --flag / --no-flag
            del kwargs["type"]
            kwargs["action"] = argparse.BooleanOptionalAction
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.name in SECRET_FIELDS:  # "%(default).0s" prints nothing and stops argparse appending the default
            kwargs["help"] += " (default: " + ("set, not shown" if value else "empty") + ")%(default).0s"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags over environment over defaults; a bad value exits with argparse's usage message."""
    try:
        base = from_env(environ)
    except ValueError as e:
        raise SystemExit(f"python -m server: error: {name_the_flag(str(e))}") from None
    parser = build_parser(base)
    args = parser.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        parser.error(name_the_flag(str(e)))


def name_the_flag(message: str) -> str:
    """A setting's error as the command line says it: "port must be ..." -> "--port (GENSERVE_PORT) must be ..."."""
    name, space, rest = message.partition(" ")
    if space and name in {f.name for f in fields(ServerConfig)}:
        return f"--{name.replace('_', '-')} ({env_name(name)}) {rest}"
    return message

"""One gRPC channel for one or several servers: round robin, retries, TLS.

Why one channel and gRPC's own machinery rather than our own loops:

- Load balancing: several ``host:port`` targets become one ``ipv4:a:p,b:q`` (or ``ipv6:``)
  target under the ``round_robin`` policy. gRPC then keeps a connection to each server, sends
  each call to the next *ready* one, and skips a server that is down until it comes back.
  Host names among several targets are resolved once, when the client opens (a single
  target is left to gRPC's DNS resolver, which round-robins over all its addresses).
- Retries: the service config's ``retryPolicy`` retries UNAVAILABLE and RESOURCE_EXHAUSTED
  with exponential back-off and full jitter (a random wait in ``[0, backoff)``), within the
  call's deadline, and only until the call has received its first response: a streamed
  ``Generate`` is never replayed after a chunk arrived. gRPC sends a retried call to the
  next server of the round robin. gRPC caps ``max_attempts`` at 5. A refusal for overload
  carries ``grpc-retry-pushback-ms`` in its trailing metadata, and gRPC waits that long instead
  of its own back-off before the next attempt (gRFC A6).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from clients._exceptions import RETRYABLE_CODES
from genserve.v1 import generator_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0  # seconds: each call's deadline, unless the caller gives one (the server's own default is the same)
DEFAULT_PORT = 50051
SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "genserve.v1.Generator", as generated
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's own limit (16 MiB by default) is the one that binds


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How failed calls are retried: UNAVAILABLE and RESOURCE_EXHAUSTED only, within the deadline.

    The n-th retry waits a random time in ``[0, min(initial_backoff * backoff_multiplier**(n-1), max_backoff))``.
    """

    max_attempts: int = 3  # the first try included; 1 turns retries off; gRPC allows at most 5
    initial_backoff: float = 0.1  # seconds
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be from 1 to 5 (gRPC's cap), got {self.max_attempts}")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(f"need 0 < initial_backoff <= max_backoff, got {self.initial_backoff} and {self.max_backoff}")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be >= 1, got {self.backoff_multiplier}")

    def backoff(self, retry: int) -> float:
        """The longest wait before the ``retry``-th retry (1-based); the wait itself is drawn below it."""
        return min(self.initial_backoff * self.backoff_multiplier ** (retry - 1), self.max_backoff)


def service_config(retry: RetryPolicy | None) -> str:
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry is not None and retry.max_attempts > 1:
        policy = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": f"{retry.initial_backoff:.3f}s",
            "maxBackoff": f"{retry.max_backoff:.3f}s",
            "backoffMultiplier": retry.backoff_multiplier,
            "retryableStatusCodes": [code.name for code in RETRYABLE_CODES],
        }
        config["methodConfig"] = [{"name": [{"service": SERVICE}], "retryPolicy": policy}]
    return json.dumps(config)


def split_host_port(target: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare host (port 50051)."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest.removeprefix(":")
    elif target.count(":") == 1:
        host, port = target.split(":")
    elif ":" in target:  # a bare IPv6 address, or no host:port at all
        host, port = target, ""
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not a host:port target: {target!r}") from None
    else:
        host, port = target, ""
    if not host or (port and not port.isdigit()):
        raise ValueError(f"not a host:port target: {target!r}")
    return host, int(port) if port else DEFAULT_PORT


URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")  # gRPC's own target syntax


def with_default_port(target: str) -> str:
    """``host`` -> ``host:50051`` (gRPC alone would dial 443); anything else as given.

    ``host:port``, ``[v6]:port`` and gRPC URIs (``dns:///h:1``, ``unix:/path``) are left alone.
    """
    if "://" in target or target.startswith(URI_SCHEMES):
        return target
    try:
        host, port = split_host_port(target)
    except ValueError:  # not host[:port]: gRPC judges it
        return target
    if (target.startswith("[") and "]:" in target) or target.count(":") == 1:
        return target
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_targets(targets: Sequence[str]) -> str:
    """The channel target for ``targets``: as given when one, else an ``ipv4:``/``ipv6:`` list of every address."""
    if not targets:
        raise ValueError("no target given")
    if len(targets) == 1:
        return targets[0]
    loop = asyncio.get_running_loop()
    v4: list[str] = []
    v6: list[str] = []
    for target in targets:
        if "://" in target or target.split(":", 1)[0] in ("dns", "ipv4", "ipv6", "unix", "unix-abstract"):
            raise ValueError(f"several targets must each be host:port, got {target!r}")
        host, port = split_host_port(target)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:  # a host name
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for a in addresses:
            (v4 if a.version == 4 else v6).append(f"{a}:{port}" if a.version == 4 else f"[{a}]:{port}")
    # one URI holds one address family: prefer IPv4 when both appear
    return "ipv4:" + ",".join(dict.fromkeys(v4)) if v4 else "ipv6:" + ",".join(dict.fromkeys(v6))


def open_channel(
    target: str,
    *,
    authority: str | None = None,
    retry: RetryPolicy | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    opts: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retry)),
        ("grpc.service_config_disable_resolution", 1),  # ours, not one from DNS TXT records
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", "genserve-python"),
    ]
    if authority is not None:  # several targets: the name TLS checks and the :authority header carry
        opts.append(("grpc.default_authority", authority))
    opts.extend(options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)

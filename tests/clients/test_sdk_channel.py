"""The SDK's channel and client without a network (clients/_channel.py, clients/_client.py): the retry
policy as gRPC service config, targets and their ports, round-robin address lists, a closed client."""

from __future__ import annotations

import json
import re

import pytest

from clients import (
    AsyncClient,
    RetryPolicy,
)
from clients._channel import resolve_targets, service_config, split_host_port, with_default_port

pytestmark = pytest.mark.timeout(60)  # the async tests carry their own asyncio mark


def test_retry_policy_becomes_grpc_service_config() -> None:
    config = json.loads(service_config(RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=1.5)))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "genserve.v1.Generator"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.050s",
        "maxBackoff": "1.500s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert "methodConfig" not in json.loads(service_config(None))
    assert "methodConfig" not in json.loads(service_config(RetryPolicy(max_attempts=1)))
    assert RetryPolicy().backoff(1) == 0.1 and RetryPolicy().backoff(10) == 2.0
    with pytest.raises(ValueError, match="max_attempts must be from 1 to 5"):
        RetryPolicy(max_attempts=6)
    with pytest.raises(ValueError, match="initial_backoff <= max_backoff"):
        RetryPolicy(initial_backoff=3.0)


def test_split_host_port() -> None:
    assert split_host_port("example.com:50052") == ("example.com", 50052)
    assert split_host_port("example.com") == ("example.com", 50051)
    assert split_host_port("[::1]:7") == ("::1", 7)
    assert split_host_port("::1") == ("::1", 50051)
    for bad in ("host:port", "dns:///host:1", ":1"):
        with pytest.raises(ValueError, match="not a host:port target"):
            split_host_port(bad)
    with pytest.raises(ValueError, match="not a host:port target: 'a:b'"):
        AsyncClient(["a:b", "c:1"])


def test_a_bare_host_gets_port_50051_not_443() -> None:
    assert with_default_port("localhost") == "localhost:50051"
    assert with_default_port("::1") == "[::1]:50051" and with_default_port("[::1]") == "[::1]:50051"
    for given in ("localhost:7", "[::1]:7", "dns:///example.com", "unix:/tmp/s", "ipv4:127.0.0.1:1,127.0.0.2:2"):
        assert with_default_port(given) == given
    assert AsyncClient("localhost").targets == ("localhost:50051",)
    assert AsyncClient(["a", "b:2"]).targets == ("a:50051", "b:2")


@pytest.mark.asyncio
async def test_several_targets_become_one_round_robin_address_list() -> None:
    assert await resolve_targets(["dns:///example.com:5"]) == "dns:///example.com:5"  # one target: gRPC resolves it
    assert await resolve_targets(["127.0.0.1:1", "127.0.0.2:2", "127.0.0.1:1"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert await resolve_targets(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    assert (await resolve_targets(["localhost:3", "127.0.0.1:4"])).startswith("ipv4:127.0.0.1:3,")
    with pytest.raises(ValueError, match="several targets must each be host:port"):
        await resolve_targets(["unix:/tmp/a", "127.0.0.1:1"])


@pytest.mark.asyncio
async def test_a_closed_client_cannot_be_used_or_reopened() -> None:
    client = AsyncClient("127.0.0.1:1")
    assert repr(client) == "AsyncClient(127.0.0.1:1, unopened)"
    async with client:
        with pytest.raises(RuntimeError, match=re.escape("Cannot open a client instance more than once.")):
            await client.__aenter__()
    await client.aclose()  # twice is fine
    with pytest.raises(RuntimeError, match=re.escape("Cannot reopen a client instance, once it has been closed.")):
        await client.__aenter__()
    with pytest.raises(RuntimeError, match=re.escape("Cannot send a request, as the client has been closed.")):
        await client.list_models()
    with pytest.raises(ValueError, match="timeout must be > 0 or None"):
        AsyncClient(timeout=0)

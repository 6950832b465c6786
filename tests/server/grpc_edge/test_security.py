"""TLS, mutual TLS and bearer tokens against a real server, with a throwaway certificate authority
made here by the openssl command (a second, unrelated one plays the stranger)."""

from __future__ import annotations

import asyncio
import hmac
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import clients
from engine.logs import configure_logging
from genserve.v1 import generator_pb2 as pb
from genserve.v1 import generator_pb2_grpc as pb_grpc
from server.config import TOKENS_ENV, ServerConfig, from_env, parse_args
from server.grpc_edge.auth import BearerTokenAuth, SecurityError, load_tokens
from server.runtime.app import GenServer
from tests.pki import Pair, make_ca, make_leaf
from tests.serving import make_config, run_server_cli, running_server

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

MODELS = "models"
FILE_TOKENS = ("file-token-one-9f2c4e", "file-token-two-7b1d3a")  # two, as during a rotation
ENV_TOKEN = "env-token-5e8a0c"
WRONG = "wrong-token-000000"
RPCS = ("ListModels", "Generate", "GenerateStream")


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair
    client: Pair
    other_ca: Pair
    other_client: Pair  # signed by other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(folder, "test-ca"), make_ca(folder, "other-ca")
    return Pki(
        ca=ca,
        server=make_leaf(folder, "server", ca, server=True),
        client=make_leaf(folder, "client", ca, server=False),
        other_ca=other,
        other_client=make_leaf(folder, "stranger", other, server=False),
    )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# genserve tokens, one a line\n{FILE_TOKENS[0]}\n\n  {FILE_TOKENS[1]}  \n# retired: old-token\n")
    return path


def tls(pki: Pki, client: Pair | None = None, root: Pair | None = None) -> grpc.ChannelCredentials:
    pair = (client.key.read_bytes(), client.pem) if client else (None, None)
    return grpc.ssl_channel_credentials((root or pki.ca).pem, *pair)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


# -- servers -----------------------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def tls_server(pki: Pki, token_file: Path) -> AsyncIterator[GenServer]:
    """TLS, tokens from a file, health and reflection public (the default)."""
    async with running_server(
        models_dir=MODELS, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), token_file=str(token_file)
    ) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mtls_server(pki: Pki) -> AsyncIterator[GenServer]:
    """Mutual TLS: clients need a certificate from the test CA; no tokens."""
    server, ca = pki.server, pki.ca
    async with running_server(models_dir=MODELS, tls_cert=str(server.cert), tls_key=str(server.key), tls_client_ca=str(ca.cert)) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def private_server() -> AsyncIterator[GenServer]:
    """Plaintext, a token from GENSERVE_TOKENS, health and reflection behind the token too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TOKENS_ENV, f" {ENV_TOKEN} ,")
        async with running_server(models_dir=MODELS, public_health=False) as srv:
            yield srv


async def outcome(stub: pb_grpc.GeneratorStub, rpc: str, metadata: Sequence[tuple[str, str]]) -> grpc.StatusCode:
    """The status of one small call of ``rpc``."""
    request = pb.GenerateRequest(id="r1", model="vae", image=pb.ImageParams(n=1, seed=0))
    try:
        if rpc == "ListModels":
            await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
        elif rpc == "Generate":
            [m async for m in stub.Generate(request, metadata=metadata, timeout=10)]
        else:
            # as a client honouring credits does (the SDK): write only after the server's first
            # message. A grpc.aio client that writes at once races a refusal, and when its write lands
            # after the server's trailers grpc.aio reports INTERNAL in place of the server's status
            # (grpc/grpc#36066, a client bug; seen once in CI on this test)
            call = stub.GenerateStream(metadata=metadata, timeout=10)
            first = await call.read()
            assert first is not grpc.aio.EOF and first.credits > 0
            await call.write(pb.StreamRequest(requests=[request]))
            await call.done_writing()
            replies = []
            while (reply := await call.read()) is not grpc.aio.EOF:
                replies.append(reply)
            assert any(r.HasField("finish") and r.finish.code == 0 for m in replies for r in m.results)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def outcomes(stub: pb_grpc.GeneratorStub, metadata: Sequence[tuple[str, str]] = ()) -> set[grpc.StatusCode]:
    return {await outcome(stub, rpc, metadata) for rpc in RPCS}


async def health_and_reflection(channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = ()) -> set[grpc.StatusCode]:
    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    codes = set()
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        codes.add(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as e:
        codes.add(e.code())
    try:
        replies = [r async for r in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(ask(), metadata=metadata)]
        assert "genserve.v1.Generator" in {s.name for s in replies[0].list_services_response.service}
        codes.add(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as e:
        codes.add(e.code())
    return codes


# -- TLS ---------------------------------------------------------------------------------------------


async def test_tls_serves_a_client_that_trusts_the_ca(tls_server: GenServer, pki: Pki) -> None:
    async with grpc.aio.secure_channel(tls_server.address, tls(pki)) as channel:
        assert await outcomes(pb_grpc.GeneratorStub(channel), bearer(FILE_TOKENS[0])) == {grpc.StatusCode.OK}


async def test_tls_refuses_a_plaintext_client(tls_server: GenServer) -> None:
    async with grpc.aio.insecure_channel(tls_server.address) as channel:
        assert await outcome(pb_grpc.GeneratorStub(channel), "ListModels", bearer(FILE_TOKENS[0])) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_trusts_another_ca_does_not_connect(tls_server: GenServer, pki: Pki) -> None:
    async with grpc.aio.secure_channel(tls_server.address, tls(pki, root=pki.other_ca)) as channel:
        assert await outcome(pb_grpc.GeneratorStub(channel), "ListModels", bearer(FILE_TOKENS[0])) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_a_client_certificate_from_the_ca(mtls_server: GenServer, pki: Pki) -> None:
    async with grpc.aio.secure_channel(mtls_server.address, tls(pki, client=pki.client)) as channel:
        assert await outcomes(pb_grpc.GeneratorStub(channel)) == {grpc.StatusCode.OK}


@pytest.mark.parametrize("who", ["no certificate", "a stranger's certificate"])
async def test_mtls_refuses_a_client_without_a_certificate_from_the_ca(mtls_server: GenServer, pki: Pki, who: str) -> None:
    client = pki.other_client if who == "a stranger's certificate" else None
    async with grpc.aio.secure_channel(mtls_server.address, tls(pki, client=client)) as channel:
        assert await outcome(pb_grpc.GeneratorStub(channel), "ListModels", ()) == grpc.StatusCode.UNAVAILABLE
        # health checks too: the handshake comes before any method
        assert await health_and_reflection(channel) == {grpc.StatusCode.UNAVAILABLE}


# -- tokens ------------------------------------------------------------------------------------------


async def refusal_details(stub: pb_grpc.GeneratorStub, metadata: Sequence[tuple[str, str]]) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return info.value.details() or ""


@pytest.mark.parametrize(
    ("metadata", "details"),
    [
        ((), "missing bearer token"),
        ((("authorization", f"Basic {FILE_TOKENS[0]}"),), "missing bearer token"),
        ((("authorization", "Bearer "),), "missing bearer token"),
        (bearer(WRONG), "invalid bearer token"),
        (bearer(FILE_TOKENS[0] + "x"), "invalid bearer token"),
        (bearer(FILE_TOKENS[0][:-1]), "invalid bearer token"),
        (bearer(ENV_TOKEN), "invalid bearer token"),  # another server's token
        ((("authorization", "Bearer #"),), "invalid bearer token"),  # comments are not tokens
    ],
)
async def test_a_missing_or_wrong_token_is_unauthenticated(
    tls_server: GenServer, pki: Pki, metadata: tuple[tuple[str, str], ...], details: str
) -> None:
    async with grpc.aio.secure_channel(tls_server.address, tls(pki)) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        assert {rpc: await outcome(stub, rpc, metadata) for rpc in RPCS} == dict.fromkeys(RPCS, grpc.StatusCode.UNAUTHENTICATED)
        assert await refusal_details(stub, metadata) == details
    registry = tls_server.metrics.registry
    for rpc in RPCS:
        assert (registry.get_sample_value("genserve_rejections_total", {"rpc": rpc, "code": "UNAUTHENTICATED"}) or 0) >= 1


async def test_a_stream_is_refused_before_its_first_message(tls_server: GenServer, pki: Pki) -> None:
    async with grpc.aio.secure_channel(tls_server.address, tls(pki)) as channel:
        call = pb_grpc.GeneratorStub(channel).GenerateStream(metadata=bearer(WRONG), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()  # nothing written: the refusal must not wait for a request
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_every_token_of_the_file_is_accepted(tls_server: GenServer, pki: Pki) -> None:
    async with grpc.aio.secure_channel(tls_server.address, tls(pki)) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for token in FILE_TOKENS:
            assert await outcomes(stub, bearer(token)) == {grpc.StatusCode.OK}
        # the scheme is case-insensitive (RFC 7235)
        assert await outcome(stub, "ListModels", (("authorization", f"bearer {FILE_TOKENS[1]}"),)) == grpc.StatusCode.OK


async def test_a_token_from_the_environment_is_accepted(private_server: GenServer) -> None:
    async with grpc.aio.insecure_channel(private_server.address) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        assert await outcomes(stub, bearer(ENV_TOKEN)) == {grpc.StatusCode.OK}
        assert await outcomes(stub, bearer(FILE_TOKENS[0])) == {grpc.StatusCode.UNAUTHENTICATED}


async def test_health_and_reflection_need_no_token_when_public(tls_server: GenServer, pki: Pki) -> None:
    async with grpc.aio.secure_channel(tls_server.address, tls(pki)) as channel:
        assert await health_and_reflection(channel) == {grpc.StatusCode.OK}
        assert await health_and_reflection(channel, bearer(WRONG)) == {grpc.StatusCode.OK}


async def test_health_and_reflection_need_the_token_unless_public(private_server: GenServer) -> None:
    async with grpc.aio.insecure_channel(private_server.address) as channel:
        assert await health_and_reflection(channel) == {grpc.StatusCode.UNAUTHENTICATED}
        assert await health_and_reflection(channel, bearer(WRONG)) == {grpc.StatusCode.UNAUTHENTICATED}
        assert await health_and_reflection(channel, bearer(ENV_TOKEN)) == {grpc.StatusCode.OK}


async def test_an_unknown_method_is_unauthenticated_without_a_token_and_names_no_metric(private_server: GenServer) -> None:
    async with grpc.aio.insecure_channel(private_server.address) as channel:
        for method in ("/genserve.v1.Generator/Nope", "/some.Other/Thing"):
            call = channel.unary_unary(method)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"", metadata=bearer(ENV_TOKEN), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    registry = private_server.metrics.registry
    assert registry.get_sample_value("genserve_rejections_total", {"rpc": "unknown", "code": "UNAUTHENTICATED"}) == 2
    assert registry.get_sample_value("genserve_rejections_total", {"rpc": "Nope", "code": "UNAUTHENTICATED"}) is None


async def test_the_sdk_speaks_tls_with_a_token(tls_server: GenServer, pki: Pki) -> None:
    async with clients.AsyncClient(tls_server.address, tls=True, root_certificates=pki.ca.pem, token=FILE_TOKENS[1]) as client:
        assert {m.name for m in await client.list_models()} == {"vae", "gan", "flow", "transformer"}
        assert (await client.generate_images("vae", 2, seed=0)).shape == (2, 28, 28)
    async with clients.AsyncClient(tls_server.address, tls=True, root_certificates=pki.ca.pem, token=WRONG) as client:
        with pytest.raises(clients.Unauthenticated, match="invalid bearer token"):
            await client.list_models()
    async with clients.AsyncClient(tls_server.address, tls=True, root_certificates=pki.ca.pem) as client:
        with pytest.raises(clients.Unauthenticated, match="missing bearer token"):
            await client.list_models()


# -- no secret in logs or --help --------------------------------------------------------------------


async def test_no_token_reaches_the_logs(
    pki: Pki, token_file: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging("json", "debug")  # bound to capfd's stderr; conftest restores the default afterwards
    monkeypatch.setenv(TOKENS_ENV, ENV_TOKEN)
    cert, key = str(pki.server.cert), str(pki.server.key)
    server = running_server(models_dir=MODELS, tls_cert=cert, tls_key=key, token_file=str(token_file))
    async with server as srv, grpc.aio.secure_channel(srv.address, tls(pki)) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        assert await outcomes(stub, bearer(ENV_TOKEN)) == {grpc.StatusCode.OK}
        assert await outcomes(stub, bearer(WRONG)) == {grpc.StatusCode.UNAUTHENTICATED}
        assert await outcomes(stub) == {grpc.StatusCode.UNAUTHENTICATED}
    out, err = capfd.readouterr()
    logs = out + err
    assert '"event": "server_ready"' in logs and '"auth": "on, 3 tokens"' in logs and '"tls": "on"' in logs
    assert '"event": "unauthenticated"' in logs  # refusals are logged (at debug) ...
    for secret in (*FILE_TOKENS, ENV_TOKEN, WRONG):
        assert secret not in logs  # ... without the token, right or wrong


async def test_help_shows_no_token_and_names_the_security_options(token_file: Path) -> None:
    result = run_server_cli("--help", env={TOKENS_ENV: ENV_TOKEN, "GENSERVE_TOKEN_FILE": str(token_file)})
    assert result.returncode == 0
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca", "--token-file", "--no-public-health", TOKENS_ENV):
        assert flag in result.stdout
    for secret in (*FILE_TOKENS, ENV_TOKEN):
        assert secret not in result.stdout + result.stderr


async def test_the_process_refuses_a_missing_certificate_and_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cert.pem"
    args = ("--tls-cert", str(missing), "--tls-key", str(missing), "--port", "0", "--metrics-port", "0", "--log-format", "json")
    result = run_server_cli(*args, env={TOKENS_ENV: ENV_TOKEN})
    assert result.returncode == 1
    assert "start_failed" in result.stderr and f"tls_cert: cannot read {missing}" in result.stderr
    assert ENV_TOKEN not in result.stderr + result.stdout


# -- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_key": "/k.pem"}, "tls_key=/k.pem needs tls_cert too"),
        ({"tls_cert": "/c.pem"}, "tls_cert=/c.pem needs tls_key too"),
        ({"tls_client_ca": "/ca.pem"}, "tls_client_ca=/ca.pem needs tls_cert and tls_key"),
    ],
)
async def test_tls_settings_come_in_pairs(settings: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig(**settings)  # type: ignore[arg-type]
    with pytest.raises(SystemExit) as info:
        parse_args([f"--{k.replace('_', '-')}={v}" for k, v in settings.items()], environ={})
    assert info.value.code == 2 and message in capsys.readouterr().err


async def test_public_health_is_a_flag_pair_and_a_boolean_variable() -> None:
    assert parse_args([], environ={}).public_health is True
    assert parse_args(["--no-public-health"], environ={}).public_health is False
    assert parse_args([], environ={"GENSERVE_PUBLIC_HEALTH": "false"}).public_health is False
    assert parse_args(["--public-health"], environ={"GENSERVE_PUBLIC_HEALTH": "0"}).public_health is True
    assert from_env({"GENSERVE_PUBLIC_HEALTH": "Yes"}).public_health is True
    with pytest.raises(ValueError, match="GENSERVE_PUBLIC_HEALTH='maybe' is not a valid bool"):
        from_env({"GENSERVE_PUBLIC_HEALTH": "maybe"})


BAD_FILES = ["missing cert", "missing key", "key as cert", "another's key", "missing client ca", "missing token file"]
BAD_FILES += ["folder as token file", "no token", "bad token"]


def bad_file(folder: Path, kind: str) -> tuple[dict[str, str], str]:
    """Settings with one bad security file, and the start of the error that must name it."""
    (folder / "empty").write_text("# nothing but a comment\n\n")
    (folder / "spaced").write_text("good-token\nnot one token\n")
    missing, other_key = folder / "missing.pem", folder / "other.key"
    server = {"tls_cert": str(folder / "server.pem"), "tls_key": str(folder / "server.key")}
    cases = {
        "missing cert": ({**server, "tls_cert": str(missing)}, f"tls_cert: cannot read {missing}: No such file or directory"),
        "missing key": ({**server, "tls_key": str(missing)}, f"tls_key: cannot read {missing}: No such file or directory"),
        "key as cert": ({**server, "tls_cert": server["tls_key"]}, f"tls_cert: {server['tls_key']} holds no PEM certificate"),
        "another's key": (
            {**server, "tls_key": str(other_key)},
            f"tls_cert, tls_key: {server['tls_cert']} and {other_key} are not a certificate chain and its unencrypted key",
        ),
        "missing client ca": ({**server, "tls_client_ca": str(missing)}, f"tls_client_ca: cannot read {missing}"),
        "missing token file": ({"token_file": str(missing)}, f"token_file: cannot read {missing}"),
        "folder as token file": ({"token_file": str(folder)}, f"token_file: cannot read {folder}: Is a directory"),
        "no token": ({"token_file": str(folder / "empty")}, f"token_file: {folder / 'empty'} holds no token"),
        "bad token": ({"token_file": str(folder / "spaced")}, f"token_file: line 2 of {folder / 'spaced'} is not a token"),
    }
    assert set(cases) == set(BAD_FILES)
    return cases[kind]


@pytest.mark.parametrize("kind", BAD_FILES)
async def test_a_bad_security_file_stops_the_start_and_is_named(pki: Pki, tmp_path: Path, kind: str) -> None:
    shutil.copy(pki.server.cert, tmp_path / "server.pem")
    shutil.copy(pki.server.key, tmp_path / "server.key")
    shutil.copy(pki.other_client.key, tmp_path / "other.key")
    settings, message = bad_file(tmp_path, kind)
    server = GenServer(make_config(models_dir=MODELS, **settings))
    with pytest.raises(SecurityError) as info:
        await server.start()  # before the models load: no stop needed
    assert str(info.value).startswith(message)
    assert "not one token" not in str(info.value)


async def test_tokens_come_from_the_file_then_the_environment(token_file: Path) -> None:
    assert load_tokens(str(token_file), {TOKENS_ENV: f"{ENV_TOKEN}, ,other-token"}) == [*FILE_TOKENS, ENV_TOKEN, "other-token"]
    assert load_tokens("", {}) == [] and load_tokens("", {TOKENS_ENV: " , "}) == []
    with pytest.raises(SecurityError, match=f"{TOKENS_ENV}: item 2 is not a token"):
        load_tokens("", {TOKENS_ENV: "fine,caf\u00e9"})


async def test_the_interceptor_keeps_no_token_in_sight() -> None:
    auth = BearerTokenAuth([ENV_TOKEN, *FILE_TOKENS], public=["grpc.health.v1.Health"])
    assert ENV_TOKEN not in repr(auth) and ENV_TOKEN not in str(vars(auth))
    assert auth.refusal_reason([("authorization", f"Bearer {ENV_TOKEN}")]) is None
    assert auth.refusal_reason([("authorization", f"Bearer  {ENV_TOKEN} ")]) is None
    assert auth.refusal_reason([("x-other", "1")]) == "missing bearer token"
    assert auth.refusal_reason(None) == "missing bearer token"
    assert auth.refusal_reason([("authorization", f"Bearer {ENV_TOKEN}0")]) == "invalid bearer token"
    with pytest.raises(ValueError, match="at least one token"):
        BearerTokenAuth([])


async def test_every_configured_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: tokens are compared in constant time: hmac.compare_digest on digests, every one, no early exit."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("server.grpc_edge.auth.hmac.compare_digest", counting)
    tokens = [ENV_TOKEN, *FILE_TOKENS]
    auth = BearerTokenAuth(tokens)
    for given, ok in [(ENV_TOKEN, True), (FILE_TOKENS[-1], True), (WRONG, False), (ENV_TOKEN[:-1], False)]:
        compared.clear()
        assert (auth.refusal_reason([("authorization", f"Bearer {given}")]) is None) is ok
        assert len(compared) == len(tokens)  # a match on the first token still compares them all
        # fixed-length digests, never the tokens themselves: the time depends on neither length nor content
        assert all(len(a) == len(b) == 32 and given.encode() not in (a, b) for a, b in compared)


async def test_tokens_over_plaintext_warn_at_start(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(Path(MODELS) / "vae.safetensors", models)
    configure_logging("json", "info")  # bound to capfd's stderr; conftest restores the default afterwards
    monkeypatch.setenv(TOKENS_ENV, ENV_TOKEN)
    async with running_server(models_dir=str(models)):
        pass
    warned = [line for line in capfd.readouterr().err.splitlines() if '"event": "tokens_in_cleartext"' in line]
    assert len(warned) == 1 and '"level": "warning"' in warned[0] and "--tls-cert" in warned[0]
    assert ENV_TOKEN not in warned[0]


async def test_the_sdk_presents_a_client_certificate_for_mutual_tls(mtls_server: GenServer, pki: Pki) -> None:
    cert, key = pki.client.pem, pki.client.key.read_bytes()
    async with clients.AsyncClient(
        mtls_server.address, root_certificates=pki.ca.pem, retry=None, client_certificate=cert, client_key=key
    ) as client:
        assert {m.name for m in await client.list_models()} == {"vae", "gan", "flow", "transformer"}
    async with clients.AsyncClient(mtls_server.address, root_certificates=pki.ca.pem, retry=None, timeout=5) as client:
        with pytest.raises(clients.Unavailable):  # no certificate: the handshake fails
            await client.list_models()
    with pytest.raises(ValueError, match="go together"):
        clients.AsyncClient(mtls_server.address, client_certificate=pki.client.pem)


async def test_the_cli_takes_a_client_certificate(mtls_server: GenServer, pki: Pki) -> None:
    args = ["--target", mtls_server.address, "--ca-cert", str(pki.ca.cert), "--cert", str(pki.client.cert), "--key", str(pki.client.key)]

    async def cli(*argv: str) -> tuple[int, str, str]:  # a subprocess, awaited: the server shares this event loop
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients", *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await cli(*args, "models")
    assert code == 0 and "transformer" in out, err
    code, out, err = await cli(*args[:4], "--timeout", "5", "models")  # no client certificate
    assert code == 1 and "error" in err

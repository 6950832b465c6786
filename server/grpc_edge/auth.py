"""Who may call: TLS (optionally mutual) credentials, and bearer tokens checked by an interceptor.

TLS: ``--tls-cert`` and ``--tls-key`` serve TLS; ``--tls-client-ca`` also requires a client
certificate signed by one of those CAs (mutual TLS). Both apply to the whole port, health and
reflection included: a handshake comes before any method is known.

Tokens: ``--token-file`` (one a line; blank lines and ``#`` comments ignored) and the environment
variable GENSERVE_TOKENS (comma-separated). Any of them is accepted, so a token is rotated by
serving the old and the new one until every client has moved. With at least one token, each call
must carry ``authorization: Bearer <token>``, or it fails with UNAUTHENTICATED before any of it
is read; health checks and reflection are exempt when the operator leaves ``--public-health`` on.

A token is never logged, nor put in a config field (so it shows in no ``--help`` and no log of the
settings). The check hashes the presented token and compares its digest with the digest of every
configured token, all of them each time, with ``hmac.compare_digest``: its time depends neither on
which token matched, nor on how much of one did, nor on the token's length.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from engine.logs import get_logger
from server.config import TOKENS_ENV, ServerConfig

log = get_logger("auth")

# Services a caller may reach without a token when the operator chooses (--public-health).
PUBLIC_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


class SecurityError(RuntimeError):
    """Raised when a TLS or token setting cannot be used: a file missing, unreadable, or without the
    certificate, key or token it should hold. The message names the setting and the file."""


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"{setting}: cannot read {path}: {e.strerror or e}") from None


def _read_pem(setting: str, path: str, marker: bytes, what: str) -> bytes:
    data = _read(setting, path)
    if marker not in data:
        raise SecurityError(f"{setting}: {path} holds no PEM {what}")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured files (None: plaintext); mutual TLS with ``tls_client_ca``."""
    if not config.tls_cert:
        return None
    cert = _read_pem("tls_cert", config.tls_cert, b"-----BEGIN CERTIFICATE-----", "certificate")
    key = _read_pem("tls_key", config.tls_key, b"PRIVATE KEY-----", "private key")
    # gRPC would refuse a key that does not match, or an unparseable PEM, only as "Failed to bind to
    # address": Python's ssl module checks the same files first and says what is wrong
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")  # never prompts
    except (ssl.SSLError, OSError) as e:
        raise SecurityError(
            f"tls_cert, tls_key: {config.tls_cert} and {config.tls_key} are not a certificate chain and its unencrypted key ({e})"
        ) from None
    client_ca = None
    if config.tls_client_ca:
        client_ca = _read_pem("tls_client_ca", config.tls_client_ca, b"-----BEGIN CERTIFICATE-----", "certificate")
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (ssl.SSLError, OSError) as e:
            raise SecurityError(f"tls_client_ca: {config.tls_client_ca} holds no usable CA certificate ({e})") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _valid_token(token: str) -> bool:
    # what a gRPC metadata value can carry after "Bearer ": printable ASCII, no spaces
    return all("!" <= ch <= "~" for ch in token)


def load_tokens(token_file: str, environ: Mapping[str, str]) -> list[str]:
    """The accepted tokens: the lines of ``token_file`` (when set), then GENSERVE_TOKENS' items."""
    tokens: list[str] = []
    if token_file:
        try:
            text = _read("token_file", token_file).decode("utf-8")
        except UnicodeDecodeError:
            raise SecurityError(f"token_file: {token_file} is not UTF-8 text") from None
        for number, line in enumerate(text.splitlines(), 1):
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            if not _valid_token(token):  # the message names the line, never its content
                raise SecurityError(f"token_file: line {number} of {token_file} is not a token (printable ASCII without spaces)")
            tokens.append(token)
        if not tokens:
            raise SecurityError(f"token_file: {token_file} holds no token (one a line; # starts a comment)")
    for number, item in enumerate(environ.get(TOKENS_ENV, "").split(","), 1):
        token = item.strip()
        if token and not _valid_token(token):
            raise SecurityError(f"{TOKENS_ENV}: item {number} is not a token (printable ASCII without spaces)")
        if token:
            tokens.append(token)
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _refusal(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the call's own kind that fails it with UNAUTHENTICATED. It sets no request
    deserializer, so nothing an unauthenticated caller sent is parsed."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    # an unknown method gets the streaming kind: it aborts without waiting for a request message
    streaming_in = handler is None or handler.request_streaming
    streaming_out = handler is None or handler.response_streaming
    if streaming_in:
        return (grpc.stream_stream_rpc_method_handler if streaming_out else grpc.stream_unary_rpc_method_handler)(abort)
    return (grpc.unary_stream_rpc_method_handler if streaming_out else grpc.unary_unary_rpc_method_handler)(abort)


class BearerTokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses, with UNAUTHENTICATED, each call without ``authorization: Bearer <token>`` for one
    of ``tokens``; methods under ``public`` services need none. ``on_refusal(rpc)`` counts refusals
    (``rpc`` is the method's name, or "unknown" for a method the server lacks)."""

    def __init__(self, tokens: Sequence[str], *, public: Sequence[str] = (), on_refusal: Callable[[str], None] | None = None) -> None:
        if not tokens:
            raise ValueError("BearerTokenAuth needs at least one token")
        self._digests = tuple(_digest(t) for t in tokens)
        self._public = tuple(f"/{service}/" for service in public)
        self._on_refusal = on_refusal

    def __repr__(self) -> str:
        return f"BearerTokenAuth({len(self._digests)} tokens, public={list(self._public)})"

    def refusal_reason(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None when the metadata carries a valid bearer token, else why not."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        scheme, _, credential = value.partition(" ") if isinstance(value, str) else ("", "", "")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return "missing bearer token"
        given = _digest(credential)
        valid = False
        for digest in self._digests:  # every one, without stopping at a match
            valid |= hmac.compare_digest(given, digest)
        return None if valid else "invalid bearer token"

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        if method.startswith(self._public):
            return await continuation(details)
        reason = self.refusal_reason(details.invocation_metadata)
        handler = await continuation(details)
        if reason is None:
            return handler
        # an unknown method is not named in the metric: callers without a token would choose its labels
        rpc = method.rsplit("/", 1)[-1] if handler is not None else "unknown"
        if self._on_refusal is not None:
            self._on_refusal(rpc)
        log.debug("unauthenticated", rpc=rpc, reason=reason)
        return _refusal(handler, reason)

"""The server's settings (server/config.py): every option a flag and an environment variable, the
flag over the variable, internal settings neither, bad values refused naming their flag."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from server.config import ServerConfig, build_parser, env_name, parse_args
from tests.serving import run_server_cli

pytestmark = pytest.mark.timeout(120)


def test_help_lists_every_option_with_its_environment_variable() -> None:
    result = run_server_cli("--help")
    assert result.returncode == 0
    for flag, env in [
        ("--batch-size", "GENSERVE_BATCH_SIZE"),
        ("--grace-s", "GENSERVE_GRACE_S"),
        ("--metrics-port", "GENSERVE_METRICS_PORT"),
    ]:
        assert flag in result.stdout and env in result.stdout
    assert "--restart-intensity" in result.stdout and "--stream-credits" in result.stdout


# Settings that need a partner to be valid on their own (TLS takes a certificate and its key).
PARTNERS = {
    "tls_cert": {"GENSERVE_TLS_KEY": "key.pem"},
    "tls_key": {"GENSERVE_TLS_CERT": "cert.pem"},
    "tls_client_ca": {"GENSERVE_TLS_CERT": "cert.pem", "GENSERVE_TLS_KEY": "key.pem"},
}


def other_value(f: dataclasses.Field[Any]) -> tuple[str, object]:
    """A valid value of field ``f`` that is not its default: (as the environment spells it, as parsed)."""
    default = f.default
    if isinstance(default, bool):
        return ("false" if default else "true"), not default
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default + 0.5), default + 0.5
    assert isinstance(default, str), f.name
    if "choices" in f.metadata:
        choice = next(c for c in f.metadata["choices"] if c != default)
        return choice, choice
    value = {"host": "0.0.0.0", "device": "cpu", "amqp_url": "amqp://guest:guest@127.0.0.1:5672/some"}.get(f.name, f"some-{f.name}")
    return value, value


OPTIONS = [f for f in dataclasses.fields(ServerConfig) if not f.metadata.get("internal")]  # internal: set by the front only


def test_internal_settings_are_neither_flags_nor_environment_variables() -> None:
    internal = [f.name for f in dataclasses.fields(ServerConfig) if f.metadata.get("internal")]
    assert internal == ["front_address", "front_tls", "http_host", "http_tls_cert", "http_tls_key", "http_tls_client_ca"]
    parsed = parse_args([], environ={"GENSERVE_FRONT_ADDRESS": "evil:1", "GENSERVE_FRONT_TLS": "true", "GENSERVE_HTTP_HOST": "0.0.0.0"})
    assert parsed.front_tls is False and parsed.http_host == ""
    assert "--front-address" not in build_parser(ServerConfig()).format_help()
    assert "--http-host" not in build_parser(ServerConfig()).format_help()


@pytest.mark.parametrize("f", OPTIONS, ids=lambda f: f.name)
def test_every_option_is_also_an_environment_variable(f: dataclasses.Field[Any]) -> None:
    """README: every option is also GENSERVE_<OPTION>; the flag wins over the environment."""
    raw, value = other_value(f)
    name = env_name(f.name)
    assert name == "GENSERVE_" + f.name.upper()
    environ = {**PARTNERS.get(f.name, {}), name: raw}
    assert getattr(parse_args([], environ=environ), f.name) == value
    assert getattr(parse_args([], environ={}), f.name) == f.default  # unset: the default
    flag = "--" + f.name.replace("_", "-")
    if isinstance(value, bool):  # back to the default over the environment
        args, flagged = [flag if f.default else "--no-" + flag[2:]], f.default
    elif isinstance(value, str):
        args, flagged = [flag, raw + "-by-flag"], raw + "-by-flag"
        if "choices" in f.metadata:
            args, flagged = [flag, str(f.default)], f.default
    else:
        args, flagged = [flag, str(f.default)], f.default
    assert getattr(parse_args(args, environ=environ), f.name) == flagged
    assert name in build_parser(ServerConfig()).format_help()


def test_bad_settings_are_refused_with_a_clear_message() -> None:
    result = run_server_cli(env={"GENSERVE_BATCH_SIZE": "lots"})
    assert result.returncode != 0 and "GENSERVE_BATCH_SIZE='lots' is not a valid int" in result.stderr
    result = run_server_cli("--batch-size", "0")
    assert result.returncode == 2 and "--batch-size (GENSERVE_BATCH_SIZE) must be >= 1" in result.stderr
    result = run_server_cli(env={"GENSERVE_DECODE_PRECISION": "int4"})  # a flag's choices argparse checks; the environment's too
    assert (
        result.returncode != 0
        and "--decode-precision (GENSERVE_DECODE_PRECISION) must be one of float32, int8, got 'int4'" in result.stderr
    )
    result = run_server_cli("--models-dir", "no/such/folder", "--port", "0", "--metrics-port", "0")
    assert result.returncode == 1 and "no/such/folder" in result.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
@pytest.mark.parametrize("value", ["70000", "65536", "-1"])
def test_a_port_outside_0_to_65535_is_refused_naming_its_flag(flag: str, value: str) -> None:
    """--port 70000 used to serve on 4464 (the number wrapped)."""
    with pytest.raises(SystemExit):
        parse_args([flag, value], environ={})
    result = run_server_cli(f"{flag}={value}")
    env = "GENSERVE_" + flag[2:].replace("-", "_").upper()
    assert result.returncode == 2 and f"{flag} ({env}) must be a port number in 0-65535, got {value}" in result.stderr
    result = run_server_cli(env={env: value})
    assert result.returncode != 0 and f"{flag} ({env}) must be a port number in 0-65535, got {value}" in result.stderr

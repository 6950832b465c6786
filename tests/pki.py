"""A throwaway certificate authority made by the openssl command: CAs, and leaves they sign for a
server (localhost, 127.0.0.1) or a client."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    @property
    def pem(self) -> bytes:
        return self.cert.read_bytes()


def make_ca(folder: Path, name: str) -> Pair:
    ca = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    openssl("req", "-x509", *EC_KEY, "-keyout", str(ca.key), "-out", str(ca.cert), "-subj", f"/CN={name}")
    return ca


def make_leaf(folder: Path, name: str, ca: Pair, *, server: bool) -> Pair:
    """A certificate signed by ``ca``: for localhost and 127.0.0.1 (server), or for a client."""
    leaf = Pair(folder / f"{name}.pem", folder / f"{name}.key")
    extensions = ["basicConstraints=critical,CA:FALSE", f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}"]
    if server:
        extensions.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    addext = [arg for ext in extensions for arg in ("-addext", ext)]
    openssl(
        "req", "-x509", *EC_KEY, "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-keyout", str(leaf.key), "-out", str(leaf.cert), "-subj", f"/CN={name}", *addext,
    )  # fmt: skip
    return leaf

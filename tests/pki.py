"""Throwaway certificate authorities for the TLS tests, made with the openssl CLI.

``make_pki(folder)`` writes, in ``folder``::

    ca.pem                      the test CA the servers' certificates chain to
    server.pem, server.key      for 127.0.0.1 and localhost (serverAuth; clientAuth too:
                                Redis Cluster nodes present it to each other)
    client.pem, client.key      a client certificate for mutual TLS (clientAuth)
    other-host.pem, .key        signed by the CA, but for other.invalid only
    rogue-ca.pem                a CA that signed nothing here: trusting it alone
                                must make every handshake fail

EC P-256 keys, valid for two days: quick to make, never worth stealing. The
``cryptography`` package is not a dependency of the project, hence the CLI.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"


@dataclass(frozen=True)
class Pki:
    """Paths of one test PKI (see the module docstring)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def rogue_ca(self) -> Path:
        return self.folder / "rogue-ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def other_host_cert(self) -> Path:
        return self.folder / "other-host.pem"

    @property
    def other_host_key(self) -> Path:
        return self.folder / "other-host.key"


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def _ca(name: str, cn: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", _DAYS, "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip


def _leaf(name: str, cn: str, extensions: str, cwd: Path) -> None:
    _openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", _DAYS, "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


def make_pki(folder: Path) -> Pki:
    """Write a fresh test PKI into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca("ca", "cfnesa test CA", folder)
    _ca("rogue-ca", "cfnesa rogue CA", folder)
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    _leaf(
        "server",
        "localhost",
        leaf
        + "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        folder,
    )
    _leaf("client", "cfnesa-worker", leaf + "extendedKeyUsage=clientAuth\n", folder)
    _leaf(
        "other-host",
        "other.invalid",
        leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:other.invalid\n",
        folder,
    )
    return Pki(folder)

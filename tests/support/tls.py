"""Certificates as cert-manager issues them, and Secret volumes as kubelet updates them, for rotation tests.

`Issuer` is a CA (openssl) that signs leaf certificates for 127.0.0.1/localhost; `SecretVolume` lays files out
the way kubelet's atomic writer does (`tls.crt -> ..data/tls.crt`, `..data -> ..<timestamp>`) and rotates
them by swapping the `..data` link in one rename, so readers see the old set or the new set, never a mix.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

from tests.conftest import require

_SERIAL = itertools.count(1)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


class Issuer:
    def __init__(self, directory: Path) -> None:
        require(shutil.which("openssl") is not None, "openssl is not installed (scripts/setup.sh)")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = directory / "ca.crt", directory / "ca.key"
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kzt-test-ca",
            "-keyout", str(self.key), "-out", str(self.cert),
        )  # fmt: skip

    def issue(self, name: str = "localhost", ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a new leaf with a new key, valid for `ips` and `name`."""
        n = next(_SERIAL)
        key, csr, crt, ext = (self.dir / f"leaf{n}.{s}" for s in ("key", "csr", "crt", "ext"))
        names = ",".join([*(f"IP:{ip}" for ip in ips), f"DNS:{name}"])
        ext.write_text(f"subjectAltName={names}\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(csr),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", str(1000 + n), "-days", "1", "-extfile", str(ext), "-out", str(crt),
        )  # fmt: skip
        return crt.read_bytes(), key.read_bytes()


class SecretVolume:
    """A mounted Secret: `write` lays out a new generation and switches to it atomically."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._generation = itertools.count(1)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def write(self, files: dict[str, bytes]) -> None:
        generation = self.dir / f"..gen_{next(self._generation)}"
        generation.mkdir()
        for name, content in files.items():
            (generation / name).write_bytes(content)
            link = self.dir / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        tmp = self.dir / "..data_tmp"
        tmp.symlink_to(generation.name)
        os.replace(tmp, self.dir / "..data")


def served_certificate(port: int, ca: Path, alpn: str = "http/1.1") -> bytes:
    """The DER certificate a TLS server on 127.0.0.1:`port` presents to a new connection (verified)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())

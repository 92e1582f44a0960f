"""Who may send, and the receivers' TLS identity: both read from files that are re-read when they change.

The bearer token is compared in constant time (`hmac.compare_digest`), so its bytes cannot be guessed one
at a time from response timings. The certificate and key are reloaded for new connections (HTTP: the
same `SSLContext` loads the new pair; gRPC: its dynamic server credentials ask before every handshake), so
a cert-manager renewal never needs a restart.
"""

from __future__ import annotations

import hmac
import ssl
import tempfile
from pathlib import Path
from typing import Final

import grpc

from otel_kzt.filewatch import WatchedFiles, token_lines

_BEARER: Final = "Bearer "


class BearerCheck:
    """`Authorization: Bearer <token>`, the token given literally or read from a watched file (any of its
    lines: the new and the old token during a rotation)."""

    def __init__(self, token: str | None = None, token_file: str | None = None) -> None:
        self._fixed = (token,) if token else None
        self._file = WatchedFiles([token_file], token_lines, "bearer_token_file") if token_file else None

    @property
    def required(self) -> bool:
        return self._fixed is not None or self._file is not None

    def accepts(self, authorization: str | None) -> bool:
        expected = self._file.current() if self._file is not None else self._fixed
        if expected is None:
            return True
        given = authorization or ""
        if not given.startswith(_BEARER):
            return False
        offered = given[len(_BEARER) :].strip().encode()
        # Every candidate is compared (no early exit), each in constant time.
        matches = [hmac.compare_digest(offered, token.encode()) for token in expected]
        return any(matches)


def _pem_pair(contents: tuple[bytes, ...]) -> tuple[bytes, bytes]:
    """(cert, key) once they load together: a mismatched pair (a half-finished rotation) is refused."""
    cert, key = contents
    _server_context(cert, key)
    return cert, key


def _server_context(cert: bytes, key: bytes, into: ssl.SSLContext | None = None) -> ssl.SSLContext:
    ctx = into or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # load_cert_chain reads files only: the PEMs go through a private temporary directory.
    with tempfile.TemporaryDirectory(prefix="kzt-tls-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_path.write_bytes(cert)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise ValueError(f"certificate and key do not load together: {exc}") from exc
    return ctx


class ServerTls:
    """The receivers' certificate and key, current for every new connection."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self._files = WatchedFiles([cert_file, key_file], _pem_pair, "tls_cert_file")
        self._loaded = self._files.current()
        self.context = _server_context(*self._loaded)

    def refresh(self) -> ssl.SSLContext:
        """Load a renewed pair into the context (new handshakes use it); call before accepting."""
        pair = self._files.current()
        if pair is not self._loaded:
            _server_context(*pair, into=self.context)
            self._loaded = pair
        return self.context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        def fetch() -> grpc.ServerCertificateConfiguration | None:
            pair = self._files.current()
            if pair is seen[0]:
                return None  # unchanged: gRPC keeps the configuration it has
            seen[0] = pair
            return grpc.ssl_server_certificate_configuration([(pair[1], pair[0])])

        seen = [self._files.current()]
        initial = grpc.ssl_server_certificate_configuration([(seen[0][1], seen[0][0])])
        return grpc.dynamic_ssl_server_credentials(initial, fetch)

"""The exception tree of otel-kzt, drawn once.

Foreign exceptions (bcc's bare `Exception`, `grpc.RpcError`, the kubernetes client's `ApiException`,
`OSError` from syscalls) are translated where they enter, with `raise ... from exc`.

    KztError
    ├── ConfigError               bad flag / YAML value: names the field; the CLI exits 2
    ├── DatapathError             the kernel side
    │   ├── BccMissing            Debian's python3-bpfcc is not importable
    │   ├── KernelUnsupported     no BTF, no netfilter BPF links, missing struct field ...
    │   ├── PrivilegeError        not root / no CAP_BPF + CAP_NET_ADMIN
    │   └── ProgramLoadError      compile or verifier failure (carries the log)
    ├── MetadataError             Kubernetes metadata source failures
    ├── ReceiveError              an OTLP request we must refuse
    │   ├── InvalidRequest        -> gRPC INVALID_ARGUMENT / HTTP 400
    │   ├── RequestTooLarge       -> gRPC RESOURCE_EXHAUSTED / HTTP 413
    │   ├── UnsupportedMediaType  -> HTTP 415
    │   └── Overloaded            -> gRPC UNAVAILABLE / HTTP 503 + Retry-After
    └── ExportError               sending OTLP downstream failed
        ├── PermanentExportError  never retried (bad request, auth, ...)
        └── RetryableExportError  retried with backoff (carries the server's retry delay, if any)
            ├── NoAnswer          sent, no answer before the deadline: the receiver may have counted it
            └── NotSent           no connection: the request never left, the receiver cannot hold it
"""

from __future__ import annotations


class KztError(Exception):
    """Base of every error otel-kzt raises on purpose."""


class ConfigError(KztError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DatapathError(KztError):
    pass


class BccMissing(DatapathError):
    pass


class KernelUnsupported(DatapathError):
    pass


class PrivilegeError(DatapathError):
    pass


class ProgramLoadError(DatapathError):
    pass


class MetadataError(KztError):
    pass


class ReceiveError(KztError):
    pass


class InvalidRequest(ReceiveError):
    pass


class RequestTooLarge(ReceiveError):
    pass


class UnsupportedMediaType(ReceiveError):
    pass


class Overloaded(ReceiveError):
    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ExportError(KztError):
    pass


class PermanentExportError(ExportError):
    pass


class ReceiverTrustError(PermanentExportError):
    """The receiver's TLS certificate failed verification: retrying that receiver will not fix it (another
    receiver may still be tried)."""


class RetryableExportError(ExportError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoAnswer(RetryableExportError):
    """Sent, and no answer came before the deadline: the receiver may have counted it and answered late.
    The one failure after which a move begins new runs at the values sent (DESIGN §5.7). Any other
    failure is an answer that refused the request or a connection that broke before an answer: not counted."""


class NotSent(RetryableExportError):
    """No connection to the receiver could be made: the request never left this process, so the receiver
    cannot have counted it (any other failure may come after it did: a late answer, a reset)."""

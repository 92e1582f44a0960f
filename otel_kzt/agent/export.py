"""Sending one interval's requests: receiver choice, retries with backoff, and failover.

Receiver choice (scale-out of the enricher): `--otlp-endpoint` may list several endpoints, comma separated,
and each endpoint's host may be a DNS name that resolves to several addresses (a headless Service). The
candidates are ranked by rendezvous hashing (highest random weight) of `node name + candidate`, and the
agent writes everything to one receiver at a time. Why: the enricher turns each cumulative series into
increments and adds them up, so a series must have a single writer, one replica holding its state; an
agent that moves leaves its contribution behind on the replica it left (kept until that replica's series
TTL), and the sum over replicas counts it twice.

So the choice is sticky: the agent starts on its first-ranked receiver and stays on the receiver that
works. It moves only when that one fails (a retryable error or no answer): to the next candidate in
rendezvous order after it (wrapping around), skipping candidates that failed in the last `down_s`, which
are tried only when all others fail too. It does not move back when its first choice returns. Names are
re-resolved each interval; when the set of candidates changes, they are ranked again, but the agent stays
on its current receiver while that is still a candidate and works (a replica added later takes over only
new agents and those whose receiver went away). A permanent error is the receiver's answer about one
request, not a failure of the receiver: no move.

The choice survives a restart: every change of the current receiver is written to a `ReceiverStore`
(`otel_kzt.agent.state`: a small pinned BPF map of the node, next to the datapath's pins; none with
`--no-pin`), and a new process whose first candidates include the stored receiver starts on it instead of
its first-ranked one. A stored receiver that is no longer a candidate is ignored (first-ranked, as before).

A move begins new runs (DESIGN §5.7): the receiver the agent leaves counted its runs so far, and the one
it moves to must not count them again (it has never seen them, so it would count them whole). So nothing
of the old runs is sent to the new receiver: the export that would move stops before its first request,
says so (`ExportResult.switched`), and the service evicts every flow from the kernel map; their next
packets begin new flows, new runs, with starts after the move (kept by the kernel, so an agent restart
does not bring the old runs back). The new runs begin at the values last accepted by the old receiver, or
sent to it without an answer before the deadline (`NoAnswer`; `ExportResult.held` says it per request): a
request answered too late may have been counted, so what such a request held is not counted again (given
the choice, nothing counts twice). A refusal is an answer (not counted, OTLP's retryable), and a
connection that broke or never was (reset, refused) left no count behind: the new runs begin before those
values, nothing lost.
The receiver that holds the runs is remembered across restarts (`agent_state`): a new process that
cannot reach it moves the same way.

Retries: only what `otel_kzt.otlp_failures.classify` calls retryable is retried, with exponential backoff and
jitter, waiting at least the server's `RetryInfo` / `Retry-After`; permanent errors are logged and the
request dropped. An exception a transport raises that is no `ExportError` (a bug, or a failure nobody
translated) is what the enricher's exporter makes of it too, a transport failure with no status
(`classify(None, ...)`: retryable), logged once per kind (`otel_kzt.ratelog`). A receiver whose TLS
certificate fails verification is not retried either, but it is a failure of that receiver: the next one
is tried (and it counts as failed for the sticky choice).
Credentials: the CA bundle (`otlp_certificate`) and the bearer token file (`otlp_bearer_token_file`) are
re-read when they change (`otel_kzt.filewatch`); every transport is then rebuilt, so a cert-manager
rotation of the receiver's issuer or a rotated token takes effect at the next export, without a restart.

Nothing queues: an interval's retries end at its deadline (the next interval), and the
next interval's snapshot, which carries the cumulative totals, replaces what was not delivered.
"""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from otel_kzt.agent.config import GRPC, OtlpConfig
from otel_kzt.agent.state import ReceiverStore, StoredReceiver, receiver_id
from otel_kzt.agent.transport import GrpcTransport, HttpTransport, Target, Transport
from otel_kzt.errors import (
    ExportError,
    NoAnswer,
    PermanentExportError,
    ReceiverTrustError,
    RetryableExportError,
)
from otel_kzt.filewatch import WatchedFiles, token_text
from otel_kzt.otlp_failures import classify
from otel_kzt.ratelog import KindLog

log = logging.getLogger(__name__)

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
DOWN_S = 30.0

Resolver = Callable[[str, int], list[str]]
TransportFactory = Callable[[Target], Transport]


def resolve(host: str, port: int) -> list[str]:
    """Every address a host name resolves to (IP literals resolve to themselves)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def rendezvous_rank(node_name: str, candidates: Sequence[Target]) -> list[Target]:
    """Candidates, most preferred first, by highest random weight of (node, candidate)."""

    def weight(target: Target) -> bytes:
        return hashlib.blake2b(f"{node_name}\0{target.url}".encode(), digest_size=8).digest()

    return sorted(candidates, key=weight, reverse=True)


def expand(endpoints: Sequence[str], secure_default: bool, resolver: Resolver) -> list[Target]:
    """Endpoints -> targets; a name resolving to several addresses becomes one target per address."""
    targets: list[Target] = []
    for endpoint in endpoints:
        url = endpoint if "://" in endpoint else f"//{endpoint}"
        parsed = urllib.parse.urlsplit(url)
        host = parsed.hostname or ""
        secure = parsed.scheme == "https" or (parsed.scheme == "" and secure_default)
        port = parsed.port or (443 if secure and parsed.scheme else 4317)
        try:
            addresses = resolver(host, port)
        except OSError as exc:
            log.warning("cannot resolve receiver: host=%s error=%s", host, exc)
            addresses = []
        if len(addresses) <= 1:
            targets.append(Target(endpoint, host, secure))
            continue
        for address in addresses:
            netloc = f"[{address}]" if ":" in address else address
            netloc += f":{parsed.port}" if parsed.port else ""
            targets.append(Target(urllib.parse.urlunsplit(parsed._replace(netloc=netloc)), host, secure))
    return targets


@dataclass(slots=True)
class ExportResult:
    sent: int = 0  # requests accepted (possibly partially)
    failed: int = 0  # requests not delivered (permanent error or deadline)
    rejected_points: int = 0  # partial success
    switched: bool = False  # stopped to move to another receiver: the caller begins new runs first
    # Per request handed to export(), in order: whether a receiver may hold it (answered, or sent with no
    # answer in time: it may have counted its values). Requests not reached (after a switch) are not listed.
    held: list[bool] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        """Whether a receiver may hold any request of this export."""
        return any(self.held)


class Exporter:
    """Sends request bytes to the preferred reachable receiver; safe to `close()` twice."""

    def __init__(
        self,
        config: OtlpConfig,
        node_name: str,
        *,
        transport_factory: TransportFactory | None = None,
        resolver: Resolver = resolve,
        down_s: float = DOWN_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        store: ReceiverStore | None = None,
    ) -> None:
        self._config = config
        self._node = node_name
        self._resolver = resolver
        self._down_s = down_s
        self._max_backoff_s = max_backoff_s
        self._factory = transport_factory or self._default_factory
        self._transports: dict[Target, Transport] = {}
        self._down_until: dict[Target, float] = {}
        self._current: Target | None = None  # the receiver this agent writes to (sticky)
        self._stored = StoredReceiver(store)
        self._writer = self._stored.saved  # id of the receiver holding this agent's runs (None: none yet)
        self._ca = self._token = None
        if config.certificate:
            self._ca = WatchedFiles([config.certificate], _first, "otlp_certificate")
        if config.bearer_token_file:
            self._token = WatchedFiles([config.bearer_token_file], token_text, "otlp_bearer_token_file")
        self._credentials = self._current_credentials()
        self._lock = threading.Lock()
        self._untranslated = KindLog(log)

    def _current_credentials(self) -> tuple[bytes | None, str | None]:
        """(CA bundle, bearer token) as their files are now (re-read when they change)."""
        return (
            self._ca.current() if self._ca is not None else None,
            self._token.current() if self._token is not None else None,
        )

    def _refresh_credentials(self) -> None:
        """A rotated CA bundle or token: every transport is rebuilt with it (connections made anew)."""
        credentials = self._current_credentials()
        if credentials != self._credentials:
            log.info("receiver credentials changed (CA bundle or token file): reconnecting")
            self._credentials = credentials
            for transport in self._transports.values():
                transport.close()
            self._transports.clear()

    def _default_factory(self, target: Target) -> Transport:
        cfg = self._config
        ca, token = self._credentials
        headers = cfg.headers if token is None else (*cfg.headers, ("authorization", f"Bearer {token}"))
        if cfg.protocol == GRPC:
            return GrpcTransport(target, headers, cfg.compression, ca, reconnect_max_s=2.0)
        return HttpTransport(target, headers, cfg.compression, ca)

    @property
    def current(self) -> Target | None:
        """The receiver the agent writes to: where the last request was delivered, or before the first,
        the stored receiver it resumes on (None when neither)."""
        return self._current

    def ranked_targets(self) -> list[Target]:
        """This interval's candidates, in the order to try: the current receiver first, then the next ones
        in rendezvous order (wrapping around); recently failed ones last."""
        targets = rendezvous_rank(
            self._node, expand(self._config.endpoints, not self._config.insecure, self._resolver)
        )
        now = time.monotonic()
        for gone in set(self._transports) - set(targets):
            self._transports.pop(gone).close()
        if self._current is None:  # a new process: resume on the stored receiver if it is a candidate
            resumed = self._stored.resume([t.url for t in targets])
            self._current = next((t for t in targets if t.url == resumed), None)
        if self._current in targets:
            at = targets.index(self._current)
            targets = targets[at:] + targets[:at]
        elif self._current is not None:
            log.info("receiver no longer a candidate, choosing anew: endpoint=%s", self._current.url)
            self._current = None
        return sorted(targets, key=lambda t: self._down_until.get(t, 0.0) > now)  # stable: keeps the order

    def export(self, requests: Iterable[bytes], deadline: float, stop: threading.Event) -> ExportResult:
        """Deliver `requests` in order before the monotonic `deadline`, or until `stop` is set.

        A lazy iterable is consumed one request at a time, so one request is in memory at once."""
        result = ExportResult()
        with self._lock:
            self._refresh_credentials()
            targets = self.ranked_targets()
            for body in requests:
                result.held.append(False)  # set by _round once a receiver may hold it
                delivered = self._deliver(body, targets, deadline, stop, result)
                del body  # gone before the next one is built: one request (up to 3 MB) in memory, not two
                if result.switched:
                    break  # this and the rest hold the old runs: not for the new receiver
                if delivered:
                    result.sent += 1
                else:
                    result.failed += 1
        return result

    def _deliver(
        self, body: bytes, targets: list[Target], deadline: float, stop: threading.Event, result: ExportResult
    ) -> bool:
        attempt = 0
        while True:
            delivered, retry_after = self._round(body, targets, deadline, result)
            if delivered is not None:
                return delivered
            delay = max(retry_after, self._backoff(attempt))
            if time.monotonic() + delay >= deadline:
                log.error(
                    "export not delivered before the next interval; the next one carries the totals: "
                    "bytes=%d attempts=%d",
                    len(body),
                    attempt + 1,
                )
                return False
            log.info("export retry: attempt=%d delay_s=%.2f", attempt + 1, delay)
            if stop.wait(delay):
                return False
            attempt += 1

    def _round(
        self, body: bytes, targets: list[Target], deadline: float, result: ExportResult
    ) -> tuple[bool | None, float]:
        """One try of each target in order: (True, 0) delivered, (False, 0) given up, (None, the server's
        retry delay) worth retrying."""
        retry_after = 0.0
        retryable = False
        for target in list(targets):
            timeout = min(self._config.timeout_s, deadline - time.monotonic())
            if timeout <= 0:
                return None, retry_after  # out of time, not out of receivers: the caller's deadline ends it
            if self._writer is not None and receiver_id(target.url) != self._writer:
                self._delivered_to(target, targets)  # the receiver from now on: new runs go there
                result.switched = True
                return False, 0.0
            try:
                result.rejected_points += self._send(target, body, timeout)
            except ReceiverTrustError as exc:
                # About the receiver, not the request: not again this interval; another may be trusted.
                self._down_until[target] = time.monotonic() + self._down_s
                targets.remove(target)
                log.error("receiver not trusted: endpoint=%s error=%s", target.url, exc)
                continue
            except PermanentExportError as exc:
                log.error(
                    "export dropped (permanent): endpoint=%s bytes=%d error=%s", target.url, len(body), exc
                )
                return False, 0.0
            except RetryableExportError as exc:
                if isinstance(exc, NoAnswer):
                    result.held[-1] = True  # no answer in time: the receiver may have counted it
                    if self._writer is None:  # ... so it holds the runs: another one must begin new ones
                        self._writer = receiver_id(target.url)
                self._down_until[target] = time.monotonic() + self._down_s
                retryable = True
                retry_after = max(retry_after, exc.retry_after_s or 0.0)
                log.warning("export failed, trying next receiver: endpoint=%s error=%s", target.url, exc)
                continue
            result.held[-1] = True
            self._delivered_to(target, targets)
            return True, 0.0
        if not retryable:
            log.error("export dropped: no receiver is trusted (retrying will not fix a certificate)")
            return False, 0.0
        return None, retry_after

    def _send(self, target: Target, body: bytes, timeout: float) -> int:
        """One request to `target`: every failure as an ExportError (the one rule, otlp_failures)."""
        try:
            return self._transport(target).send(body, timeout)
        except ExportError:
            raise
        except Exception as exc:  # a transport bug or an exception nobody translated: a transport failure
            self._untranslated.error(exc, "export transport raised: endpoint=%s", target.url)
            raise classify(None, f"{type(exc).__name__}: {exc}") from exc

    def _delivered_to(self, target: Target, targets: list[Target]) -> None:
        """`target` works: it is the current receiver now, first for the rest of this interval."""
        self._down_until.pop(target, None)
        self._writer = receiver_id(target.url)
        if target != self._current:
            log.log(
                logging.INFO if self._current is None else logging.WARNING,
                "now writing to receiver: endpoint=%s previous=%s",
                target.url,
                self._current.url if self._current else None,
            )
            self._current = target
            self._stored.changed(target.url)  # persisted once per change, not per request
        targets.remove(target)
        targets.insert(0, target)

    def _backoff(self, attempt: int) -> float:
        # Jitter on an exponential ceiling: agents that lost the same receiver do not retry in step.
        ceiling = min(self._max_backoff_s, INITIAL_BACKOFF_S * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _transport(self, target: Target) -> Transport:
        transport = self._transports.get(target)
        if transport is None:
            transport = self._transports[target] = self._factory(target)
        return transport

    def close(self) -> None:
        with self._lock:
            for transport in self._transports.values():
                transport.close()
            self._transports.clear()


def _first(contents: tuple[bytes, ...]) -> bytes:
    return contents[0]

"""A steady request read from its bytes alone: the receivers' requests are not decoded by protobuf.

An agent's request differs from its previous one only in its points' times and values: its resource, scope
and metric headers are byte for byte what was decoded before, and each flow Sum fits its group's layout
(repeats.py, which checks it whole). Such a request is checked here piece by piece, as a decode would: every
container's fields inside its bounds and of the kinds OTLP defines; a resource, scope or flow-metric header
known from an earlier decode (or decoded alone now: each is small); a metric that is not a flow metric
(the agents' kzt.agent.* health) decoded alone. Then the core walks it with this `Plan` instead of the
decoded objects (the upb decode of the whole request cost ~10 ms of ~90 per 20k points in the enricher
process). Anything else (a new series, an odd shape, another field, bad bytes) is None: the core decodes
the request whole, which answers an undecodable one, and takes the object path.

The caches hold encoded pieces already checked; bounded (emptied when full: a cache, nothing is lost).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from otel_kzt import schema
from otel_kzt.enricher.processing.bounded import Cap
from otel_kzt.enricher.processing.points import Steady, SumEnricher
from otel_kzt.enricher.processing.protowire import read_varint

# Single-byte tags (field << 3 | 2) of the length-delimited fields a steady request holds.
_FIELD_1, _FIELD_2, _FIELD_3 = 0x0A, 0x12, 0x1A  # resource / scope / name, scope_metrics / metrics ...
_SUM: Final = 0x3A  # Metric.sum (field 7)
_METADATA: Final = 0x62  # Metric.metadata (field 12)
_HEADER_TAGS: Final = frozenset((_FIELD_1, _FIELD_2, _FIELD_3, _METADATA))  # name, description, unit
_MAX_CACHED: Final = 65_536  # per cache
# Resource attributes that name a sender (the rest, like service.version, may change across restarts).
AGENT_IDENTITY: Final = (schema.CLUSTER_NAME, schema.SERVICE_NAME, schema.RESOURCE_NODE_NAME)


class _NotSteady(Exception):
    """The request is not one this module walks: the core decodes it."""


def sender(resource: Resource, encoded: bytes) -> tuple[str | None, bytes]:
    """(node, series resource key) of a resource: an agent's series belong to the agent (cluster, service
    and node names), not to its whole resource (an upgraded agent, with a new service.version, carries on
    its cumulative sums); any other resource is keyed by its encoding."""
    identity = {kv.key: kv.value.string_value for kv in resource.attributes if kv.key in AGENT_IDENTITY}
    node = identity.get(schema.RESOURCE_NODE_NAME)
    if node:
        return node, "\0".join(identity.get(k, "") for k in AGENT_IDENTITY).encode()
    return None, encoded


@dataclass(frozen=True, slots=True)
class MetricPlan:
    """What the walk needs of one metric: its name, its points, and how it goes on (`steady`: a flow Sum
    read from its layout; `flow`: a kzt.flow.* metric to enrich; `refused`: one of the wrong kind)."""

    name: str
    points: int
    flow: bool = False
    refused: bool = False
    steady: Steady | None = None


@dataclass(frozen=True, slots=True)
class ResourcePlan:
    node: str | None
    key: bytes | None  # the series' resource key; None: the resource's encoding (read by the walk)
    metrics: Iterable[Metric]  # for the agents' health (AgentsHealth.observe)
    scopes: Iterable[Iterable[MetricPlan]]


Plan = list[ResourcePlan]
Part = tuple[bytes, int, int]  # a message inside the request's bytes: buffer, start, end


class Planner:
    """Plans steady requests; the caller holds the aggregates lock (the layouts are read)."""

    def __init__(self, points: SumEnricher) -> None:
        self._points = points
        self._resources: dict[bytes, tuple[str | None, bytes]] = {}
        self._scopes: set[bytes] = set()
        self._headers: dict[bytes, str] = {}  # a metric's fields but its Sum -> its name
        self._resources_cap = Cap("encoded.resources", _MAX_CACHED)
        self._scopes_cap = Cap("encoded.scopes", _MAX_CACHED)
        self._headers_cap = Cap("encoded.headers", _MAX_CACHED)
        self.caps = (self._resources_cap, self._scopes_cap, self._headers_cap)  # on /metrics
        self._generation = 0  # of the request being planned

    def plan(self, buf: bytes, generation: int) -> Plan | None:
        """The request's plan when it is steady (every flow Sum in its layout of `generation`), else None."""
        self._generation = generation
        try:
            plan = []
            for tag, _, body, end in _fields(buf, 0, len(buf)):
                if tag != _FIELD_1:
                    raise _NotSteady
                plan.append(self._resource((buf, body, end)))
            return plan
        except (_NotSteady, DecodeError, ValueError, IndexError):  # ValueError: bad UTF-8, a long varint
            return None

    def _resource(self, part: Part) -> ResourcePlan:
        buf, fields = part[0], _fields(*part)
        encoded = [buf[b:e] for tag, _, b, e in fields if tag == _FIELD_1]
        if len(encoded) > 1:  # a decode merges them
            raise _NotSteady
        resource = encoded[0] if encoded else b""
        known = self._resources.get(resource)
        if known is None:
            known = sender(Resource.FromString(resource), resource)
            self._resources_cap.room(self._resources)
            self._resources[resource] = known
        node, key = known
        metrics: list[Metric] = []
        scopes = []
        for tag, _, body, stop in fields:
            if tag == _FIELD_2:
                scopes.append(self._scope((buf, body, stop), key, metrics))
            elif tag == _FIELD_3:
                buf[body:stop].decode()  # schema_url: UTF-8, as a decode checks
            elif tag != _FIELD_1:
                raise _NotSteady
        return ResourcePlan(node, key, metrics, scopes)

    def _scope(self, part: Part, key: bytes, others: list[Metric]) -> list[MetricPlan]:
        buf, out, scopes = part[0], [], 0
        for tag, _, body, stop in _fields(*part):
            if tag == _FIELD_2:
                out.append(self._metric((buf, body, stop), key, others))
            elif tag == _FIELD_1:
                scopes += 1
                scope = buf[body:stop]
                if scope not in self._scopes:
                    InstrumentationScope.FromString(scope)
                    self._scopes_cap.room(self._scopes)
                    self._scopes.add(scope)
            elif tag == _FIELD_3:
                buf[body:stop].decode()
            else:
                raise _NotSteady
        if scopes > 1:
            raise _NotSteady
        return out

    def _metric(self, part: Part, key: bytes, others: list[Metric]) -> MetricPlan:
        buf, fields = part[0], _fields(*part)
        sums = [(b, e) for tag, _, b, e in fields if tag == _SUM]
        if len(sums) == 1 and all(tag in _HEADER_TAGS or tag == _SUM for tag, _, _, _ in fields):
            header = b"".join(buf[s:e] for tag, s, _, e in fields if tag != _SUM)
            name = self._headers.get(header)
            if name is None:
                self._headers_cap.room(self._headers)
                name = self._headers[header] = Metric.FromString(header).name
            if name in schema.FLOW_METRICS:
                steady = self._points.steady((buf, *sums[0]), (key, name), self._generation)
                if steady is None:
                    raise _NotSteady
                return MetricPlan(name, steady[0].points, flow=True, steady=steady)
        metric = Metric.FromString(buf[part[1] : part[2]])  # not a flow metric: decoded alone (small)
        if metric.name in schema.FLOW_METRICS:
            raise _NotSteady
        others.append(metric)
        return MetricPlan(metric.name, count_points(metric))


def count_points(metric: Metric) -> int:
    kind = metric.WhichOneof("data")
    return len(getattr(metric, kind).data_points) if kind else 0


def _fields(buf: bytes, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, start, payload start, end) of each field of the message at buf[pos:end]; only single-byte
    tags of length-delimited fields (all that a steady request's containers hold), each inside it."""
    # Not protowire.spans: that one walks any field of a trusted (decoded) message; this one is the check
    out = []
    while pos < end:
        start, tag = pos, buf[pos]
        if tag & 0x87 != 2:  # another wire type, or a tag of more than one byte
            raise _NotSteady
        size, body = read_varint(buf, pos + 1)
        pos = body + size
        if pos > end:
            raise _NotSteady
        out.append((tag, start, body, pos))
    return out

"""The zone-routing setting a cluster accepts, as the report names it and as kubectl applies it.

Which setting a version accepts is `ClusterVersion.zone_routing` (otel_kzt.k8s.servicemodel, one place for
that rule); a cluster whose version is unknown (a file source) is taken to be current: PreferSameZone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from otel_kzt import schema
from otel_kzt.k8s.servicemodel import ClusterVersion, ZoneRouting

_ANNOTATION_FIELD: Final = "metadata.annotations"


@dataclass(frozen=True, slots=True)
class Setting:
    """A routing setting: the Service field or annotation to set, and the value."""

    routing: ZoneRouting

    @property
    def name(self) -> str:
        """What the report calls it: `PreferSameZone`, `PreferClose`, `topology-mode: Auto` ..."""
        if self.is_annotation:
            return f"{self.routing.key.rsplit('/', 1)[-1]}: {self.routing.value}"
        return self.routing.value

    @property
    def is_annotation(self) -> bool:
        return self.routing.field == _ANNOTATION_FIELD

    @property
    def routing_label(self) -> str:
        """What the Service's `kzt_service_routing_info` label reads once it is set."""
        return schema.ROUTING_TOPOLOGY_AWARE if self.is_annotation else self.routing.value

    def kubectl(self, namespace: str, name: str) -> str:
        """The command that applies it."""
        if self.is_annotation:
            return f"kubectl -n {namespace} annotate service {name} {self.routing.key}={self.routing.value}"
        patch = json.dumps({"spec": {self.routing.key: self.routing.value}}, separators=(",", ":"))
        return f"kubectl -n {namespace} patch service {name} -p '{patch}'"


CURRENT: Final = Setting(
    ZoneRouting("spec.trafficDistribution", "trafficDistribution", schema.ROUTING_PREFER_SAME_ZONE)
)


def setting_for(version: ClusterVersion | None) -> Setting:
    """The setting to recommend on this cluster."""
    return CURRENT if version is None else Setting(version.zone_routing())


def version_note(version: ClusterVersion | None) -> str:
    """What the report says about the choice."""
    setting = setting_for(version)
    if version is None:
        return f"cluster version unknown: {setting.name} needs 1.34 or later (PreferClose on 1.31 to 1.33)"
    return f"Kubernetes {version.major}.{version.minor} accepts {setting.name}"


_KNOWN: Final = (CURRENT, *(setting_for(ClusterVersion(1, minor, "")) for minor in (31, 27, 26)))


def setting_named(name: str) -> Setting:
    """The setting a report names (`kzt_savings_info{setting}`); the current one for an unknown name."""
    return next((s for s in _KNOWN if s.name == name), CURRENT)

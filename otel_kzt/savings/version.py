"""Which zone-routing setting a cluster's Kubernetes version accepts, and how to apply it.

Release history (Kubernetes enhancement proposals 2433, 4444 and 3015):
- `spec.trafficDistribution: PreferSameZone`: alpha in 1.33, beta (on by default) in 1.34, GA in 1.35;
- `spec.trafficDistribution: PreferClose`: beta (on by default) in 1.31, GA in 1.33, now an older name;
- annotation `service.kubernetes.io/topology-mode: Auto`: 1.27 on;
- annotation `service.kubernetes.io/topology-aware-hints: auto`: beta (on by default) 1.23 to 1.26.
Older clusters have no zone routing for Services at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from otel_kzt.savings.model import Routing

ANNOTATION_TOPOLOGY_MODE: Final = "service.kubernetes.io/topology-mode"
ANNOTATION_TOPOLOGY_HINTS: Final = "service.kubernetes.io/topology-aware-hints"
_VERSION: Final = re.compile(r"^v?(\d+)\.(\d+)")

Version = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Setting:
    """A routing setting: the Service field or annotation to set, and the value."""

    name: str  # what the report calls it: "PreferSameZone", "PreferClose", "topology-mode: Auto"
    field: str  # "spec.trafficDistribution" or the annotation key
    value: str
    routing: Routing  # what the Service's routing reads as once it is set

    @property
    def is_annotation(self) -> bool:
        return self.field.startswith("service.kubernetes.io/")

    def kubectl(self, namespace: str, name: str) -> str:
        """The command that applies it."""
        if self.is_annotation:
            return f"kubectl -n {namespace} annotate service {name} {self.field}={self.value}"
        patch = json.dumps({"spec": {"trafficDistribution": self.value}}, separators=(",", ":"))
        return f"kubectl -n {namespace} patch service {name} -p '{patch}'"


PREFER_SAME_ZONE: Final = Setting(
    "PreferSameZone", "spec.trafficDistribution", "PreferSameZone", Routing.PREFER_SAME_ZONE
)
PREFER_CLOSE: Final = Setting("PreferClose", "spec.trafficDistribution", "PreferClose", Routing.PREFER_CLOSE)
TOPOLOGY_MODE: Final = Setting(
    "topology-mode: Auto", ANNOTATION_TOPOLOGY_MODE, "Auto", Routing.TOPOLOGY_AWARE
)
TOPOLOGY_HINTS: Final = Setting(
    "topology-aware-hints: auto", ANNOTATION_TOPOLOGY_HINTS, "auto", Routing.TOPOLOGY_AWARE
)
_BY_VERSION: Final = ((34, PREFER_SAME_ZONE), (31, PREFER_CLOSE), (27, TOPOLOGY_MODE), (23, TOPOLOGY_HINTS))


def parse_version(text: str | None) -> Version | None:
    """`v1.34.2`, `1.31`, `v1.30.4-eks-a737599` -> (major, minor); None when it is not a version."""
    match = _VERSION.match((text or "").strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def setting_for(version: Version | None) -> Setting | None:
    """The newest setting the version accepts by default; an unknown version gets the current one."""
    if version is None:
        return PREFER_SAME_ZONE
    major, minor = version
    if major > 1:
        return PREFER_SAME_ZONE
    for since, setting in _BY_VERSION:
        if minor >= since:
            return setting
    return None


def version_note(version: Version | None, setting: Setting | None) -> str:
    """What the report says about the choice."""
    if setting is None:
        return "Kubernetes before 1.23 has no zone routing for Services"
    if version is None:
        return f"cluster version unknown: {setting.name} needs 1.34 or later (PreferClose on 1.31 to 1.33)"
    return f"Kubernetes {version[0]}.{version[1]} accepts {setting.name}"

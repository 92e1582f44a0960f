from __future__ import annotations

from otel_kzt import schema


def test_end_attributes_follow_design() -> None:
    assert schema.SOURCE_POD_NAME == "source.k8s.pod.name"
    assert schema.DESTINATION_ZONE == "destination.cloud.availability_zone"
    assert schema.end_attr(schema.DESTINATION, schema.WORKLOAD_KIND) == "destination.k8s.workload.kind"


def test_prometheus_label_translation() -> None:
    assert schema.prom_label("source.cloud.availability_zone") == "source_cloud_availability_zone"
    assert schema.PROM_ZONE_TRAFFIC_LABELS == (
        "source_cloud_availability_zone",
        "destination_cloud_availability_zone",
    )


def test_transport_names() -> None:
    assert [schema.transport_name(p) for p in (6, 17, 1, 58, 132, 47)] == [
        "tcp", "udp", "icmp", "icmp", "sctp", "47",
    ]


def test_traffic_classes_are_the_designed_set() -> None:
    assert {c.value for c in schema.TrafficClass} == {
        "same-node", "same-zone", "cross-zone", "cross-region", "external", "unknown",
    }

"""Item-by-item parsing of List documents gives exactly what a whole-document parse gives, in every layout."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from otel_kzt.errors import MetadataError
from otel_kzt.k8s.listparse import iter_objects
from tests.support.k8s_objects import as_list, fresh

NAMES = ["node-eks", "node-dualstack-nozone", "pod-deployment", "pod-cronjob", "pod-dualstack-bare"]


def objects() -> list[dict[str, Any]]:
    return [fresh(name) for name in NAMES]


def kinds_and_names(text: str) -> list[tuple[str, str]]:
    return [(kind, obj["metadata"]["name"]) for kind, obj in iter_objects(text)]


EXPECTED = [(obj["kind"], obj["metadata"]["name"]) for obj in objects()]


@pytest.mark.parametrize(
    "render",
    [
        json.dumps,
        lambda data: json.dumps(data, indent=4),
        yaml.safe_dump,  # kubectl's layout: `items:` then `- ` at column 0
        lambda data: yaml.safe_dump(data, default_flow_style=None, width=60),
        lambda data: "# kubectl get nodes,pods -A -o yaml\n" + yaml.safe_dump(data),
    ],
)
def test_list_layouts(render: Any) -> None:
    text = render(as_list(objects()))
    assert kinds_and_names(text) == EXPECTED
    parsed = [obj for _, obj in iter_objects(text)]
    assert parsed == objects()  # every field survives, not only the names


def test_kubectl_layouts_never_parse_the_whole_document(monkeypatch: pytest.MonkeyPatch) -> None:
    def whole(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("whole-document parse used")

    monkeypatch.setattr("otel_kzt.k8s.listparse.yaml.load_all", whole)
    monkeypatch.setattr("otel_kzt.k8s.listparse.json.loads", whole)
    assert kinds_and_names(yaml.safe_dump(as_list(objects()))) == EXPECTED
    assert kinds_and_names(json.dumps(as_list(objects()), indent=4)) == EXPECTED


def test_yaml_indented_sequence_falls_back_to_a_whole_parse() -> None:
    text = yaml.dump(as_list(objects()), Dumper=_IndentedDumper)
    assert "\n  - " in text
    assert kinds_and_names(text) == EXPECTED


class _IndentedDumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def test_typed_lists_imply_the_kind_wherever_it_comes() -> None:
    pods = [{k: v for k, v in fresh("pod-statefulset").items() if k != "kind"}]
    # `kind` after `items` (sorted keys, as kubectl prints JSON) and before it
    after = '{"apiVersion": "v1", "items": ' + json.dumps(pods) + ', "kind": "PodList", "metadata": {}}'
    before = '{"kind": "PodList", "items": ' + json.dumps(pods) + "}"
    for text in (after, before, yaml.safe_dump({"kind": "PodList", "items": pods})):
        assert kinds_and_names(text) == [("Pod", "postgres-1")]


def test_bare_objects_arrays_and_documents() -> None:
    node = fresh("node-aks")
    assert kinds_and_names(json.dumps(node)) == [("Node", node["metadata"]["name"])]
    assert kinds_and_names(json.dumps([node])) == [("Node", node["metadata"]["name"])]
    text = yaml.safe_dump(node) + "---\n" + yaml.safe_dump(as_list([fresh("pod-deployment")]))
    assert kinds_and_names(text) == [("Node", node["metadata"]["name"]), ("Pod", "checkout-6d5f9c7b8d-q2x7v")]
    assert kinds_and_names("") == []
    assert kinds_and_names('{"kind": "List", "items": []}') == []


def test_block_scalars_with_dashes_stay_inside_their_item() -> None:
    pod = fresh("pod-deployment")
    pod["metadata"]["annotations"]["notes"] = "line one\n- not an item\n  - nor this\n"
    text = yaml.safe_dump(as_list([pod, fresh("node-eks")]), default_style=None)
    parsed = [obj for _, obj in iter_objects(text)]
    assert parsed[0]["metadata"]["annotations"]["notes"] == "line one\n- not an item\n  - nor this\n"
    assert len(parsed) == 2


@pytest.mark.parametrize(
    "text",
    ['{"kind": "List", "items": [{"a": 1}', '{"kind" "List"}', "items:\n- a: [1, 2\n", "{"],
)
def test_broken_documents_are_metadata_errors(text: str) -> None:
    with pytest.raises(MetadataError, match="not valid YAML or JSON"):
        list(iter_objects(text, "cluster.yaml"))

"""The committed CRD is generated from the spec model, and its schema is structural and complete."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api.crd import render_crd_yaml, render_reference_markdown
from finetune_operator.api.naming import MAX_JOB_NAME_LENGTH, MAX_NODES, worker_name
from finetune_operator.api.spec import FinetuneJob
from finetune_operator.api.validation import defaulted

from tests.manifests import minimal_manifest

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = ROOT / "crds" / "finetunejob.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

MINIMAL = minimal_manifest("minimal", "ml")


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def root_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(schema: dict[str, Any], path: str = ""):
    yield path, schema
    for key, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}.*")


def test_committed_crd_is_generated_from_the_model() -> None:
    assert CRD_PATH.read_text() == render_crd_yaml(), "crds/ is stale: run `make crd` and commit the result"


def test_committed_field_reference_is_generated_from_the_model() -> None:
    reference = ROOT / "docs" / "reference.md"
    assert reference.read_text() == render_reference_markdown(), "docs/reference.md is stale: run `make crd`"


def test_names_scope_and_subresources(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["group"] == "finetune.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FinetuneJob",
        "listKind": "FinetuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["ml"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Progress": ".status.progress.percent",
        "Step": ".status.progress.step",
        "Eval-Loss": ".status.metrics.evalLoss",
        "Base-Eval-Loss": ".status.baseMetrics.evalLoss",
        "Answer-Acc": ".status.metrics.answerAccuracy",
        "Base-Answer-Acc": ".status.baseMetrics.answerAccuracy",
        "Age": ".metadata.creationTimestamp",
    }
    # The base model's columns only with `kubectl get -o wide`: the default view stays five columns.
    wide = {c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) > 0}
    assert wide == {"Base-Eval-Loss", "Answer-Acc", "Base-Answer-Acc"}


def test_every_spec_and_status_field_is_described(root_schema: dict[str, Any]) -> None:
    for part in ("spec", "status"):
        undocumented = [
            path
            for path, node in _walk(root_schema["properties"][part], part)
            if not path.endswith(("[]", ".*")) and not node.get("description")
        ]
        assert undocumented == []


def test_schema_is_structural(root_schema: dict[str, Any]) -> None:
    """Every node has a type (or is int-or-string / preserves unknown fields), and nothing uses $ref."""
    for path, node in _walk(root_schema):
        assert "$ref" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if node["type"] == "object" and "properties" in node:
            assert "additionalProperties" not in node, path


def test_every_string_list_and_map_in_spec_is_bounded(root_schema: dict[str, Any]) -> None:
    """CEL cost estimation needs bounds: unbounded strings or lists can make the API server refuse the CRD."""
    unbounded = []
    for path, node in _walk(root_schema["properties"]["spec"], "spec"):
        kind = node.get("type")
        if kind == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if kind == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind == "object" and "properties" not in node and "maxProperties" not in node:
            unbounded.append(path)
    assert unbounded == []


def _apply_crd_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server's structural defaulting does: fill absent properties from `default`, deeply."""
    if isinstance(value, dict) and "properties" in schema:
        for key, child in schema["properties"].items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = _apply_crd_defaults(child, value[key])
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_crd_defaults(schema["items"], item) for item in value]
    return value


def _without_empty(value: Any) -> Any:
    """Empty maps and lists are the model's way of saying 'absent'; the CRD leaves them out."""
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


@pytest.mark.parametrize(
    "manifest",
    [pytest.param(MINIMAL, id="minimal")]
    + [pytest.param(yaml.safe_load(path.read_text()), id=path.stem) for path in EXAMPLES],
)
def test_crd_defaults_equal_model_defaults(root_schema: dict[str, Any], manifest: dict[str, Any]) -> None:
    by_api_server = _apply_crd_defaults(root_schema, copy.deepcopy(manifest))
    by_model = defaulted(FinetuneJob.model_validate(manifest))
    assert _without_empty(by_api_server) == _without_empty(by_model)


def test_minimal_manifest_gets_the_documented_defaults() -> None:
    spec = defaulted(FinetuneJob.model_validate(MINIMAL))["spec"]
    assert spec["dataset"]["format"] == "chat"
    assert spec["dataset"]["maxSeqLength"] == 2048
    assert spec["method"] == {"type": "lora"}
    hp = spec["hyperparameters"]
    assert "epochs" not in hp and "maxSteps" not in hp
    assert (hp["learningRate"], hp["batchSizePerDevice"], hp["gradientAccumulationSteps"]) == (2e-4, 4, 1)
    assert hp["precision"] == "bf16"
    assert spec["deepspeed"]["zeroStage"] == 2
    assert (spec["resources"]["nodes"], spec["resources"]["gpusPerNode"]) == (1, 1)
    assert (spec["output"]["checkpointEverySteps"], spec["output"]["keepCheckpoints"]) == (500, 3)
    assert spec["evaluation"]["everySteps"] == 200
    assert spec["runPolicy"]["backoffLimit"] == 3


def test_name_limit_keeps_every_child_name_a_dns_label() -> None:
    longest = worker_name("a" * MAX_JOB_NAME_LENGTH, MAX_NODES - 1)
    assert len(longest) == 63
    assert len(worker_name("a" * (MAX_JOB_NAME_LENGTH + 1), MAX_NODES - 1)) > 63

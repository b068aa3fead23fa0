"""No wrong accepts in the spec's own fields: `finetune validate` refuses, by field, value and message, what
Kubernetes, S3 or a datetime would refuse later; and the CRD says the same to the API server.

Each row of CASES is BASE (tests/test_validate.py) with one mistake: NaN or Infinity in any number, in
free-form ``deepspeed.config`` and in ``affinity``; ``affinity``, ``tolerations`` and ``nodeSelector`` as
Kubernetes validates them (Kubernetes' own schema for Affinity, embedded in the CRD); S3 bucket names as
S3 defines them; control and bidirectional-override characters in URIs; credentials in
``storage.endpoint``; time limits a datetime cannot hold. The CRD rows check the committed CRD's schema
(SCHEMA rows) or its CEL rules (CEL rows) reject each mistake at the same field; tests/test_apiserver.py
sends every row to the real API server.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from finetune_operator.api.cel import evaluate_rules
from finetune_operator.api.kube_schemas import (
    AFFINITY_DEFINITION,
    TOLERATION_DEFINITION,
    derive_schema,
    load_definitions,
    render_generated_module,
    schema_problems,
)
from finetune_operator.api.kube_schemas_generated import AFFINITY_SCHEMA
from finetune_operator.api.spec import FinetuneJob, FiniteNumbers
from finetune_operator.api.validation import InvalidManifestError, defaulted, dotted, parse_finetune_job
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from tests.test_validate import (
    BASE,
    CRD_PATH,
    Mutation,
    _parts,
    sections,
    validate,
    with_field,
    write,
)

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "operator" / "src" / "finetune_operator" / "api" / "kube_schemas_generated.py"

NAN, INF = math.nan, math.inf
# Row categories: what in the CRD refuses the mistake.
SCHEMA = "schema"  # the openAPIV3Schema (type, bound, pattern, enum, required)
CEL = "cel"  # an x-kubernetes-validations rule
UNKNOWN = "unknown"  # strict field validation (unknown fields), which jsonschema does not model here
NOT_JSON = "not-json"  # NaN and Infinity: JSON cannot carry them, the API server's decoder refuses them

POOL_IN = {"key": "pool", "operator": "In", "values": ["a100"]}
NODE_AFFINITY = {
    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [POOL_IN]}
    ]}}
}  # fmt: skip
POD_ANTI_AFFINITY = {
    "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "trainer"}},
        }}
    ]}
}  # fmt: skip


def with_affinity_field(path: str, value: Any) -> Mutation:
    """POD_ANTI_AFFINITY with ``path`` (under its first preferred term) set to ``value``."""
    affinity = copy.deepcopy(POD_ANTI_AFFINITY)
    term = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    *parents, last = _parts(path)
    holder: Any = term
    for part in parents:
        holder = holder[part]
    holder[last] = value
    return with_field("spec.resources.affinity", affinity)


def with_toleration(**fields: Any) -> Mutation:
    return with_field("spec.resources.tolerations", [fields])


TEN_YEARS = 315_360_000
LONG_PREFIX_KEY = "a" * 254 + "/pool"

# NaN and Infinity, in typed numbers, in free-form deepspeed.config and in affinity: for objects (from
# Python or another decoder); YAML's .nan and .inf are refused by `finetune validate`'s loader already.
NON_FINITE = [
    pytest.param(with_field("spec.hyperparameters.learningRate", NAN), "spec.hyperparameters.learningRate",
                 ["got NaN", "must be a finite number"], NOT_JSON, id="nan-learning-rate"),
    pytest.param(with_field("spec.method.lora.alpha", INF), "spec.method.lora.alpha",
                 ["got Infinity", "must be a finite number"], NOT_JSON, id="infinite-lora-alpha"),
    pytest.param(with_field("spec.hyperparameters.weightDecay", -INF), "spec.hyperparameters.weightDecay",
                 ["got -Infinity", "must be a finite number"], NOT_JSON, id="minus-infinity-weight-decay"),
    pytest.param(with_field("spec.deepspeed.config", {"zero_optimization": {"reduce_bucket_size": NAN}}),
                 "spec.deepspeed.config",
                 ["must hold only finite numbers, not NaN or Infinity: zero_optimization.reduce_bucket_size "
                  "is NaN"], NOT_JSON, id="nan-in-deepspeed-config"),
    pytest.param(with_field("spec.deepspeed.config", {"optimizer": {"params": {"betas": [0.9, INF]}}}),
                 "spec.deepspeed.config", ["optimizer.params.betas[1] is Infinity"], NOT_JSON,
                 id="infinity-in-deepspeed-config-list"),
    pytest.param(with_affinity_field("weight", INF), "spec.resources.affinity",
                 ["podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight is Infinity"],
                 NOT_JSON, id="infinity-in-affinity"),
]  # fmt: skip

CASES = [
    # affinity: Kubernetes' own schema of core/v1 Affinity.
    pytest.param(with_field("spec.resources.affinity", {"nodeAffinity": {"x": 1}}), "spec.resources.affinity",
                 ["nodeAffinity.x: unknown field", "requiredDuringSchedulingIgnoredDuringExecution"], UNKNOWN,
                 id="affinity-unknown-field"),
    pytest.param(with_field("spec.resources.affinity", {"nodeAfinity": {}}), "spec.resources.affinity",
                 ["nodeAfinity: unknown field", "nodeAffinity, podAffinity, podAntiAffinity"], UNKNOWN,
                 id="affinity-misspelt"),
    pytest.param(with_affinity_field("weight", 101), "spec.resources.affinity",
                 ["preferredDuringSchedulingIgnoredDuringExecution[0].weight: got 101; must be at most 100"],
                 SCHEMA, id="affinity-weight-101"),
    pytest.param(with_affinity_field("weight", "50"), "spec.resources.affinity",
                 ['[0].weight: got "50"; must be an integer'], SCHEMA, id="affinity-weight-string"),
    pytest.param(with_affinity_field("podAffinityTerm", {"labelSelector": {}}), "spec.resources.affinity",
                 ["[0].podAffinityTerm.topologyKey: required field is missing"], SCHEMA,
                 id="affinity-no-topology-key"),
    pytest.param(with_affinity_field("podAffinityTerm.topologyKey", "host name"), "spec.resources.affinity",
                 ['topologyKey: got "host name"; must be a label key'], SCHEMA,
                 id="affinity-topology-key-syntax"),
    pytest.param(with_affinity_field("podAffinityTerm.labelSelector",
                                     {"matchExpressions": [{"key": "app", "operator": "Has"}]}),
                 "spec.resources.affinity",
                 ['operator: got "Has"; must be one of In, NotIn, Exists, DoesNotExist'], SCHEMA,
                 id="affinity-label-operator"),
    pytest.param(with_affinity_field("podAffinityTerm.labelSelector.matchLabels", {"app": "a b"}),
                 "spec.resources.affinity", ['matchLabels.app: got "a b"; must be empty, or at most 63'],
                 SCHEMA, id="affinity-label-value"),
    pytest.param(with_affinity_field("podAffinityTerm.labelSelector.matchLabels", {"app name": "a"}),
                 "spec.resources.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]"
                 ".podAffinityTerm.labelSelector.matchLabels",
                 ['got {"app name": "a"}', "matchLabels keys must be a label key"], CEL,
                 id="affinity-label-key"),
    pytest.param(with_field("spec.resources.affinity", {"nodeAffinity": {
                     "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [None]}}}),
                 "spec.resources.affinity", ["nodeSelectorTerms[0]: got null; must be a mapping"], SCHEMA,
                 id="affinity-null-term"),
    # tolerations: as Kubernetes validates a pod's.
    pytest.param(with_toleration(key="gpu", operator="Exists", value="a100"),
                 "spec.resources.tolerations[0].value",
                 ['got "a100"', "must be empty when operator is Exists"], CEL, id="toleration-exists-value"),
    pytest.param(with_toleration(key="gpu", effect="NoSchedule", tolerationSeconds=60),
                 "spec.resources.tolerations[0].tolerationSeconds",
                 ["got 60", "tolerationSeconds needs effect NoExecute"],
                 CEL, id="toleration-seconds-no-schedule"),
    pytest.param(with_toleration(operator="Equal", value="x"), "spec.resources.tolerations[0].operator",
                 ['got "Equal"', "empty key matches every taint and needs operator Exists"], CEL,
                 id="toleration-empty-key-equal"),
    pytest.param(with_toleration(key="nvidia com/gpu"), "spec.resources.tolerations[0].key",
                 ['got "nvidia com/gpu"', "must be empty, or a label key"],
                 SCHEMA, id="toleration-key-syntax"),
    pytest.param(with_toleration(key="gpu", value="a/b"), "spec.resources.tolerations[0].value",
                 ['got "a/b"', "must be empty, or at most 63 letters"], SCHEMA, id="toleration-value-syntax"),
    pytest.param(with_toleration(key=LONG_PREFIX_KEY), "spec.resources.tolerations[0].key",
                 ["prefix before '/' of at most 253 characters"], CEL, id="toleration-key-long-prefix"),
    pytest.param(with_toleration(key="gpu", effect="NoExecute", tolerationSeconds=10**12),
                 "spec.resources.tolerations[0].tolerationSeconds",
                 ["got 1000000000000", f"must be less than or equal to {TEN_YEARS}"], SCHEMA,
                 id="toleration-seconds-beyond-ten-years"),
    # nodeSelector: label keys and values.
    pytest.param(with_field("spec.resources.nodeSelector", {"gpu pool": "a100"}),
                 "spec.resources.nodeSelector",
                 ['got {"gpu pool": "a100"}', "spec.resources.nodeSelector keys must be a label key"], CEL,
                 id="node-selector-key-space"),
    pytest.param(with_field("spec.resources.nodeSelector", {"example.com/": "a100"}),
                 "spec.resources.nodeSelector", ["keys must be a label key"], CEL,
                 id="node-selector-key-empty"),
    pytest.param(with_field("spec.resources.nodeSelector", {"pool": "a 100"}),
                 "spec.resources.nodeSelector.pool",
                 ['got "a 100"', "must be empty, or at most 63 letters"], SCHEMA, id="node-selector-value"),
    # S3 bucket names as S3 defines them.
    pytest.param(with_field("spec.model.uri", "s3://a..b/llama/"), "spec.model.uri",
                 ['got "s3://a..b/llama/"', "no '..', '.-' or '-.'"], SCHEMA, id="bucket-two-dots"),
    pytest.param(with_field("spec.output.uri", "s3://a.-b/out/"), "spec.output.uri",
                 ['got "s3://a.-b/out/"', "an S3 location"], SCHEMA, id="bucket-dot-dash"),
    pytest.param(with_field("spec.output.uri", "s3://a-.b/out/"), "spec.output.uri",
                 ['got "s3://a-.b/out/"', "starting and ending with a letter or digit"], SCHEMA,
                 id="bucket-dash-dot"),
    pytest.param(with_field("spec.output.uri", "s3://bucket-/out/"), "spec.output.uri",
                 ['got "s3://bucket-/out/"', "an S3 location"], SCHEMA, id="bucket-trailing-dash"),
    pytest.param(with_field("spec.dataset.train", "s3://192.168.5.4/train.jsonl"), "spec.dataset.train",
                 ['got "s3://192.168.5.4/train.jsonl"', "must not be an IP address such as 192.168.5.4"], CEL,
                 id="bucket-ip-address"),
    pytest.param(with_field("spec.model.uri", "s3://ab/llama/"), "spec.model.uri",
                 ['got "s3://ab/llama/"', "must be 3 to 63 characters long"], CEL, id="bucket-2-characters"),
    pytest.param(with_field("spec.model.uri", f"s3://{'b' * 64}/llama/"), "spec.model.uri",
                 ["must be 3 to 63 characters long"], CEL, id="bucket-64-characters"),
    pytest.param(with_field("spec.model.uri", "s3://xn--bucket/llama/"), "spec.model.uri",
                 ["must not start with xn-- or sthree-"], CEL, id="bucket-xn-prefix"),
    pytest.param(with_field("spec.model.uri", "s3://sthree-bucket/llama/"), "spec.model.uri",
                 ["must not start with xn-- or sthree-"], CEL, id="bucket-sthree-prefix"),
    pytest.param(with_field("spec.output.uri", "s3://bucket-s3alias/out/"), "spec.output.uri",
                 ["must not end in -s3alias or --ol-s3"], CEL, id="bucket-s3alias-suffix"),
    pytest.param(with_field("spec.output.uri", "s3://bucket--ol-s3"), "spec.output.uri",
                 ["must not end in -s3alias or --ol-s3"], CEL, id="bucket-ol-s3-suffix"),
    # No control or bidirectional-override characters in any URI.
    pytest.param(with_field("spec.dataset.train", "s3://datasets/chat/\u202etxt.jsonl"), "spec.dataset.train",
                 ["must not contain control characters or bidirectional overrides"], CEL,
                 id="uri-right-to-left-override"),
    pytest.param(with_field("spec.output.uri", "s3://checkpoints/a\u2066b/"), "spec.output.uri",
                 ["must not contain control characters"], CEL, id="uri-isolate"),
    pytest.param(with_field("spec.model.uri", "s3://models/a\x01b/"), "spec.model.uri",
                 ["must not contain control characters"], CEL, id="uri-c0-control"),
    pytest.param(with_field("spec.model.uri", "s3://models/a\x85b/"), "spec.model.uri",
                 ["must not contain control characters"], CEL, id="uri-c1-control"),
    pytest.param(with_field("spec.storage.endpoint", "http://minio:9000/\u202e"), "spec.storage.endpoint",
                 ["must not contain control characters or bidirectional overrides"], CEL,
                 id="endpoint-bidi"),
    # Credentials in the endpoint would land in a ConfigMap.
    pytest.param(with_field("spec.storage.endpoint", "http://user:secret@minio:9000"),
                 "spec.storage.endpoint",
                 ['got "http://user:secret@minio:9000"',
                  "would land in a ConfigMap; use storage.credentialsSecret"],
                 SCHEMA, id="endpoint-credentials"),
    pytest.param(with_field("spec.storage.endpoint", "https://key@minio"), "spec.storage.endpoint",
                 ["without user:password@"], SCHEMA, id="endpoint-user"),
    # Time limits a datetime can hold (10 years), and no integer beyond int64.
    pytest.param(with_field("spec.runPolicy.activeDeadlineSeconds", 10**12),
                 "spec.runPolicy.activeDeadlineSeconds",
                 ["got 1000000000000", f"must be less than or equal to {TEN_YEARS}"], SCHEMA,
                 id="active-deadline-10e12"),
    pytest.param(with_field("spec.runPolicy.ttlSecondsAfterFinished", 10**12),
                 "spec.runPolicy.ttlSecondsAfterFinished",
                 ["got 1000000000000", f"must be less than or equal to {TEN_YEARS}"], SCHEMA, id="ttl-10e12"),
    pytest.param(with_field("spec.runPolicy.stallTimeoutSeconds", 10**12),
                 "spec.runPolicy.stallTimeoutSeconds",
                 ["must be less than or equal to 604800"], SCHEMA, id="stall-timeout-10e12"),
    pytest.param(with_field("spec.output.checkpointEverySteps", 2**62), "spec.output.checkpointEverySteps",
                 [f"got {2**62}", "must be less than or equal to 100000000"],
                 SCHEMA, id="checkpoint-every-2e62"),
    pytest.param(with_field("spec.evaluation.everySteps", 10**9), "spec.evaluation.everySteps",
                 ["must be less than or equal to 100000000"], SCHEMA, id="eval-every-10e9"),
    pytest.param(with_field("spec.resources.memory", 10**18 + 1), "spec.resources.memory",
                 [f"must be less than or equal to {10**18}"], SCHEMA, id="memory-beyond-10e18"),
]  # fmt: skip

# Valid variants: what looks odd but Kubernetes and S3 accept.
ACCEPTED = [
    pytest.param(with_field("spec.resources.affinity", NODE_AFFINITY), id="node-affinity"),
    pytest.param(with_field("spec.resources.affinity", POD_ANTI_AFFINITY), id="pod-anti-affinity"),
    pytest.param(with_field("spec.resources.affinity", {"nodeAffinity": None}), id="affinity-null-member"),
    pytest.param(with_toleration(operator="Exists"), id="toleration-every-taint"),
    pytest.param(with_toleration(key="example.com/gpu", effect="NoExecute", tolerationSeconds=TEN_YEARS),
                 id="toleration-seconds-ten-years"),
    pytest.param(with_field("spec.resources.nodeSelector", {"example.com/pool": "a100", "tier": ""}),
                 id="node-selector-prefixed-key"),
    pytest.param(with_field("spec.model.uri", "s3://my.bucket-1.example/llama/"), id="bucket-dots-dashes"),
    pytest.param(with_field("spec.model.uri", f"s3://{'b' * 63}/llama/"), id="bucket-63-characters"),
    pytest.param(with_field("spec.model.uri", "s3://192.168.5.bucket/llama/"), id="bucket-not-quite-ip"),
    pytest.param(with_field("spec.storage.endpoint", "http://minio:9000/path@v1"), id="endpoint-at-in-path"),
    pytest.param(with_field("spec.deepspeed.config", {"zero_optimization": {"reduce_bucket_size": 5e8}}),
                 id="finite-deepspeed-config"),
    pytest.param(with_field("spec.runPolicy.activeDeadlineSeconds", TEN_YEARS), id="deadline-ten-years"),
    pytest.param(with_field("spec.resources.memory", 10**18), id="memory-largest-integer"),
]  # fmt: skip


# --- `finetune validate`: one mistake, one error, at its field, with its value and words ----------------


@pytest.mark.parametrize(("mutation", "path", "expected", "category"), CASES)
def test_bad_manifest_is_reported(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutation: Mutation,
    path: str,
    expected: list[str],
    category: str,
) -> None:
    code, output = validate(capsys, write(tmp_path, mutation(BASE)))
    assert code == 1, output
    assert "Traceback" not in output
    verdict, issues = sections(output)[1]
    assert verdict == "1 error", output
    (issue,) = issues
    shown_path = issue.partition(": ")[0]
    if "\u2026" in shown_path:  # a long path is shown shortened
        head, _, tail = shown_path.partition("\u2026")
        assert path.startswith(head) and path.endswith(tail), issue
    else:
        assert shown_path == path, issue
    for words in expected:
        assert words in issue, issue


@pytest.mark.parametrize(("mutation", "path", "expected", "category"), NON_FINITE)
def test_non_finite_number_is_refused_by_the_model(
    mutation: Mutation, path: str, expected: list[str], category: str
) -> None:
    with pytest.raises(InvalidManifestError) as refused:
        parse_finetune_job(mutation(BASE))
    (issue,) = refused.value.issues
    assert issue.path == path
    for words in expected:
        assert words in str(issue), issue


@pytest.mark.parametrize(("mutation", "path", "expected", "category"), NON_FINITE)
def test_non_finite_number_in_yaml_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutation: Mutation,
    path: str,
    expected: list[str],
    category: str,
) -> None:
    code, output = validate(capsys, write(tmp_path, mutation(BASE)))
    assert code == 1, output
    assert "Traceback" not in output
    assert sections(output)[1][0] == "1 error", output


@pytest.mark.parametrize("mutation", ACCEPTED)
def test_accepted_variant_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutation: Mutation
) -> None:
    code, output = validate(capsys, write(tmp_path, mutation(BASE)))
    assert code == 0, output
    assert sections(output)[1][0] == "valid"


def test_deeply_nested_non_finite_number_is_found_without_recursion() -> None:
    deep: Any = NAN
    for _ in range(50_000):
        deep = [deep]
    with pytest.raises(PydanticCustomError, match=r"^must hold only finite numbers, not NaN or Infinity"):
        FiniteNumbers._check({"x": deep})


# --- The committed CRD refuses the same mistakes ----------------------------------------------------------


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _stored_with(mutation: Mutation) -> dict[str, Any]:
    """What the API server validates: the manifest with its defaults applied; where pydantic refuses it
    (the URI rules), BASE as stored with the mistake applied unchecked."""
    try:
        return defaulted(FinetuneJob.model_validate(mutation(BASE)))
    except ValidationError:
        return mutation(defaulted(FinetuneJob.model_validate(BASE)))  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("mutation", "path", "expected", "category"), [c for c in CASES if c.values[3] == SCHEMA]
)
def test_crd_schema_rejects_schema_case(
    crd_schema: dict[str, Any], mutation: Mutation, path: str, expected: list[str], category: str
) -> None:
    validator = jsonschema.Draft4Validator(crd_schema)
    blamed = {dotted(tuple(error.absolute_path)) for error in validator.iter_errors(_stored_with(mutation))}
    assert blamed, "the CRD schema admits it"
    assert all(where == path or where.startswith((f"{path}.", f"{path}[")) for where in blamed), blamed


@pytest.mark.parametrize(
    ("mutation", "path", "expected", "category"), [c for c in CASES if c.values[3] == CEL]
)
def test_crd_cel_rules_reject_cel_case(
    crd_schema: dict[str, Any], mutation: Mutation, path: str, expected: list[str], category: str
) -> None:
    violations = evaluate_rules(crd_schema, _stored_with(mutation))
    assert [v.path for v in violations] == [tuple(_parts(path))]
    assert expected[-1] in violations[0].message


@pytest.mark.parametrize("mutation", ACCEPTED)
def test_crd_accepts_accepted_variant(crd_schema: dict[str, Any], mutation: Mutation) -> None:
    stored = defaulted(parse_finetune_job(mutation(BASE)))
    assert list(jsonschema.Draft4Validator(crd_schema).iter_errors(stored)) == []
    assert evaluate_rules(crd_schema, stored) == []


def test_every_integer_in_the_spec_has_a_maximum_within_int64(crd_schema: dict[str, Any]) -> None:
    def integers(node: dict[str, Any], where: str):
        if node.get("type") == "integer" or node.get("x-kubernetes-int-or-string"):
            yield where, node
        for key, child in node.get("properties", {}).items():
            yield from integers(child, f"{where}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from integers(node[key], f"{where}[]")

    found = dict(integers(crd_schema["properties"]["spec"], "spec"))
    assert "spec.runPolicy.activeDeadlineSeconds" in found
    unbounded = [where for where, node in found.items() if not 0 < node.get("maximum", 2**63) <= 2**63 - 1]
    assert unbounded == []
    for field in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert found[f"spec.runPolicy.{field}"]["maximum"] == TEN_YEARS


# --- Kubernetes' schemas: the embedded Affinity is derived from them, the Toleration model agrees ------


def test_generated_affinity_schema_is_derived_from_kubernetes() -> None:
    assert GENERATED.read_text() == render_generated_module(), (
        "kube_schemas_generated.py is stale: python -m finetune_operator.api.kube_schemas > it"
    )


def test_crd_embeds_the_derived_affinity_schema(crd_schema: dict[str, Any]) -> None:
    resources = crd_schema["properties"]["spec"]["properties"]["resources"]["properties"]
    embedded = dict(resources["affinity"])
    assert "x-kubernetes-preserve-unknown-fields" not in embedded
    assert embedded.pop("description").startswith("Pod affinity rules")
    derived = dict(AFFINITY_SCHEMA)
    derived.pop("description")
    assert embedded == derived


def _shape(schema: dict[str, Any]) -> Any:
    """Property names and types, all the way down: what structural schemas of a type must share."""
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    (kind,) = [k for k in kinds if k != "null"]
    if "properties" in schema:
        return kind, {key: _shape(child) for key, child in schema["properties"].items()}
    if "items" in schema:
        return kind, _shape(schema["items"])
    return kind


def _resolved(definitions: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return _resolved(definitions, definitions[node["$ref"].rsplit("/", 1)[-1]])
    resolved = dict(node)
    if "properties" in node:
        resolved["properties"] = {k: _resolved(definitions, v) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        resolved["items"] = _resolved(definitions, node["items"])
    return resolved


def test_affinity_schema_has_the_shape_of_kubernetes_affinity() -> None:
    definitions = load_definitions()
    kubernetes = _resolved(definitions, definitions[AFFINITY_DEFINITION])
    assert _shape(derive_schema(definitions, AFFINITY_DEFINITION)) == _shape(kubernetes)


def test_toleration_model_is_kubernetes_toleration(crd_schema: dict[str, Any]) -> None:
    """The Toleration model names Kubernetes' fields with Kubernetes' types (it narrows the operator to
    Exists and Equal: Lt and Gt need a feature gate)."""
    ours = crd_schema["properties"]["spec"]["properties"]["resources"]["properties"]["tolerations"]["items"]
    kubernetes = load_definitions()[TOLERATION_DEFINITION]
    assert _shape(ours) == _shape(kubernetes)


def test_schema_problems_name_the_place_inside_the_value() -> None:
    term = {"topologyKey": "zone", "labelSelector": {"matchExpressions": [{"key": "app"}]}}
    problems = schema_problems(
        AFFINITY_SCHEMA, {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    )
    assert problems == [
        "podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector.matchExpressions[0]"
        ".operator: required field is missing"
    ]

"""The real kube-apiserver judges the CRD and the manifests, and `finetune validate` must judge alike.

tests/test_validate.py and tests/test_cel_rules.py prove `finetune validate` and the CRD's CEL rules
against models of the API server (jsonschema, cel-python). A model can be wrong where the server is
not, so here kube-apiserver v1.36 itself, started once per session by the ``control_plane`` fixture,
is the judge of the same tables:

1. The CRD from crds/ is Established with its names accepted; the Helm chart's copy is accepted by a
   server-side dry run; `kubectl explain` prints the generated descriptions and `kubectl get` the
   printer columns, with the values the status holds.
2. Admission: every manifest of those tables (test_validate.py's BASE, examples, ACCEPTED and CASES,
   and test_cel_rules.py's created objects) goes to the server as a dry-run create with strict field
   validation, and through `finetune validate`: both must accept it or both reject it, as the table
   says; where a CEL rule rejects it, the server reports each violation `finetune validate` reports,
   at the same field with the same message. Each old/new pair of test_cel_rules.py is a real update
   of a real object, refused exactly when the table says a rule is violated.
3. Transition rules by real merge-patches of one job: changes to spec.model, spec.dataset and
   spec.method are refused with the rule's message; spec.resources changes only while the job is
   suspended or in the update that suspends it, step by step as test_cel_rules.py expects.

Dry-run creates take milliseconds; the only waits are for kubectl's discovery right after the CRD
is installed.
"""

from __future__ import annotations

import copy
import json
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import urllib3
import yaml
from finetune_operator.api.spec import FinetuneJob
from finetune_operator.api.validation import ValidationIssue, defaulted, rule_issues, validate_object
from pydantic import ValidationError

from tests import test_cel_rules, test_validate, test_validate_spec
from tests.kube.client import resource_path
from tests.kube.cluster import CRD_FILE, RealCluster
from tests.kube.controlplane import ROOT
from tests.kube.semantics import FINETUNEJOBS, merge_patch
from tests.test_validate import Mutation, sections, validate

CHART_CRD_FILE = ROOT / "charts" / "finetune-operator" / "crds" / "finetunejob.yaml"
CRD: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
[VERSION] = CRD["spec"]["versions"]
SCHEMA: dict[str, Any] = VERSION["schema"]["openAPIV3Schema"]
# What `kubectl apply --validate=strict --dry-run=server` asks for: nothing stored, unknown and
# duplicate fields refused.
STRICT_DRY_RUN = {"dryRun": "All", "fieldValidation": "Strict"}
ROOT_FIELD = "<nil>"  # how the API server names the object itself as a cause's field

Document = dict[str, Any] | str  # an object, or YAML text for what an object cannot hold


# --- The server's side -------------------------------------------------------------------------------


def in_namespace(document: Any, namespace: str) -> Any:
    """A copy placed in ``namespace`` (where a manifest names one: a dry run needs one that exists)."""
    document = copy.deepcopy(document)
    metadata = document.get("metadata") if isinstance(document, dict) else None
    if isinstance(metadata, dict) and "namespace" in metadata:
        metadata["namespace"] = namespace
    return document


def request_text(document: Document) -> tuple[str, str]:
    """The request body and its content type: the same text `finetune validate` reads from a file.

    An object is sent as JSON (JSON is YAML, so the file holds the very bytes the server decodes);
    YAML text as YAML, which the server decodes itself, strictly: a duplicate key is an error there.
    """
    if isinstance(document, str):
        return document, "application/yaml"
    return json.dumps(document), "application/json"


_POOLS: dict[str, urllib3.PoolManager] = {}


def server_create(cluster: RealCluster, namespace: str, document: Document) -> kmock.KubernetesError | None:
    """The API server's answer to a dry-run create of ``document`` in ``namespace``: None when admitted.

    The body is posted as text, not through ``cluster.admin.request`` (which sends JSON only), so that a
    YAML row reaches the server as written; the connection is the admin's, as ``cluster.admin``'s.
    """
    text, content_type = request_text(document)
    url = f"{cluster.url}{resource_path(FINETUNEJOBS, namespace)}?{urllib.parse.urlencode(STRICT_DRY_RUN)}"
    if cluster.url not in _POOLS:
        _POOLS[cluster.url] = urllib3.PoolManager(ssl_context=cluster.plane.ssl_context(), retries=False)
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    response = _POOLS[cluster.url].request("POST", url, body=text.encode(), headers=headers, timeout=30)
    if response.status == 201:
        return None
    status = json.loads(response.data)
    assert response.status in (400, 422), f"not a verdict on the object: {response.status} {status}"
    return kmock.KubernetesError(response.status, status["reason"], status["message"], status.get("details"))


QUOTED_VALUE = re.compile(r'^"(?:[^"\\]|\\.)*": ')


def causes(error: kmock.KubernetesError) -> set[tuple[str, str]]:
    """(field, message) of each cause of a refusal, the field in `finetune validate`'s dotted form."""
    found = set()
    for cause in (error.details or {}).get("causes", []):
        field = cause.get("field", "")
        message = cause["message"].removeprefix("Invalid value: ")
        # A rule on a string field is reported with the value first ("aaa/pool": ...); offline, without.
        found.add(("" if field == ROOT_FIELD else field, QUOTED_VALUE.sub("", message, count=1)))
    return found


def rule_causes(issues: list[ValidationIssue]) -> set[tuple[str, str]]:
    """The CEL violations `finetune validate` found, as the server's causes would name them."""
    return {(issue.path, issue.message) for issue in issues}


# --- The offline side --------------------------------------------------------------------------------


def offline_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: Document
) -> tuple[bool, str]:
    """`finetune validate` on a file holding exactly the request's text: (valid, its report)."""
    text, content_type = request_text(document)
    path = tmp_path / ("job.json" if content_type == "application/json" else "job.yaml")
    path.write_text(text, encoding="utf-8")
    code, output = validate(capsys, path)
    verdict = sections(output)[1][0]
    assert verdict == "valid" or re.fullmatch(r"\d+ errors?", verdict), output  # checked, not skipped
    return code == 0, output


def assert_same_verdict(
    cluster: RealCluster,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    document: Document,
    valid: bool,
) -> kmock.KubernetesError | None:
    """The table, the API server and `finetune validate` agree that ``document`` is ``valid`` or not."""
    refusal = server_create(cluster, namespace, document)
    offline_valid, report = offline_verdict(tmp_path, capsys, document)
    server = "admitted" if refusal is None else f"refused ({refusal.status}): {refusal.message}"
    assert (refusal is None) == offline_valid, f"API server: {server}\nfinetune validate:\n{report}"
    assert offline_valid == valid, f"the table says {'valid' if valid else 'invalid'}\n{report}"
    return refusal


# --- 1. The CRD as the server serves it --------------------------------------------------------------


def test_kubectl_and_the_server_are_the_release_go_mod_pins(control_plane: RealCluster) -> None:
    """make cluster-bin sets the version ldflags: without them both would say v0.0.0-master."""
    go_mod = (ROOT / "tests" / "controlplane" / "go.mod").read_text()
    [pinned] = re.findall(r"^\s*k8s\.io/kubernetes (v\S+)$", go_mod, re.MULTILINE)
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert versions["clientVersion"]["gitVersion"] == versions["serverVersion"]["gitVersion"] == pinned


def test_crd_is_established_with_its_names_accepted(control_plane: RealCluster) -> None:
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD['metadata']['name']}"
    served = control_plane.admin.request("GET", path)
    assert served is not None
    conditions = {c["type"]: c for c in served["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True", conditions
    assert conditions["NamesAccepted"]["status"] == "True", conditions
    assert conditions["NamesAccepted"]["reason"] == "NoConflicts"
    assert served["status"]["acceptedNames"] == CRD["spec"]["names"]
    # The server keeps the generated schema as it is: nothing pruned, nothing rewritten.
    assert served["spec"]["versions"][0]["schema"] == VERSION["schema"]


def test_chart_crd_is_accepted_by_the_server(control_plane: RealCluster) -> None:
    done = control_plane.kubectl("apply", "--dry-run=server", "--server-side", "-f", str(CHART_CRD_FILE))
    crd = f"customresourcedefinition.apiextensions.k8s.io/{CRD['metadata']['name']}"
    assert done.stdout.strip() == f"{crd} serverside-applied (server dry run)"


def kubectl_once_discovered(cluster: RealCluster, *args: str, timeout: float = 15) -> str:
    """kubectl's output, retried for a while after the CRD is installed: the server publishes the new
    resource in discovery, and then its OpenAPI schema, a few seconds later ("the server doesn't have a
    resource type", "couldn't find resource")."""
    deadline = time.monotonic() + timeout
    while True:
        done = cluster.kubectl(*args, check=False)
        if done.returncode == 0:
            return done.stdout
        if time.monotonic() > deadline:
            raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr}")
        time.sleep(0.5)


def test_kubectl_explain_prints_the_crd_description(control_plane: RealCluster) -> None:
    lora = SCHEMA["properties"]["spec"]["properties"]["method"]["properties"]["lora"]
    output = kubectl_once_discovered(control_plane, "explain", "ftj.spec.method.lora")
    description = output.partition("\nDESCRIPTION:\n")[2].partition("\nFIELDS:\n")[0]
    # kubectl wraps and indents the text: the words, in order, are the CRD's.
    assert description.split() == lora["description"].split()
    assert "FIELD: lora <Object>" in output
    fields = dict(re.findall(r"^  (\w+)\t<([^>]+)>$", output, re.MULTILINE))
    assert fields == {"r": "integer", "alpha": "number", "dropout": "number", "targetModules": "[]string"}
    assert set(fields) == set(lora["properties"])


def _at(document: Any, json_path: str) -> Any:
    """The value at a printer column's simple JSONPath, such as .status.progress.percent."""
    for key in json_path.strip(".").split("."):
        document = document[key]
    return document


def test_printer_columns_show_the_status(control_plane: RealCluster, namespace: str) -> None:
    job = in_namespace(test_validate.BASE, namespace)
    control_plane.admin.create_object(FINETUNEJOBS, job, namespace)
    status = {
        "phase": "Running",
        "progress": {"step": 120, "totalSteps": 300, "percent": 40},
        "metrics": {"evalLoss": 1.25, "trainLoss": 1.5, "answerAccuracy": 0.625},
        "baseMetrics": {"evalLoss": 2.75, "answerAccuracy": 0.05},
    }
    name = job["metadata"]["name"]
    stored = control_plane.admin.patch_object(FINETUNEJOBS, namespace, name, {"status": status}, sub="status")
    assert stored["status"]["phase"] == "Running"
    assert stored["status"]["baseMetrics"] == status["baseMetrics"]  # in the schema: not pruned

    all_columns = VERSION["additionalPrinterColumns"]
    assert all_columns[-1]["type"] == "date"  # Age: shown as a duration, such as 3s
    # The default view, then -o wide with the base model's columns (priority 1) beside the latest.
    for wide, expected in (
        (False, ["Running", "40", "120", "1.25"]),
        (True, ["Running", "40", "120", "1.25", "2.75", "0.625", "0.05"]),
    ):
        args = ("get", "ftj", "-n", namespace, *(("-o", "wide") if wide else ()))
        output = kubectl_once_discovered(control_plane, *args)
        header, row, *rest = (re.split(r"\s{2,}", line.strip()) for line in output.splitlines())
        assert rest == []
        columns = [column for column in all_columns if wide or not column.get("priority")]
        assert header == ["NAME", *(column["name"].upper() for column in columns)]
        *values, age = row[1:]
        assert row[0] == name
        assert values == [str(_at(stored, column["jsonPath"])) for column in columns[:-1]]
        assert values == expected
        assert re.fullmatch(r"\d+s", age), age
    # `kubectl describe` shows the base model's metrics beside the latest.
    described = kubectl_once_discovered(control_plane, "describe", "ftj", name, "-n", namespace)
    assert re.search(r"Base Metrics:\s+Answer Accuracy:\s+0.05\s+Eval Loss:\s+2.75\s", described), described
    assert re.search(r"\n  Metrics:\s+Answer Accuracy:\s+0.625\s", described), described


# --- 2. Admission: the server and `finetune validate` accept and reject the same manifests ------------


def _rows_of_test_validate() -> list[Any]:
    """(make the document in a namespace, valid?, rejected by CEL rules alone?) for each row of
    tests/test_validate.py.

    Every row is comparable: a mutation's dict goes to the server as the JSON that the file for
    `finetune validate` holds, and a mutation's YAML text (the duplicate key) as that very text in a
    YAML request, which the server decodes strictly. (kubectl would not show the server that
    duplicate: it turns YAML into JSON first, keeping the last key; `finetune validate` takes the
    server's side.) The mutations apply to BASE in the test's namespace, so the YAML names it too.
    """

    def mutated(mutation: Mutation) -> Callable[[str], Document]:
        return lambda namespace: mutation(in_namespace(test_validate.BASE, namespace))

    def loaded(path: Path) -> Callable[[str], Document]:
        return lambda namespace: in_namespace(yaml.safe_load(path.read_text(encoding="utf-8")), namespace)

    rows = [pytest.param(mutated(lambda document: document), True, False, id="base")]
    rows += [
        pytest.param(loaded(path), True, False, id=f"example-{path.stem}") for path in test_validate.EXAMPLES
    ]
    rows += [
        pytest.param(mutated(p.values[0]), True, False, id=f"accepted-{p.id}") for p in test_validate.ACCEPTED
    ]
    rows += [
        pytest.param(mutated(p.values[0]), False, p.values[3] == test_validate.CEL, id=f"rejected-{p.id}")
        for p in test_validate.CASES
    ]
    return rows


@pytest.mark.parametrize(("make", "valid", "cel_only"), _rows_of_test_validate())
def test_validate_table_is_judged_alike(
    control_plane: RealCluster,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[str], Document],
    valid: bool,
    cel_only: bool,
) -> None:
    document = make(namespace)
    refusal = assert_same_verdict(control_plane, namespace, tmp_path, capsys, document, valid)
    if cel_only:
        # The server names each violation `finetune validate` names (and may add its own name checks).
        assert refusal is not None
        assert rule_causes(validate_object(document)[1]) <= causes(refusal), refusal.message


def _rows_of_test_validate_spec() -> list[Any]:
    """tests/test_validate_spec.py's rows: affinity, tolerations, nodeSelector, S3 URIs, the endpoint and
    time limits. (Not its NaN rows: no JSON request can carry NaN, so there is no request to compare.)"""
    table = test_validate_spec
    rows = [pytest.param(p.values[0], True, id=f"accepted-{p.id}") for p in table.ACCEPTED]
    rows += [pytest.param(p.values[0], False, id=f"rejected-{p.id}") for p in table.CASES]
    return rows


@pytest.mark.parametrize(("mutation", "valid"), _rows_of_test_validate_spec())
def test_validate_spec_table_is_judged_alike(
    control_plane: RealCluster,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutation: Mutation,
    valid: bool,
) -> None:
    document = mutation(in_namespace(test_validate.BASE, namespace))
    refusal = assert_same_verdict(control_plane, namespace, tmp_path, capsys, document, valid)
    if refusal is not None and structurally_valid(document):
        # A CEL rule refused it: the server names each violation `finetune validate` names.
        assert rule_causes(validate_object(document)[1]) <= causes(refusal), refusal.message


def _created_objects_of_test_cel_rules() -> list[Any]:
    return [
        pytest.param(p.values[2], not p.values[3], id=p.id)
        for p in test_cel_rules.CASES
        if not isinstance(p.values[2], tuple)
    ]


@pytest.mark.parametrize(("obj", "valid"), _created_objects_of_test_cel_rules())
def test_cel_rules_table_is_judged_alike(
    control_plane: RealCluster,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    obj: dict[str, Any],
    valid: bool,
) -> None:
    document = in_namespace(obj, namespace)
    refusal = assert_same_verdict(control_plane, namespace, tmp_path, capsys, document, valid)
    # Only on an object the schema admits do the CEL rules run, on the server as in `finetune validate`
    # (test_cel_rules.py's raw() objects are not such).
    if refusal is not None and structurally_valid(document):
        assert rule_causes(validate_object(document)[1]) <= causes(refusal), refusal.message


def structurally_valid(document: dict[str, Any]) -> bool:
    try:
        FinetuneJob.model_validate(document)
    except ValidationError:
        return False
    return True


def test_manifest_namespace_must_be_the_request_namespace(
    control_plane: RealCluster, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Why the rows above are moved into the test's namespace: a manifest's namespace says where it
    goes (kubectl sends it there), so the server compares it with the request's, while `finetune
    validate`, which sends nothing, accepts any."""
    assert test_validate.BASE["metadata"]["namespace"] != namespace
    refusal = server_create(control_plane, namespace, test_validate.BASE)
    assert refusal is not None
    assert (refusal.status, refusal.reason) == (400, "BadRequest")
    assert "does not match the namespace sent on the request" in refusal.message
    assert offline_verdict(tmp_path, capsys, test_validate.BASE)[0]

    without = test_validate.without_field("metadata.namespace")(test_validate.BASE)
    assert server_create(control_plane, namespace, without) is None  # it goes where it is sent
    assert server_create(control_plane, namespace, in_namespace(test_validate.BASE, namespace)) is None


# --- Updates: every old/new pair of test_cel_rules.py, as a real PUT ---------------------------------


def _updates_of_test_cel_rules() -> list[Any]:
    return [
        pytest.param(*p.values[2], p.values[3], id=p.id)
        for p in test_cel_rules.CASES
        if isinstance(p.values[2], tuple)
    ]


def _stored_spec(cluster: RealCluster, namespace: str, name: str) -> dict[str, Any]:
    stored = cluster.admin.get_object(FINETUNEJOBS, namespace, name)
    assert stored is not None
    return stored["spec"]


@pytest.mark.parametrize(("old", "new", "violated"), _updates_of_test_cel_rules())
def test_update_pair_is_judged_as_the_table_says(
    control_plane: RealCluster,
    namespace: str,
    old: dict[str, Any],
    new: dict[str, Any],
    violated: set[test_cel_rules.Rule],
) -> None:
    created = control_plane.admin.create_object(FINETUNEJOBS, in_namespace(old, namespace), namespace)
    name = created["metadata"]["name"]
    update = in_namespace(new, namespace)
    update["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    offline = rule_issues(new, old)
    assert {(issue.path, issue.message) for issue in offline} == {
        (".".join(rule.reported_path), rule.message) for rule in violated
    }
    try:
        control_plane.admin.request("PUT", resource_path(FINETUNEJOBS, namespace, name), update)
    except kmock.KubernetesError as refusal:
        assert violated, f"refused, though the table says every rule holds: {refusal.message}"
        assert (refusal.status, refusal.reason) == (422, "Invalid")
        assert rule_causes(offline) == causes(refusal)
        assert _stored_spec(control_plane, namespace, name) == created["spec"]  # nothing changed
        return
    assert not violated, f"admitted, though the table says it violates {sorted(map(str, violated))}"
    assert _stored_spec(control_plane, namespace, name) == new["spec"]


# --- 3. Transition rules by real merge-patches of one job --------------------------------------------


def create_job(cluster: RealCluster, namespace: str, *edits: dict[str, Any]) -> dict[str, Any]:
    """test_cel_rules.py's job (edits are paths under spec), created for real in ``namespace``."""
    job = in_namespace(test_cel_rules.job(*edits), namespace)
    return cluster.admin.create_object(FINETUNEJOBS, job, namespace)


def offline_transition(stored: dict[str, Any], patch: dict[str, Any]) -> list[ValidationIssue]:
    """The CEL violations `finetune validate`'s rules find in the update that ``patch`` makes."""
    before = {key: stored[key] for key in ("apiVersion", "kind", "spec")} | {
        "metadata": {"name": stored["metadata"]["name"]}
    }
    after = defaulted(FinetuneJob.model_validate(merge_patch(copy.deepcopy(before), patch)))
    return rule_issues(after, defaulted(FinetuneJob.model_validate(before)))


def patch_job(cluster: RealCluster, stored: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    meta = stored["metadata"]
    return cluster.admin.patch_object(FINETUNEJOBS, meta["namespace"], meta["name"], patch)


IMMUTABLE_CHANGES = [
    pytest.param(test_cel_rules.MODEL_IMMUTABLE, {"model": {"uri": "s3://models/other/"}}, id="model-uri"),
    pytest.param(test_cel_rules.MODEL_IMMUTABLE, {"model": {"trustRemoteCode": True}}, id="model-trust"),
    pytest.param(test_cel_rules.DATASET_IMMUTABLE, {"dataset": {"train": "s3://datasets/demo/v2.jsonl"}},
                 id="dataset-train"),
    pytest.param(test_cel_rules.DATASET_IMMUTABLE, {"dataset": {"evalSplit": 0.2}}, id="dataset-eval-split"),
    pytest.param(test_cel_rules.METHOD_IMMUTABLE, {"method": {"type": "full", "lora": None}},
                 id="method-type"),
    pytest.param(test_cel_rules.METHOD_IMMUTABLE, {"method": {"lora": {"r": 8}}}, id="method-lora-rank"),
]  # fmt: skip


@pytest.mark.parametrize("suspended", [False, True], ids=["running", "suspended"])
@pytest.mark.parametrize(("rule", "spec_patch"), IMMUTABLE_CHANGES)
def test_immutable_section_refuses_a_real_patch(
    control_plane: RealCluster,
    namespace: str,
    rule: test_cel_rules.Rule,
    spec_patch: dict[str, Any],
    suspended: bool,
) -> None:
    stored = create_job(control_plane, namespace, {"runPolicy.suspend": suspended})
    patch = {"spec": spec_patch}
    assert [issue.message for issue in offline_transition(stored, patch)] == [rule.message]
    with pytest.raises(kmock.KubernetesError) as refused:
        patch_job(control_plane, stored, patch)
    assert (refused.value.status, refused.value.reason) == (422, "Invalid")
    assert causes(refused.value) == {(".".join(rule.reported_path), rule.message)}
    assert rule.message in refused.value.message
    assert _stored_spec(control_plane, namespace, stored["metadata"]["name"]) == stored["spec"]
    # Only the rule stands in the way: another change to the same job is admitted.
    after = patch_job(control_plane, stored, {"spec": {"hyperparameters": {"learningRate": 1e-5}}})
    assert after["spec"]["hyperparameters"]["learningRate"] == 1e-5


# Each step of one job's life: a merge-patch of its spec, the test_cel_rules.py case of the same
# transition, and whether the update is admitted.
RESOURCE_STEPS = [
    ("nodes changed on a running job", {"resources": {"nodes": 2}}, "update-nodes-running", False),
    ("suspended and nodes changed in one update", {"runPolicy": {"suspend": True}, "resources": {"nodes": 2}},
     "update-suspend-and-restore-node-selector", True),
    ("node selector set while suspended", {"resources": {"nodeSelector": {"pool": "a100"}}},
     "update-node-selector-suspended", True),
    ("nodes changed while suspended", {"resources": {"nodes": 4}}, "update-nodes-suspended", True),
    ("resumed and node selector changed in one update",
     {"runPolicy": {"suspend": False}, "resources": {"nodeSelector": {"pool": "h100"}}},
     "update-node-selector-and-resume", True),
    ("node selector changed on the running job", {"resources": {"nodeSelector": None}},
     "update-node-selector-running", False),
    ("learning rate changed on the running job", {"hyperparameters": {"learningRate": 1e-5}},
     "update-learning-rate", True),
    ("affinity set on the running job", {"resources": {"affinity": test_cel_rules.POOL_AFFINITY}},
     "update-affinity-running", False),
]  # fmt: skip


def test_resources_change_only_while_suspended(control_plane: RealCluster, namespace: str) -> None:
    rule = test_cel_rules.RESOURCES_WHILE_SUSPENDED
    # What the rule says: an update may change spec.resources where the old or the new object is suspended.
    assert rule.rule == (
        "oldSelf.runPolicy.suspend || self.runPolicy.suspend || self.resources == oldSelf.resources"
    )
    table = {p.id: p.values[3] for p in test_cel_rules.CASES}
    stored = create_job(control_plane, namespace)
    for description, spec_patch, case_id, admitted in RESOURCE_STEPS:
        assert (not table[case_id]) == admitted, f"{description}: test_cel_rules.py's {case_id} disagrees"
        patch = {"spec": spec_patch}
        offline = offline_transition(stored, patch)
        assert (offline == []) == admitted, f"{description}: finetune validate's rules say {offline}"
        try:
            after = patch_job(control_plane, stored, patch)
        except kmock.KubernetesError as refusal:
            assert not admitted, f"{description}: refused: {refusal.message}"
            assert (refusal.status, refusal.reason) == (422, "Invalid")
            assert causes(refusal) == {("spec.resources", rule.message)} == rule_causes(offline)
            assert _stored_spec(control_plane, namespace, stored["metadata"]["name"]) == stored["spec"]
            continue
        assert admitted, f"{description}: admitted"
        assert after["spec"] == merge_patch(copy.deepcopy(stored["spec"]), spec_patch)
        assert after["metadata"]["generation"] == stored["metadata"]["generation"] + 1
        stored = after
    assert stored["spec"]["resources"]["nodes"] == 4
    assert stored["spec"]["runPolicy"]["suspend"] is False

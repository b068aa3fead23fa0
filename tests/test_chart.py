"""The Helm chart, rendered by Helm's own template engine and checked against Kubernetes' API schemas.

helm-python-sdk binds Helm's Go SDK (libhelm_c, shipped in its wheel): rendering here is what
`helm install` renders, values.schema.json included, with no cluster and no helm binary. Every
rendered object is validated in strict mode by kubernetes-validate against the API schemas of the
oldest Kubernetes the chart allows (Chart.yaml kubeVersion) and of the newest it knows. Two kinds are
not in those schemas: the kopf peering objects are validated against their CRD's schema (from the
chart's crds/), and the ServiceMonitor (monitoring.coreos.com/v1, the Prometheus Operator's) is only
checked field by field below. The RBAC rules themselves are compared with the operator's code in
tests/test_rbac.py.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.controller import runner
from finetune_operator.controller.manifests import DEFAULT_TRAINER_IMAGE, WorkerSettings, build_gang

from tests.manifests import minimal_manifest

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "charts" / "finetune-operator"
RELEASE = "ft"
NAMESPACE = "finetune-system"
FULLNAME = f"{RELEASE}-finetune-operator"
WATCHED = ["team-a", "team-b"]

# The main combinations of values; every one is rendered, validated and checked.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": WATCHED},
    "peering": {"replicas": 2},
    "peering-namespaced": {"replicas": 3, "watchNamespaces": WATCHED},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "scheduling": {
        "resources": {"requests": {"cpu": "250m", "memory": "300Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux", "pool": "system"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["system"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "platform-critical",
        "podAnnotations": {"example.com/team": "ml-platform"},
        "podLabels": {"team": "ml-platform"},
    },
    "pull-secrets": {
        "image": {
            "repository": "registry.example.com/ml/finetune-operator",
            "tag": "1.2.3",
            "pullPolicy": "Always",
            "pullSecrets": ["regcred", "mirror-creds"],
        }
    },
    "existing-service-account": {"serviceAccount": {"create": False, "name": "ops-operator"}},
}


# --- rendering ------------------------------------------------------------------------------------


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART_DIR)


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[dict[str, Any]]:
    """The objects `helm install ft charts/finetune-operator -n finetune-system` would create."""
    manifests = chart().render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".txt"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


@functools.cache
def _rendered(scenario: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(SCENARIOS[scenario]))


def objects(scenario: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [obj for obj in _rendered(scenario) if kind is None or obj["kind"] == kind]


def the(scenario: str, kind: str) -> dict[str, Any]:
    [obj] = objects(scenario, kind)
    return obj


def pod_spec(scenario: str) -> dict[str, Any]:
    spec: dict[str, Any] = the(scenario, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(scenario: str) -> dict[str, Any]:
    [operator] = pod_spec(scenario)["containers"]
    return dict(operator)


def env(scenario: str) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(scenario)["env"] if "value" in item}


def chart_crds() -> list[dict[str, Any]]:
    return [
        doc for path in sorted((CHART_DIR / "crds").iterdir()) for doc in yaml.safe_load_all(path.read_text())
    ]


def _kube_versions() -> list[str]:
    """The oldest Kubernetes the chart accepts (its kubeVersion) and the newest the schemas know."""
    constraint = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", constraint)
    assert match, f"kubeVersion {constraint!r}: expected '>=X.Y.Z-0'"
    return [match.group(1), kubernetes_validate.latest_version()]


KUBE_VERSIONS = _kube_versions()


# --- the CRDs --------------------------------------------------------------------------------------


def test_chart_crd_is_a_byte_copy_of_the_repos_crd() -> None:
    """One source: crds/finetunejob.yaml (generated by `make crd`); the chart carries a copy.

    A copy, not a symlink: Helm's loader follows symlinks, but Flux's GitRepository artifacts skip
    them and checkouts without symlink support (Windows, core.symlinks=false) break them, so the
    chart would lose its CRD there. This test keeps the copy exact.
    """
    source = ROOT / "crds" / "finetunejob.yaml"
    copy = CHART_DIR / "crds" / "finetunejob.yaml"
    assert not copy.is_symlink()
    assert copy.read_bytes() == source.read_bytes(), (
        "charts/finetune-operator/crds/finetunejob.yaml differs from crds/finetunejob.yaml: "
        "cp crds/finetunejob.yaml charts/finetune-operator/crds/finetunejob.yaml"
    )
    # Besides it, only kopf's peering CRDs (see test_peering_crds_are_kopfs).
    assert sorted(path.name for path in (CHART_DIR / "crds").iterdir()) == [
        "finetunejob.yaml",
        "kopf-peering.yaml",
    ]
    # And Helm's loader sees exactly these files as the chart's CRDs.
    loaded = {crd["name"]: crd["data"] for crd in chart().crds}
    assert loaded["crds/finetunejob.yaml"] == source.read_text()
    assert set(loaded) == {"crds/finetunejob.yaml", "crds/kopf-peering.yaml"}


def test_peering_crds_are_kopfs() -> None:
    """The peering CRDs name the resources kopf itself looks for."""
    from kopf._cogs.structs import references

    crds = {crd["spec"]["names"]["plural"]: crd for crd in chart_crds() if crd["spec"]["group"] == "kopf.dev"}
    for selector, scope in (
        (references.CLUSTER_PEERINGS_K, "Cluster"),
        (references.NAMESPACED_PEERINGS_K, "Namespaced"),
    ):
        crd = crds.pop(selector.any_name)
        assert crd["spec"]["group"] == selector.group
        assert crd["spec"]["scope"] == scope
        assert [v["name"] for v in crd["spec"]["versions"] if v["served"] and v["storage"]] == [
            selector.version
        ]
    assert not crds


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crds_validate_as_custom_resource_definitions(version: str) -> None:
    for crd in chart_crds():
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        kubernetes_validate.validate(crd, version, strict=True)


# --- every rendered object against the API schemas -------------------------------------------------


def _validate_custom_object(obj: dict[str, Any]) -> None:
    """A kopf peering object, against its CRD from the chart's crds/ (not in kubernetes-validate)."""
    group, _, version = obj["apiVersion"].partition("/")
    [crd] = [
        c for c in chart_crds() if c["spec"]["group"] == group and c["spec"]["names"]["kind"] == obj["kind"]
    ]
    assert ("namespace" in obj["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    jsonschema.Draft7Validator(served["schema"]["openAPIV3Schema"]).validate(obj)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", obj["metadata"]["name"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid(scenario: str) -> None:
    rendered = objects(scenario)
    assert rendered
    for obj in rendered:
        if obj["kind"] == "ServiceMonitor":
            continue  # not in kubernetes-validate's schemas: test_service_monitor checks its fields
        if obj["apiVersion"] == "kopf.dev/v1":
            _validate_custom_object(obj)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] in {NAMESPACE, *WATCHED}, obj["metadata"]


@pytest.mark.parametrize(
    "values",
    [{}, {"watchNamespaces": WATCHED, "replicas": 2, "metrics": {"serviceMonitor": {"enabled": True}}}],
    ids=["defaults", "everything-on"],
)
def test_helm_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is information ("icon is recommended"); warnings and errors are 2 and 3.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- Pod Security "restricted" ---------------------------------------------------------------------

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir",
    "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """What the Pod Security Standards' "restricted" profile (with "baseline") refuses in a pod spec."""
    problems: list[str] = []
    pod = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field}: true")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    if pod.get("sysctls"):
        problems.append("sysctls")
    containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    for c in containers:
        ctx = c.get("securityContext", {})
        name = c["name"]
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if not (
            ctx.get("runAsNonRoot") is True or (pod.get("runAsNonRoot") is True and "runAsNonRoot" not in ctx)
        ):
            problems.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = ctx.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{name}: seccompProfile {seccomp}")
        capabilities = ctx.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds {capabilities['add']}")
        if set(capabilities.get("add", [])) - BASELINE_CAPABILITIES:
            problems.append(f"{name}: adds capabilities beyond baseline")
        if any(port.get("hostPort") for port in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if ctx.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        if ctx.get("windowsOptions", {}).get("hostProcess"):
            problems.append(f"{name}: hostProcess")
    return problems


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_pod_meets_the_restricted_profile(scenario: str) -> None:
    spec = pod_spec(scenario)
    assert restricted_violations(spec) == []
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] > 0 and pod["runAsGroup"] > 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container(scenario)["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["readOnlyRootFilesystem"] is True
    # A read-only root, with a writable /tmp.
    [tmp] = [m for m in container(scenario)["volumeMounts"] if m["mountPath"] == "/tmp"]
    [volume] = [v for v in spec["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


def test_operator_user_is_the_images_user() -> None:
    """runAsNonRoot needs a numeric user; the chart's is the operator image's (Dockerfile USER)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    operator_stage = dockerfile.split(" AS operator", 1)[1].split("\nFROM ", 1)[0]
    [user] = re.findall(r"^USER\s+(\S+)", operator_stage, flags=re.MULTILINE)
    pod = pod_spec("defaults")["securityContext"]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"


def test_worker_pods_meet_the_restricted_profile() -> None:
    """What the chart's README says of the worker pods the operator creates, checked on a GPU gang."""
    job = parse_finetune_job(minimal_manifest("llm", resources={"nodes": 2, "gpusPerNode": 8}))
    pods = [
        obj
        for obj in build_gang(job, "uid-1", 0, WorkerSettings(default_image="trainer"))
        if obj["kind"] == "Pod"
    ]
    assert len(pods) == 2
    for pod in pods:
        assert restricted_violations(pod["spec"]) == []
        [trainer] = pod["spec"]["containers"]
        assert trainer["securityContext"]["readOnlyRootFilesystem"] is True
        assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "8"
        shm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def test_the_restricted_check_catches_violations() -> None:
    spec = {
        "hostNetwork": True,
        "containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}],
        "volumes": [{"name": "dev", "hostPath": {"path": "/dev"}}],
    }
    problems = restricted_violations(spec)
    for expected in (
        "hostNetwork",
        "volume dev",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "seccomp",
        "ALL",
    ):
        assert any(expected in problem for problem in problems), (expected, problems)


# --- RBAC hygiene (the exact rules: tests/test_rbac.py) ---------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_has_no_wildcards_and_no_secrets(scenario: str) -> None:
    roles = [obj for obj in objects(scenario) if obj["kind"] in {"Role", "ClusterRole"}]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert not any("*" in item for item in rule.get(field, [])), (role["metadata"]["name"], rule)
            assert not {r.split("/")[0] for r in rule["resources"]} & {"secrets", "serviceaccounts"}, rule
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate"}, rule
            assert "nonResourceURLs" not in rule


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_bindings_bind_the_operators_service_account(scenario: str) -> None:
    account = SCENARIOS[scenario].get("serviceAccount", {}).get("name") or FULLNAME
    assert pod_spec(scenario)["serviceAccountName"] == account
    assert pod_spec(scenario)["automountServiceAccountToken"] is True
    created = [obj["metadata"]["name"] for obj in objects(scenario, "ServiceAccount")]
    assert created == ([] if scenario == "existing-service-account" else [account])
    roles = {
        (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in objects(scenario)
    }
    bindings = objects(scenario, "RoleBinding") + objects(scenario, "ClusterRoleBinding")
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], namespace, ref["name"]) in roles
    assert len(bindings) == len([obj for obj in objects(scenario) if obj["kind"] in {"Role", "ClusterRole"}])


# --- scope, peering and strategy ---------------------------------------------------------------------


def test_defaults_one_standalone_replica_with_recreate() -> None:
    deployment = the("defaults", "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "FINETUNE_PEERING" not in env("defaults")
    assert objects("defaults", "ClusterKopfPeering") == objects("defaults", "KopfPeering") == []
    # The image's entry point, named: the console script of pyproject.toml.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert container("defaults")["command"] == ["finetune-operator"]
    assert scripts["finetune-operator"] == "finetune_operator.controller.runner:main"


def test_cluster_wide_by_default() -> None:
    kinds = [obj["kind"] for obj in objects("defaults")]
    assert kinds.count("ClusterRole") == kinds.count("ClusterRoleBinding") == 1
    assert "Role" not in kinds and "RoleBinding" not in kinds
    assert "FINETUNE_NAMESPACES" not in env("defaults")


def test_namespaced_scope_has_a_role_in_each_namespace() -> None:
    for kind in ("Role", "RoleBinding"):
        assert sorted(obj["metadata"]["namespace"] for obj in objects("namespaced", kind)) == WATCHED
    assert env("namespaced")["FINETUNE_NAMESPACES"] == "team-a,team-b"
    # What is left cluster-wide is kopf's observation of CRDs, namespaces and (gpuMemoryFromNodes) nodes,
    # read-only.
    [cluster_role] = objects("namespaced", "ClusterRole")
    granted = {(g, r) for rule in cluster_role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("", "namespaces"),
        ("", "nodes"),
    }
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in cluster_role["rules"])


@pytest.mark.parametrize("scenario", ["peering", "peering-namespaced"])
def test_replicas_above_one_enable_peering(scenario: str) -> None:
    deployment = the(scenario, "Deployment")
    assert deployment["spec"]["replicas"] == SCENARIOS[scenario]["replicas"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert env(scenario)["FINETUNE_PEERING"] == FULLNAME
    pod_id = [item for item in container(scenario)["env"] if item["name"] == "POD_ID"]
    assert pod_id == [{"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    if scenario == "peering":
        [peering] = objects(scenario, "ClusterKopfPeering")
        assert peering["metadata"]["name"] == FULLNAME and objects(scenario, "KopfPeering") == []
    else:
        peerings = objects(scenario, "KopfPeering")
        assert sorted(p["metadata"]["namespace"] for p in peerings) == WATCHED
        assert {p["metadata"]["name"] for p in peerings} == {FULLNAME}
        assert objects(scenario, "ClusterKopfPeering") == []


def test_each_peer_draws_its_own_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf pauses every operator while two share the highest priority: each replica draws its own."""
    variables = {item["name"]: item.get("value") for item in container("peering")["env"]}
    assert variables["FINETUNE_PRIORITY"] == "random"
    monkeypatch.setenv("FINETUNE_PRIORITY", "random")
    priorities = {runner.build_parser().parse_args([]).priority for _ in range(2)}
    assert len(priorities) == 2 and all(1 <= p < 2**31 for p in priorities)
    assert "FINETUNE_PRIORITY" not in {item["name"] for item in container("defaults")["env"]}


# --- values wired to the operator's flags -----------------------------------------------------------


def _runner_env_names() -> set[str]:
    """Every environment variable runner.py reads (env("FINETUNE_...", ...))."""
    tree = ast.parse(Path(runner.__file__).read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "env"
        and isinstance(node.args[0], ast.Constant)
    }


# Variables the runner reads that the chart deliberately leaves unset.
NOT_SET_BY_THE_CHART: dict[str, str] = {}


def test_every_operator_variable_is_wired_or_explained() -> None:
    wired = set().union(*(env(scenario) for scenario in SCENARIOS))
    names = _runner_env_names()
    assert "FINETUNE_DEFAULT_IMAGE" in names  # the AST walk found the runner's variables
    assert {name for name in wired if name.startswith("FINETUNE_")} | set(NOT_SET_BY_THE_CHART) == names


def _parse_operator_flags(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> Any:
    for name in list(os.environ):
        if name.startswith("FINETUNE_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return runner.build_parser().parse_args([])


def test_values_reach_the_operators_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "trainerImage": "registry.example.com/ml/trainer:2.0",
        "watchNamespaces": WATCHED,
        "replicas": 2,
        "logFormat": "plain",
        "resyncSeconds": 12.5,
        "progressInterval": 4,
        "progressRate": 0.5,
        "workerTerminationGraceSeconds": 1200000,
        "workerRendezvousPort": 31001,
        "workerProgressPort": 31002,
        "livenessPort": 8081,
        "metrics": {"port": 9191},
        "gpuMemoryFromNodes": False,
    }
    [deployment] = [obj for obj in render(values) if obj["kind"] == "Deployment"]
    [operator] = deployment["spec"]["template"]["spec"]["containers"]
    args = _parse_operator_flags(
        monkeypatch, {e["name"]: e["value"] for e in operator["env"] if "value" in e}
    )
    assert args.default_image == "registry.example.com/ml/trainer:2.0"
    assert args.namespace == WATCHED
    assert args.peering == FULLNAME
    assert args.log_format == "plain"
    assert (args.resync_seconds, args.progress_interval, args.progress_rate) == (12.5, 4.0, 0.5)
    assert args.termination_grace_seconds == 1200000
    assert (args.rendezvous_port, args.progress_port) == (31001, 31002)
    assert (args.liveness_port, args.metrics_port) == (8081, 9191)
    assert args.gpu_memory_from_nodes is False
    ports = {port["name"]: port["containerPort"] for port in operator["ports"]}
    assert ports == {"healthz": 8081, "metrics": 9191}
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}


def test_defaults_reach_the_operators_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parse_operator_flags(monkeypatch, env("defaults"))
    assert args.default_image == DEFAULT_TRAINER_IMAGE
    assert args.namespace == [] and args.peering == ""
    assert (args.liveness_port, args.metrics_port) == (8080, 9090)
    assert (args.rendezvous_port, args.progress_port) == (29500, 29600)
    assert args.log_format == "json"
    assert args.gpu_memory_from_nodes is True
    # The chart's defaults are the operator's own.
    assert args == _parse_operator_flags(monkeypatch, {})


def test_image_and_pull_secrets() -> None:
    operator = container("pull-secrets")
    assert operator["image"] == "registry.example.com/ml/finetune-operator:1.2.3"
    assert operator["imagePullPolicy"] == "Always"
    assert pod_spec("pull-secrets")["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror-creds"}]
    # The default tag is the chart's appVersion, the project's version.
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    assert app_version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container("defaults")["image"] == f"ghcr.io/finetune-operator/operator:{app_version}"
    assert "imagePullSecrets" not in pod_spec("defaults")


def test_scheduling_and_resources() -> None:
    values = SCENARIOS["scheduling"]
    spec = pod_spec("scheduling")
    assert container("scheduling")["resources"] == values["resources"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert spec[key] == values[key]
    template = the("scheduling", "Deployment")["spec"]["template"]["metadata"]
    assert template["annotations"] == values["podAnnotations"]
    assert template["labels"]["team"] == "ml-platform"
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert key not in pod_spec("defaults")
    assert container("defaults")["resources"]["limits"] == {"memory": "512Mi"}


def test_metrics_service_and_service_monitor() -> None:
    assert objects("defaults", "ServiceMonitor") == []
    service = the("service-monitor", "Service")
    [port] = service["spec"]["ports"]
    assert port == {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    template_labels = the("service-monitor", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    monitor = the("service-monitor", "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]


def test_default_trainer_image_is_the_operators() -> None:
    assert chart().values["trainerImage"] == DEFAULT_TRAINER_IMAGE


# --- values.schema.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": "two"}, "at '/replicas': got string, want integer"),
        ({"replicas": 0}, "at '/replicas'"),
        ({"replica": 2}, "additional properties 'replica' not allowed"),
        ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"watchNamespaces": ["a", "a"]}, "at '/watchNamespaces'"),
        ({"logFormat": "xml"}, "at '/logFormat'"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
        ({"image": {"pullSecrets": "regcred"}}, "at '/image/pullSecrets'"),
        ({"runAsUser": 0}, "at '/runAsUser'"),
        ({"metrics": {"port": 70000}}, "at '/metrics/port'"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "at '/metrics/serviceMonitor/enabled'"),
        ({"tolerations": [{"operator": "Exist"}]}, "at '/tolerations/0/operator'"),
        ({"nodeSelector": {"pool": 1}}, "at '/nodeSelector/pool'"),
        ({"trainerImage": ""}, "at '/trainerImage'"),
        ({"progressRate": 0}, "at '/progressRate'"),
        ({"workerProgressPort": 0}, "at '/workerProgressPort'"),
        ({"workerRendezvousPort": "29500"}, "at '/workerRendezvousPort'"),
        ({"gpuMemoryFromNodes": "no"}, "at '/gpuMemoryFromNodes': got string, want boolean"),
    ],
)
def test_schema_rejects_bad_values_naming_the_field(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as error:
        render(values)
    assert "values don't meet the specifications of the schema" in str(error.value)
    assert message in str(error.value)


def test_ports_must_differ() -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"livenessPort and metrics\.port must differ"):
        render({"livenessPort": 9090})


def test_worker_ports_must_differ() -> None:
    with pytest.raises(
        helm_python.HelmRenderError, match=r"workerRendezvousPort and workerProgressPort must differ"
    ):
        render({"workerProgressPort": 29500})


def test_existing_service_account_needs_a_name() -> None:
    with pytest.raises(helm_python.HelmRenderError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False}})


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in {"resources"}:
            paths.extend(_leaves(value, f"{prefix}{key}."))
        else:
            paths.append(f"{prefix}{key}")
    return paths


def test_every_value_has_a_schema_and_documentation() -> None:
    schema = chart().schema
    assert schema is not None
    readme = (CHART_DIR / "README.md").read_text()
    defaults = chart().values
    for path in _leaves(defaults):
        node = schema
        for part in path.split("."):
            node = node["properties"][part]
        assert f"`{path}`" in readme, f"{path} is not documented in charts/finetune-operator/README.md"
    assert set(schema["properties"]) - {"global"} == set(defaults)
    chart().validate_schema(defaults)

"""The chart's RBAC grants exactly what the operator's code uses: a missing rule fails, an extra one too.

What the operator uses is derived from the code, not listed by hand:

- ``kube.py``: every kubernetes-client method ``KubeApi`` calls, found with ``ast``. The client's own
  generated code gives each method's HTTP verb and path (``_<method>_serialize``), and the call's
  arguments fill the path's ``{group}``/``{plural}`` (``GROUP``, ``PLURAL``). No other module of the
  operator may import the kubernetes client.
- kopf, for the handlers ``finetune_operator.controller.handlers.build_registry`` registers (with the
  index of GPU nodes and without, as gpuMemoryFromNodes turns it on and off): list and watch for
  every resource a handler or an index watches; patch for resources whose handlers need kopf's
  finalizer or its annotations (daemons, change handlers); the status too when kopf keeps its
  progress there. Each in the watched namespaces or cluster-wide as the resource is namespaced or
  not (a CRD's scope; the kubernetes client's paths for the built-in ones): kopf watches a
  cluster-scoped resource such as nodes cluster-wide even when it serves a list of namespaces.
- kopf's settings after the operator's ``configure_settings``: Events are posted (create), and unless
  scanning is disabled kopf watches CRDs and, when it serves a list of namespaces, namespaces.
- The children's ``ownerReferences``: ``blockOwnerDeletion`` needs update on ``<owner>/finalizers``.
- With peering (replicas > 1): kopf's peering resources (``peering.guess_selectors``) whose CRDs the
  chart installs; kopf watches them and patches its own object.

The chart's rules are rendered by Helm (see tests/test_chart.py) for the cluster-wide and the
namespaced scope, with and without peering, with gpuMemoryFromNodes on and off, and compared with that
set.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import finetune_operator
import kopf
import kubernetes
import kubernetes.client.api
import pytest
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.controller import handlers, kube
from finetune_operator.controller.manifests import WorkerSettings, build_gang
from kopf._cogs.structs import references
from kopf._core.engines import peering

from tests.manifests import minimal_manifest
from tests.test_chart import FULLNAME, NAMESPACE, WATCHED, chart_crds, render


class Permission(NamedTuple):
    group: str
    resource: str  # "plural" or "plural/subresource"
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}.{self.group or 'core'}"


def permissions(group: str, resource: str, verbs: Iterable[str]) -> set[Permission]:
    return {Permission(group, resource, verb) for verb in verbs}


# --- kube.py: the operator's own calls ---------------------------------------------------------------

_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _client_endpoint(client: type, method: str) -> tuple[str, str]:
    """The HTTP method and path template of a kubernetes-client method, from the client's own code."""
    source = inspect.getsource(getattr(client, f"_{method}_serialize"))
    [http] = re.findall(r"method='(\w+)'", source)
    [path] = re.findall(r"resource_path='([^']+)'", source)
    return http, path


def _permission(http: str, path: str) -> tuple[Permission, bool]:
    """What one API request needs (RBAC's verb, group and resource), and whether it is namespaced."""
    match = re.fullmatch(r"/api/v1/(?P<core>.+)|/apis/(?P<group>[^/]+)/[^/]+/(?P<rest>.+)", path)
    assert match, path
    group = match["group"] or ""
    parts = (match["core"] or match["rest"]).split("/")
    namespaced = len(parts) > 2 and parts[0] == "namespaces" and parts[1] == "{namespace}"
    if namespaced:
        parts = parts[2:]
    resource, named = parts[0], len(parts) > 1
    if len(parts) > 2:
        resource = f"{resource}/{parts[2]}"
    if http == "GET":
        verb = "get" if named else "list"
    elif http == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = _VERBS[http]
    assert "{" not in group + resource, f"{path}: an unresolved path parameter; resolve it in this test"
    return Permission(group, resource, verb), namespaced


def kube_api_calls(source: str, constants: dict[str, Any]) -> dict[str, tuple[Permission, bool]]:
    """Each kubernetes-client method KubeApi calls -> (what it needs, whether it is namespaced)."""
    tree = ast.parse(source)
    [cls] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "KubeApi"]
    parents = {child: parent for parent in ast.walk(cls) for child in ast.iter_child_nodes(parent)}
    # self._core = kubernetes.client.CoreV1Api(client), ...
    clients: dict[str, type] = {}
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            [target] = node.targets
            name = _dotted(node.value.func)
            if _dotted(target).startswith("self.") and name.startswith("kubernetes."):
                obj: Any = kubernetes
                for part in name.split(".")[1:]:
                    obj = getattr(obj, part)
                clients[_dotted(target)] = obj
    assert clients, "KubeApi creates no kubernetes client?"
    calls: dict[str, tuple[Permission, bool]] = {}
    for node in ast.walk(cls):
        if not (isinstance(node, ast.Attribute) and _dotted(node.value) in clients):
            continue
        client, method = clients[_dotted(node.value)], node.attr
        http, path = _client_endpoint(client, method)
        # The call's arguments: self._core.method(a, b) or self._call(self._core.method, a, b).
        parent = parents.get(node)
        arguments: list[ast.expr] = []
        if isinstance(parent, ast.Call) and parent.func is node:
            arguments = parent.args
        elif isinstance(parent, ast.Call) and parent.args and parent.args[0] is node:
            arguments = parent.args[1:]
        parameters = [p for p in inspect.signature(getattr(client, method)).parameters if p != "self"]
        for parameter, argument in zip(parameters, arguments, strict=False):
            if isinstance(argument, ast.Name) and isinstance(constants.get(argument.id), str):
                path = path.replace(f"{{{parameter}}}", constants[argument.id])
        calls[method] = _permission(http, path)
    return calls


@functools.cache
def operator_calls() -> dict[str, tuple[Permission, bool]]:
    return kube_api_calls(Path(kube.__file__).read_text(), vars(kube))


def test_kube_py_is_the_only_user_of_the_kubernetes_client() -> None:
    package = Path(finetune_operator.__file__).parent
    users = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "kubernetes" or name.startswith("kubernetes.") for name in names):
                users.add(str(path.relative_to(package)))
    assert users == {"controller/kube.py"}


def test_the_calls_are_found_in_kube_py() -> None:
    calls = operator_calls()
    assert calls["create_namespaced_pod"] == (Permission("", "pods", "create"), True)
    assert calls["delete_namespaced_config_map"] == (Permission("", "configmaps", "delete"), True)
    status = Permission(finetune_operator.GROUP, f"{finetune_operator.PLURAL}/status", "patch")
    assert calls["patch_namespaced_custom_object_status"] == (status, True)


def test_a_new_call_would_be_noticed() -> None:
    """The derivation sees any client call in KubeApi: reading a Secret would need 'get secrets'."""
    source = (
        Path(kube.__file__)
        .read_text()
        .replace(
            "    async def delete_pod(",
            "    async def read_secret(self, namespace: str, name: str) -> None:\n"
            "        await self._call(self._core.read_namespaced_secret, name, namespace)\n\n"
            "    async def delete_pod(",
        )
    )
    calls = kube_api_calls(source, vars(kube))
    assert calls["read_namespaced_secret"] == (Permission("", "secrets", "get"), True)
    assert not any(p.resource == "secrets" for p, _ in operator_calls().values())


# --- kopf: what the registered handlers and the settings need ------------------------------------------


def _selector_resource(selector: references.Selector) -> tuple[str, str]:
    name = selector.plural or selector.any_name
    assert isinstance(name, str) and name == name.lower() and selector.fn is None and not selector.category, (
        f"{selector}: a fuzzy selector; resolve it to a resource in this test"
    )
    # A bare name ("pods"): kopf gives the core v1 group priority (references.Selector.select).
    return (selector.group if selector.group is not None else ""), name


@functools.cache
def _client_paths() -> frozenset[str]:
    """Every path template of the kubernetes client's generated API classes."""
    folder = Path(kubernetes.client.api.__file__).parent
    found = (re.findall(r"resource_path='([^']+)'", path.read_text()) for path in folder.glob("*.py"))
    return frozenset(path for paths in found for path in paths)


@functools.cache
def _crd_scopes() -> dict[tuple[str, str], str]:
    """(group, plural) -> Namespaced or Cluster, of the CRDs the chart installs."""
    return {
        (crd["spec"]["group"], crd["spec"]["names"]["plural"]): crd["spec"]["scope"] for crd in chart_crds()
    }


def is_namespaced(group: str, plural: str) -> bool:
    """A resource's scope: a CRD's spec.scope (the chart's CRDs), else the kubernetes client's paths for
    it (``/api/v1/namespaces/{namespace}/pods``, but only ``/api/v1/nodes``)."""
    if (group, plural) in _crd_scopes():
        return _crd_scopes()[group, plural] == "Namespaced"
    base = "/api/v1" if not group else rf"/apis/{re.escape(group)}/[^/]+"
    paths = _client_paths()
    namespaced = any(re.fullmatch(rf"{base}/namespaces/\{{namespace\}}/{plural}", path) for path in paths)
    assert namespaced or any(re.fullmatch(f"{base}/{plural}", path) for path in paths), (
        f"{plural}.{group or 'core'}: no such resource in the kubernetes client; add its CRD to the chart"
    )
    return namespaced


def test_resource_scopes() -> None:
    group, plural = finetune_operator.GROUP, finetune_operator.PLURAL
    assert (
        is_namespaced("", "pods")
        and is_namespaced(group, plural)
        and is_namespaced("kopf.dev", "kopfpeerings")
    )
    assert not is_namespaced("", "nodes") and not is_namespaced("", "namespaces")
    assert not is_namespaced("apiextensions.k8s.io", "customresourcedefinitions")
    assert not is_namespaced("kopf.dev", "clusterkopfpeerings")
    with pytest.raises(AssertionError, match="no such resource"):
        is_namespaced("", "gpus")


def _settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    handlers.configure_settings(settings)
    return settings


def _calls_kopf_event() -> bool:
    tree = ast.parse(Path(handlers.__file__).read_text())
    posting = {"kopf.event", "kopf.info", "kopf.warn", "kopf.exception"}
    return any(isinstance(node, ast.Call) and _dotted(node.func) in posting for node in ast.walk(tree))


def kopf_needs(
    clusterwide: bool, peering_enabled: bool, gpu_memory_from_nodes: bool = True
) -> tuple[set[Permission], set[Permission]]:
    """What kopf does for the operator: (in every watched namespace, cluster-scoped)."""
    registry = handlers.build_registry(gpu_memory_from_nodes)
    namespaced: set[Permission] = set()
    cluster: set[Permission] = set()

    def need(resource: tuple[str, str], verbs: list[str], subresource: str = "") -> None:
        group, plural = resource
        (namespaced if is_namespaced(group, plural) else cluster).update(
            permissions(group, plural + subresource, verbs)
        )

    assert not registry._webhooks.get_all_handlers(), "admission webhooks need RBAC of their own"
    settings = _settings()
    for kind in (registry._indexing, registry._watching, registry._spawning, registry._changing):
        for handler in kind.get_all_handlers():
            resource = _selector_resource(handler.selector)
            need(resource, ["list", "watch"])
            # Finalizers (daemons, deletion handlers) and kopf's annotations (change handlers).
            if kind is registry._changing or getattr(handler, "requires_finalizer", False):
                need(resource, ["patch"])
                if not isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage):
                    need(resource, ["patch"], "/status")
    if settings.posting.enabled or _calls_kopf_event():
        namespaced.add(Permission("", "events", "create"))
    if not settings.scanning.disabled:
        need(_selector_resource(references.CRDS), ["list", "watch"])
        if not clusterwide:
            need(_selector_resource(references.NAMESPACES), ["list", "watch"])
    if peering_enabled:
        settings.peering.standalone = False
        settings.peering.clusterwide = clusterwide
        for selector in peering.guess_selectors(settings):
            resource = _selector_resource(selector)
            if resource in _crd_scopes():  # kopf serves the peering kinds that exist (kopf.dev here)
                # The peering observer watches; keep-alives and clean-ups patch its own object.
                need(resource, ["list", "watch", "patch"])
    return namespaced, cluster


def ownership_needs() -> set[Permission]:
    """blockOwnerDeletion needs update on the owner's finalizers (OwnerReferencesPermissionEnforcement)."""
    job = parse_finetune_job(minimal_manifest("llm", resources={"nodes": 2}))
    needs = set()
    for child in build_gang(job, "uid-1", 0, WorkerSettings(default_image="trainer")):
        for owner in child["metadata"].get("ownerReferences", []):
            if owner.get("blockOwnerDeletion"):
                assert owner["kind"] == finetune_operator.KIND, owner
                group = owner["apiVersion"].rpartition("/")[0]
                needs.add(Permission(group, f"{finetune_operator.PLURAL}/finalizers", "update"))
    return needs


def required(
    clusterwide: bool, peering_enabled: bool, gpu_memory_from_nodes: bool = True
) -> tuple[set[Permission], set[Permission]]:
    """Everything the operator needs: (in every watched namespace, cluster-scoped)."""
    namespaced, cluster = kopf_needs(clusterwide, peering_enabled, gpu_memory_from_nodes)
    for permission, is_namespaced in operator_calls().values():
        (namespaced if is_namespaced else cluster).add(permission)
    return namespaced | ownership_needs(), cluster


def test_what_the_operator_needs() -> None:
    """The derived set, spelled out once: a change here is a change to review in the chart."""
    group, plural = finetune_operator.GROUP, finetune_operator.PLURAL
    namespaced, cluster = required(clusterwide=False, peering_enabled=False)
    assert namespaced == (
        permissions(group, plural, ["list", "watch", "patch"])
        | permissions(group, f"{plural}/status", ["patch"])
        | permissions(group, f"{plural}/finalizers", ["update"])
        | permissions("", "pods", ["list", "watch", "create", "delete"])
        | permissions("", "services", ["create", "delete"])
        | permissions("", "configmaps", ["create", "delete"])
        | permissions("", "events", ["create"])
    )
    assert cluster == permissions("apiextensions.k8s.io", "customresourcedefinitions", ["list", "watch"]) | (
        permissions("", "namespaces", ["list", "watch"]) | permissions("", "nodes", ["list", "watch"])
    )
    assert not any(p.resource.startswith("secrets") for p in namespaced | cluster)
    # Without the GPU memory from nodes, nothing of nodes.
    assert required(clusterwide=False, peering_enabled=False, gpu_memory_from_nodes=False) == (
        namespaced,
        cluster - permissions("", "nodes", ["list", "watch"]),
    )


# --- the chart ------------------------------------------------------------------------------------------


def _granted(role: dict[str, Any]) -> set[Permission]:
    return {
        Permission(group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _compare(where: str, granted: set[Permission], needed: set[Permission]) -> None:
    missing = sorted(map(str, needed - granted))
    extra = sorted(map(str, granted - needed))
    assert not missing, f"{where}: the operator uses APIs the chart does not grant: {missing}"
    assert not extra, f"{where}: the chart grants APIs the operator never uses: {extra}"


SCOPES = {
    "cluster-wide": {},
    "cluster-wide-peering": {"replicas": 2},
    "namespaced": {"watchNamespaces": WATCHED},
    "namespaced-peering": {"watchNamespaces": WATCHED, "replicas": 2},
}


@pytest.mark.parametrize("from_nodes", [True, False], ids=["nodes", "no-nodes"])
@pytest.mark.parametrize("scope", SCOPES)
def test_chart_rbac_is_exactly_what_the_code_uses(scope: str, from_nodes: bool) -> None:
    values = {**SCOPES[scope], "gpuMemoryFromNodes": from_nodes}
    clusterwide = not values.get("watchNamespaces")
    peering_enabled = values.get("replicas", 1) > 1
    needed_in_namespaces, needed_cluster = required(clusterwide, peering_enabled, from_nodes)
    rendered = render(values)
    roles = [obj for obj in rendered if obj["kind"] == "Role"]
    cluster_roles = [obj for obj in rendered if obj["kind"] == "ClusterRole"]
    cluster_granted = set().union(*(_granted(role) for role in cluster_roles))
    if clusterwide:
        assert roles == []
        _compare("ClusterRole", cluster_granted, needed_in_namespaces | needed_cluster)
    else:
        assert sorted(role["metadata"]["namespace"] for role in roles) == WATCHED
        for role in roles:
            _compare(f"Role in {role['metadata']['namespace']}", _granted(role), needed_in_namespaces)
        _compare("ClusterRole", cluster_granted, needed_cluster)
    # Rules narrowed to one object: only kopf's patch of its own peering object.
    named = [(rule, obj) for obj in roles + cluster_roles for rule in obj["rules"] if "resourceNames" in rule]
    if peering_enabled:
        assert named
        for rule, _ in named:
            assert rule["verbs"] == ["patch"] and rule["apiGroups"] == ["kopf.dev"]
            assert rule["resourceNames"] == [FULLNAME]  # == FINETUNE_PEERING, the object kopf patches
    else:
        assert named == []
    # Nothing is granted outside the release namespace and the watched ones.
    assert {obj["metadata"].get("namespace") for obj in rendered} <= {None, NAMESPACE, *WATCHED}


def test_the_comparison_fails_both_ways() -> None:
    needed = {Permission("", "pods", "create")}
    with pytest.raises(AssertionError, match="does not grant"):
        _compare("Role", set(), needed)
    with pytest.raises(AssertionError, match="never uses"):
        _compare("Role", needed | {Permission("", "secrets", "get")}, needed)

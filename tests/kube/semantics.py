"""Pure pieces of Kubernetes API semantics that kmock 0.8 lacks, used by the emulator.

Kept apart from the server so each can be read (and unit-tested) on its own: URL parsing, selectors,
merge-patch, the watch events a change produces for a given selection, and discovery info from a CRD.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from finetune_operator.api.timestamps import format_time

Body = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]  # (resource, namespace or None, name), as in kmock.objects

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "finetunejob.yaml"
CRD: Body = yaml.safe_load(CRD_PATH.read_text())
FINETUNEJOBS = kmock.resource(
    group=CRD["spec"]["group"],
    version=next(v["name"] for v in CRD["spec"]["versions"] if v.get("storage")),
    plural=CRD["spec"]["names"]["plural"],
)
NAMESPACES = kmock.resource("v1/namespaces")
CRDS = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
EVENTS = (kmock.resource("v1/events"), kmock.resource("events.k8s.io/v1/events"))
VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}
REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict"}
REASONS |= {410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests"}
ACTIONS = {"get": "FETCH", "list": "LIST", "watch": "WATCH", "create": "CREATE", "delete": "DELETE"}
ACTIONS |= {"update": "UPDATE", "patch": "UPDATE"}  # kmock names both PATCH and PUT "UPDATE"


def api_error(status: int, message: str, reason: str | None = None) -> kmock.KubernetesError:
    """An error that the emulator answers as a Kubernetes ``Status`` with this HTTP code."""
    return kmock.KubernetesError(status, reason or REASONS.get(status, "InternalError"), message, {})


def status_body(error: kmock.KubernetesError) -> Body:
    """A ``Status`` object: kopf and the kubernetes client read its code, reason and message."""
    body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": error.status}
    return body | {"reason": error.reason, "message": error.message, "details": error.details or {}}


def status_response(error: kmock.KubernetesError) -> aiohttp.web.Response:
    return aiohttp.web.json_response(status_body(error), status=error.status)


def crd_resources(crd: Body) -> dict[kmock.resource, kmock.ResourceInfo]:
    """Discovery entries of a CRD's served versions, read from the manifest: one source of truth."""
    spec, names = crd["spec"], crd["spec"]["names"]
    info = dict(kind=names["kind"], singular=names.get("singular"), namespaced=spec["scope"] == "Namespaced")
    info |= dict(verbs=VERBS, shortnames=names.get("shortNames", []), categories=names.get("categories", []))
    return {
        kmock.resource(group=spec["group"], version=v["name"], plural=names["plural"]): kmock.ResourceInfo(
            **info, subresources=set(v.get("subresources") or {})
        )
        for v in spec["versions"]
        if v.get("served", True)
    }


def api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def parse_path(path: str) -> tuple[kmock.resource | None, str | None, str | None, str | None]:
    """Split an API path into (resource, namespace, name, subresource); discovery paths give no plural.

    Unlike kmock 0.8 (which crashes on it), ``/api/v1/namespaces[/NAME]`` is the namespaces resource.
    """
    parts, version = path.strip("/").split("/"), None
    if parts[0] == "api" and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 2:
        group, rest = parts[1], parts[3:]
        version = parts[2] if len(parts) > 2 else None
    else:
        return None, None, None, None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural, name, *subresource = [*rest, "", ""]
    resource = kmock.resource(group=group, version=version, plural=plural or None)
    return resource, namespace, name or None, "/".join(filter(None, subresource)) or None


def guess_action(method: str, watch: bool, name: str | None) -> kmock.action | None:
    """The Kubernetes verb of a resource request (kmock 0.8 has none for PUT)."""
    if method == "GET":
        return kmock.action.WATCH if watch else kmock.action.FETCH if name else kmock.action.LIST
    if method == "POST":
        return kmock.action.CREATE
    verbs = {"PATCH": kmock.action.UPDATE, "PUT": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}
    return verbs.get(method) if name else None


_LABEL_TERM = re.compile(r"\s*(!?)\s*([\w./-]+)\s*(?:(==|=|!=)\s*([\w.-]*)|\s(in|notin)\s*\(([^)]*)\))?\s*")


def match_labels(selector: str, labels: dict[str, str]) -> bool:
    """A labelSelector: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``."""
    for term in filter(str.strip, re.split(r",(?![^()]*\))", selector)):  # commas outside parentheses
        m = _LABEL_TERM.fullmatch(term)
        if m is None:
            raise api_error(400, f"unable to parse requirement: {term!r}")
        negated, key, op, value, set_op, values = m.groups()
        if set_op:
            ok = (labels.get(key) in {v.strip() for v in values.split(",")}) == (set_op == "in")
        elif op:
            ok = (labels.get(key) == value) == (op != "!=")
        else:
            ok = (key in labels) != bool(negated)
        if not ok:
            return False
    return True


def match_fields(selector: str, obj: Body) -> bool:
    """A fieldSelector (``a.b=v``, ``a.b==v``, ``a.b!=v``) on any dotted path; absent fields equal ''."""
    for term in filter(str.strip, selector.split(",")):
        m = re.fullmatch(r"\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*", term)
        if m is None:
            raise api_error(400, f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        actual: Any = obj
        for part in path.split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if (("" if actual is None else str(actual)) == value) != (op != "!="):
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 merge-patch; also serves strategic-merge-patch, except that lists are replaced, not merged."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def spec_of(obj: Body) -> Body:
    """What bumps metadata.generation when changed: everything except metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def now() -> str:
    return format_time(datetime.datetime.now(datetime.UTC))


@dataclasses.dataclass(frozen=True)
class Change:
    """One entry of the change log, kept to replay watches resumed from an older resourceVersion."""

    rv: int
    resource: kmock.resource
    type: str  # ADDED, MODIFIED, DELETED
    old: Body | None
    new: Body


@dataclasses.dataclass(frozen=True)
class Selector:
    """What a list/watch covers: a namespace, a name (watching one object), label and field selectors."""

    namespace: str | None = None
    name: str | None = None
    labels: str = ""
    fields: str = ""

    @classmethod
    def of(cls, request: kmock.Request) -> Selector:
        labels, fields = request.params.get("labelSelector", ""), request.params.get("fieldSelector", "")
        return cls(request.namespace, request.name, labels, fields)

    def matches(self, obj: Body) -> bool:
        meta = obj.get("metadata", {})
        return (
            self.namespace in (None, meta.get("namespace"))
            and self.name in (None, meta.get("name"))
            and match_labels(self.labels, meta.get("labels") or {})
            and match_fields(self.fields, obj)
        )

    def event(self, change: Change) -> Body | None:
        """The watch event that Kubernetes sends for a change to this selection, if any.

        An object that starts matching (e.g. gets the label) is ADDED; one that stops matching is DELETED.
        """
        now_in, was_in = self.matches(change.new), change.old is not None and self.matches(change.old)
        if change.type == "DELETED" or not now_in:
            kind = "DELETED" if now_in or was_in else None
        else:
            kind = "MODIFIED" if was_in else "ADDED"
        return {"type": kind, "object": change.new} if kind else None


@dataclasses.dataclass
class Refusal:
    """A rule that makes matching API requests fail: to test RBAC (403), admission (422) or quota errors."""

    action: str | None  # create, update (PATCH or PUT), delete, get, list, watch; None for any
    resource: kmock.resource | None  # None for any
    namespace: str | None = None
    name: str | None = None
    status: int = 403
    reason: str | None = None  # by default, the usual one for the status: Forbidden, Invalid, ...
    message: str = "refused by the test"
    times: int | None = None  # refuse only so many requests; None: until removed
    hits: int = 0

    def matches(self, request: kmock.Request) -> bool:
        body_name = request.data.get("metadata", {}).get("name") if isinstance(request.data, dict) else None
        return (
            (self.times is None or self.hits < self.times)
            and (self.action is None or request.action == ACTIONS[self.action.lower()])
            and self.resource in (None, request.resource)
            and self.namespace in (None, request.namespace)
            and self.name in (None, request.name, body_name)
        )

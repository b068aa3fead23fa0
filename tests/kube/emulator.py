"""An emulated Kubernetes API server for integration tests of kopf operators, over real HTTP.

kmock's KubernetesEmulator keeps objects in memory and serves discovery, CRUD and watch-streams, but lacks
what kopf and our operator rely on: uids and resourceVersions, optimistic concurrency (it answers 500 where
Kubernetes answers 409/422), selectors, resumable watches and bookmarks, the status subresource, garbage
collection by ownerReferences, generateName (used by kopf's events), and it crashes on /api/v1/namespaces.
This subclass adds those (the pure parts are in :mod:`semantics`), plus API refusals switchable by tests.

Every state change is synchronous (no awaits), hence atomic on the event loop: a list or a watch snapshot
never interleaves with a change, so nothing is lost between a list and a watch from its resourceVersion.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import string
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar, cast

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal.rendering import StreamingError  # not exported by kmock 0.8

from .client import wait_for
from .semantics import (
    CRD,
    CRDS,
    EVENTS,
    NAMESPACES,
    Body,
    Change,
    Key,
    Refusal,
    Selector,
    api_error,
    api_version,
    crd_resources,
    guess_action,
    merge_patch,
    now,
    parse_path,
    spec_of,
    status_body,
    status_response,
)

Ref = kmock.resource | str  # e.g. 'v1/pods', 'batch/v1/jobs', FINETUNEJOBS
T = TypeVar("T")
SERVER_FIELDS = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation")
CONFLICT = "the object has been modified; please apply your changes to the latest version and try again"


REQUEST_HISTORY = 64


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the Kubernetes semantics that kopf relies on; see the module docstring."""

    crds: tuple[Body, ...] = (CRD,)
    bookmark_interval: float = 2.0  # seconds of watch silence before a BOOKMARK (if the client allows them)
    auto_namespaces: bool = True  # creating in a missing namespace creates it (Kubernetes answers 404)
    refusals: list[Refusal] = attrs.field(factory=list)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[Change] = attrs.field(factory=list, init=False)
    _log_floor: int = attrs.field(default=0, init=False)  # watches from an older resourceVersion get 410
    _watchers: set[asyncio.Queue[Change | None]] = attrs.field(factory=set, init=False)
    _request_count: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings(action="ignore", category=DeprecationWarning):  # kmock's read_binary()
            self.resources.load_bundled()  # the built-in resources of a recent cluster, for discovery
        for crd in self.crds:
            for resource, info in crd_resources(crd).items():
                self.resources[resource] = info
            self._create(CRDS, None, crd)

    # --- HTTP: parse requests ourselves, answer errors as Kubernetes Status objects ----------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Like kmock's, but with our path parsing, and API errors answered as expected, not recorded."""
        body, data = await raw.read(), None
        with contextlib.suppress(ValueError):
            data = json.loads(body) if body else None
        resource, namespace, name, subresource = parse_path(raw.path)
        watch = raw.query.get("watch") in ("true", "1")
        action = guess_action(raw.method, watch, name) if resource is not None and resource.plural else None
        request = kmock.Request(
            id=self._request_count, raw_request=raw, url=raw.url, method=raw.method, params=dict(raw.query),
            headers=dict(raw.headers), body=body, data=data, action=action, resource=resource,
            namespace=namespace, name=name, subresource=subresource,
        )  # fmt: skip
        self._request_count += 1
        self._requests.append(request)
        # kmock matches every request against the whole history (quadratic in a long test); reactions
        # only ever need the request at hand, so keep a short window.
        del self._requests[:-REQUEST_HISTORY]
        try:
            response = await self._handle(request)
        except Exception as e:
            stream = e.args[0] if isinstance(e, StreamingError) else None
            error = e.__cause__ if isinstance(e, StreamingError) and isinstance(e.__cause__, Exception) else e
            # Not an API error: a bug here or in a test's reaction. Answer 500, and fail the test at exit.
            if not isinstance(error, kmock.KubernetesError):
                if self._errors:
                    self._errors[-1].append(error)
                error = api_error(500, repr(error))
            return stream if stream is not None and stream.prepared else status_response(error)
        if action == kmock.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        for refusal in self.refusals:
            if request.action is not None and refusal.matches(request):
                refusal.hits += 1
                raise api_error(refusal.status, refusal.message, refusal.reason)
        # Skip KubernetesEmulator._handle(): it changes the state before any checks and even for requests
        # intercepted by tests' reactions. Our _serve_*() fallbacks change it; the reactions still go first.
        return await kmock.RawHandler._handle(self, request)

    async def _serve_version(self, request: kmock.Request) -> Body:
        discovery = cast(Body, await super()._serve_version(request))
        return discovery | {"groupVersion": discovery["groupVersion"].lstrip("/")}  # kmock says "/v1"

    async def _serve_list(self, request: kmock.Request) -> Body:
        resource, selector = self._resource(request), Selector.of(request)
        items = [obj for _, obj in self._live(resource) if selector.matches(obj)]
        meta = {"resourceVersion": str(self._rv), "continue": ""}  # kopf watches from this version
        kind = f"{self.resources[resource].kind}List"
        return {"apiVersion": api_version(resource), "kind": kind, "metadata": meta, "items": items}

    async def _serve_fetch(self, request: kmock.Request) -> Body:
        if request.subresource not in (None, "status"):
            raise api_error(404, f"subresource {request.subresource!r} is not emulated")
        return self._get_or_404(self._key(self._resource(request), request.namespace, request.name or ""))

    async def _serve_create(self, request: kmock.Request) -> Body:
        if request.name is not None:
            raise api_error(405, f"POST to {request.name}/{request.subresource} is not emulated")
        return self._create(self._resource(request), request.namespace, request.data)

    async def _serve_update(self, request: kmock.Request) -> Body:
        if "apply-patch" in request.headers.get("Content-Type", ""):
            raise api_error(415, "server-side apply is not emulated")
        key = self._key(self._resource(request), request.namespace, request.name or "")
        return self._update(key, request.data, request.subresource, replace=request.method == "PUT")

    async def _serve_delete(self, request: kmock.Request) -> Body:
        key = self._key(self._resource(request), request.namespace, request.name or "")
        options = request.data if isinstance(request.data, dict) else {}
        return self._delete(key, options.get("preconditions") or {})

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        resource, selector, params = self._resource(request), Selector.of(request), request.params
        since, initial = params.get("resourceVersion", ""), params.get("sendInitialEvents") == "true"
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params.get("timeoutSeconds", 0))  # the server ends the stream after it
        if since and not since.isdigit():
            raise api_error(400, f"invalid resourceVersion: {since!r}")
        if since not in ("", "0") and int(since) < self._log_floor and not initial:
            error = api_error(410, f"too old resource version: {since} ({self._log_floor})")
            yield {"type": "ERROR", "object": status_body(error)}
            return
        # Snapshot (or replay) and subscribe in one synchronous step: no change can slip in between.
        if since in ("", "0") or initial:
            backlog = [{"type": "ADDED", "object": o} for _, o in self._live(resource) if selector.matches(o)]
        else:
            changes = [c for c in self._log if c.rv > int(since) and c.resource == resource]
            backlog = [event for c in changes if (event := selector.event(c))]
        queue: asyncio.Queue[Change | None] = asyncio.Queue()
        self._watchers.add(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else float("inf")
        try:
            yield b""  # send the headers now: clients wait for them before reading any events
            for event in backlog:
                yield event
            if initial and bookmarks:
                yield self._bookmark(resource, initial_events_end=True)
            while loop.time() < deadline:
                try:
                    async with asyncio.timeout(min(self.bookmark_interval, deadline - loop.time())):
                        change = await queue.get()
                except TimeoutError:
                    if bookmarks and queue.empty():
                        yield self._bookmark(resource)
                    continue
                if change is None:
                    return
                if change.resource == resource and (event := selector.event(change)):
                    yield event
        finally:
            self._watchers.discard(queue)

    def _bookmark(self, resource: kmock.resource, initial_events_end: bool = False) -> Body:
        meta: Body = {"resourceVersion": str(self._rv)}
        if initial_events_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"apiVersion": api_version(resource), "kind": self.resources[resource].kind, "metadata": meta}
        return {"type": "BOOKMARK", "object": obj}

    # --- The state: each change is synchronous, gets a new resourceVersion, is logged and broadcast ------

    def _resource(self, request: kmock.Request) -> kmock.resource:
        if request.resource is None or request.resource not in self.resources:
            raise api_error(404, f"the server could not find the requested resource ({request.resource})")
        return request.resource

    def _key(self, resource: kmock.resource, namespace: str | None, name: str) -> Key:
        return resource, (namespace if self.resources[resource].namespaced else None), name

    def _current(self, key: Key) -> Body | None:
        return None if key not in self.objects or self.objects[key].deleted else self.objects[key].raw

    def _get_or_404(self, key: Key) -> Body:
        obj = self._current(key)
        if obj is None:
            raise api_error(404, f'{key[0].plural} "{key[2]}" not found')
        return obj

    def _live(self, resource: kmock.resource | None = None) -> list[tuple[Key, Body]]:
        return [(k, o.raw) for k, o in self.objects.items() if resource in (None, k[0]) and not o.deleted]

    def _commit(self, key: Key, kind: str, old: Body | None, new: Body) -> Body:
        self._rv += 1
        new = {**new, "metadata": {**new["metadata"], "resourceVersion": str(self._rv)}}
        if kind == "DELETED":
            self.objects[key].delete()  # kmock keeps the history for assertions
        elif key in self.objects:
            self.objects[key].history.append(new)
        else:
            self.objects[key] = new
        change = Change(self._rv, key[0], kind, old, new)
        self._log.append(change)
        for queue in self._watchers:
            queue.put_nowait(change)
        return new

    def _create(self, resource: kmock.resource, namespace: str | None, body: Any) -> Body:
        info = self.resources[resource]
        if not isinstance(body, dict):
            raise api_error(400, "the body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        namespace = (namespace or meta.get("namespace")) if info.namespaced else None
        if info.namespaced and (not namespace or meta.get("namespace", namespace) != namespace):
            raise api_error(400, "the namespace of the object does not match the namespace of the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase, k=5))
        if not meta.get("name"):
            raise api_error(422, "metadata.name: Required value: name or generateName is required")
        key = (resource, namespace, meta["name"])
        if self._current(key) is not None:
            raise api_error(409, f'{resource.plural} "{meta["name"]}" already exists', "AlreadyExists")
        if namespace and self.auto_namespaces and self._current((NAMESPACES, None, namespace)) is None:
            self._create(NAMESPACES, None, {"metadata": {"name": namespace}})
        if "status" in info.subresources:
            obj.pop("status", None)  # set only via the status subresource, as in Kubernetes
        meta.pop("deletionTimestamp", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        meta.update({"namespace": namespace} if namespace else {})
        obj |= {"apiVersion": api_version(resource), "kind": info.kind}
        return self._commit(key, "ADDED", None, obj)

    def _update(self, key: Key, body: Any, subresource: str | None = None, replace: bool = False) -> Body:
        """PATCH (a list: JSON-patch, a dict: merge-patch) or PUT (``replace``) an object or its status."""
        old, info = self._get_or_404(key), self.resources[key[0]]
        if subresource is not None and (subresource != "status" or "status" not in info.subresources):
            raise api_error(404, f"subresource {subresource!r} is not emulated")
        if isinstance(body, list):
            try:  # kopf tests the resourceVersion in finalizer patches, and retries on 422
                new = jsonpatch.apply_patch(old, body)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError) as e:
                raise api_error(422, f"the request is invalid: {e}") from e
        elif isinstance(body, dict):
            new = copy.deepcopy(body) if replace else merge_patch(old, body)
            expected_rv = (body.get("metadata") or {}).get("resourceVersion")  # a precondition if present
            if expected_rv not in (None, old["metadata"]["resourceVersion"]):
                conflict = f'Operation cannot be fulfilled on {key[0].plural} "{key[2]}": {CONFLICT}'
                raise api_error(409, conflict)
        else:
            raise api_error(400, "the body must be a JSON object or a JSON-patch list")
        if subresource == "status":  # only the status changes there; elsewhere, the status cannot change
            new = {**old, "status": new.get("status")}
        elif "status" in info.subresources:
            new = {**new, "status": old.get("status")}
        new = {k: v for k, v in new.items() if not (k == "status" and v is None)}
        meta = {k: v for k, v in (new.get("metadata") or {}).items() if k not in SERVER_FIELDS}
        meta |= {k: v for k, v in old["metadata"].items() if k in SERVER_FIELDS}
        new = {**new, "apiVersion": old["apiVersion"], "kind": old["kind"], "metadata": meta}
        if spec_of(new) != spec_of(old):
            meta["generation"] = old["metadata"].get("generation", 0) + 1
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # a no-op: no new resourceVersion, no watch event, as in Kubernetes
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key, old, new)
        return self._commit(key, "MODIFIED", old, new)

    def _delete(self, key: Key, preconditions: Body | None = None) -> Body:
        obj = self._get_or_404(key)
        for field, value in (preconditions or {}).items():
            if value not in (None, obj["metadata"].get(field)):
                raise api_error(409, f"Precondition failed: {field} in precondition: {value}")
        if obj["metadata"].get("deletionTimestamp"):
            return obj
        if obj["metadata"].get("finalizers"):
            meta = {**obj["metadata"], "deletionTimestamp": now(), "deletionGracePeriodSeconds": 0}
            return self._commit(key, "MODIFIED", obj, {**obj, "metadata": meta})
        return self._remove(key, obj, obj)

    def _remove(self, key: Key, old: Body, last: Body) -> Body:
        """Delete for real, then cascade (in the background, as by default): to the objects of a deleted
        namespace and to the dependents whose owners are all gone (ownerReferences)."""
        gone = self._commit(key, "DELETED", old, last)
        uids = {obj["metadata"]["uid"] for _, obj in self._live()}
        for dep_key, obj in self._live():
            owners = {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}
            orphaned = last["metadata"]["uid"] in owners and not owners & uids
            in_namespace = key[0] == NAMESPACES and dep_key[1] == key[2]
            if (orphaned or in_namespace) and self._current(dep_key) is not None:  # not cascaded already
                self._delete(dep_key)
        return gone

    # --- For tests: direct access (no HTTP, no refusals); call these in the emulator's event loop --------

    def create_object(self, resource: Ref, body: Body, namespace: str | None = None) -> Body:
        return copy.deepcopy(self._create(kmock.resource(resource), namespace, body))

    def get_object(self, resource: Ref, namespace: str | None, name: str) -> Body | None:
        return copy.deepcopy(self._current(self._key(kmock.resource(resource), namespace, name)))

    def list_objects(
        self, resource: Ref, namespace: str | None = None, labels: str = "", fields: str = ""
    ) -> list[Body]:
        """Like a list request, with the same label and field selectors: ``labels="app=a,tier"``."""
        selector = Selector(namespace, None, labels, fields)
        return [copy.deepcopy(o) for _, o in self._live(kmock.resource(resource)) if selector.matches(o)]

    def patch_object(
        self, resource: Ref, namespace: str | None, name: str, patch: Any, sub: str | None = None
    ) -> Body:
        """Merge-patch (a dict) or JSON-patch (a list) an object, or its status with ``sub='status'``."""
        return copy.deepcopy(self._update(self._key(kmock.resource(resource), namespace, name), patch, sub))

    def delete_object(self, resource: Ref, namespace: str | None, name: str) -> Body:
        return copy.deepcopy(self._delete(self._key(kmock.resource(resource), namespace, name)))

    def events_for(self, name: str, namespace: str | None = None) -> list[Body]:
        """Events (core v1 and events.k8s.io/v1) about an object, oldest first."""
        return [
            copy.deepcopy(event)
            for resource in EVENTS
            for _, event in self._live(resource)
            for about in [event.get("involvedObject") or event.get("regarding") or {}]
            if about.get("name") == name and namespace in (None, about.get("namespace"))
        ]

    async def wait_for(
        self, predicate: Callable[[], T | Awaitable[T]], timeout: float = 5, what: str = ""
    ) -> T:
        """Poll until the predicate gives a truthy value, and return it; fail the test after the timeout."""
        return await wait_for(predicate, timeout, what)

    def refuse(self, action: str | None, resource: Ref | None, **rule: Any) -> Refusal:
        """Make matching API requests fail, e.g. ``kube.refuse('create', 'v1/pods', status=403)``, until
        ``kube.refusals.remove(refusal)``; see :class:`Refusal` for the rule's fields."""
        refusal = Refusal(action, None if resource is None else kmock.resource(resource), **rule)
        self.refusals.append(refusal)
        return refusal

    @contextlib.contextmanager
    def refusing(self, action: str | None, resource: Ref | None, **rule: Any) -> Iterator[Refusal]:
        """The same as :meth:`refuse`, within a ``with`` block."""
        refusal = self.refuse(action, resource, **rule)
        try:
            yield refusal
        finally:
            self.refusals.remove(refusal)

    def exceed_quota(self, resource: Ref, namespace: str, quota: str = "compute-resources") -> Refusal:
        """Refuse creations as a full ResourceQuota does: 403 Forbidden with the quota's message."""
        plural = kmock.resource(resource).plural
        usage = f"requested: count/{plural}=1, used: count/{plural}=1, limited: count/{plural}=1"
        message = f"{plural} is forbidden: exceeded quota: {quota}, {usage}"
        return self.refuse("create", resource, namespace=namespace, message=message)

    def compact(self) -> None:
        """Forget the change log, as etcd's compaction does: watches resumed from before get 410 Gone."""
        self._log.clear()
        self._log_floor = self._rv

    def stop_watches(self) -> None:
        """End all watch-streams (clients reconnect), e.g. before the server stops."""
        for queue in self._watchers:
            queue.put_nowait(None)

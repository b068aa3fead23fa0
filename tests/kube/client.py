"""A small synchronous client for the tests' side of a real API server, shaped like the emulator's.

``KubeClient`` has the emulator's test methods (``create_object``, ``get_object``, ``list_objects``,
``patch_object``, ``delete_object``, ``events_for``, ``wait_for``), so that the pod simulators and
the scenarios run unchanged against either. It speaks plain REST with urllib3 rather than the
``kubernetes`` client: resources are named the way the tests name them (``"v1/pods"`` or a
``kmock.resource``), and errors are raised as ``kmock.KubernetesError``, as the emulator's are.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import kmock
import urllib3

Body = dict[str, Any]
Ref = kmock.resource | str
T = TypeVar("T")
EVENTS = ("v1/events", "events.k8s.io/v1/events")


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]], timeout: float = 5, what: str = "", interval: float = 0.02
) -> T:
    """Poll until the predicate gives a truthy value, and return it; fail the test after the timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        result = await result if inspect.isawaitable(result) else result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"Not true within {timeout}s: {what or predicate}")
        await asyncio.sleep(interval)


def resource_path(resource: Ref, namespace: str | None = None, name: str | None = None) -> str:
    """``/api/v1/namespaces/ns/pods/name`` and the like, for core and grouped resources."""
    ref = kmock.resource(resource) if isinstance(resource, str) else resource
    prefix = f"/apis/{ref.group}/{ref.version}" if ref.group else f"/api/{ref.version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{ref.plural}" + (f"/{name}" if name else "")


class KubeClient:
    """The API at ``url`` as one user (a client certificate in ``ssl_context``, or a bearer token)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._http = urllib3.PoolManager(ssl_context=ssl_context, maxsize=4, retries=False)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.requests = 0

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        allow: tuple[int, ...] = (),
    ) -> Body | None:
        """One API call; None for a status in ``allow``; any other error as a ``kmock.KubernetesError``."""
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {**self._headers, "Accept": "application/json"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), content_type
        self.requests += 1
        response = self._http.request(method, url, body=data, headers=headers, timeout=30)
        payload: Any = json.loads(response.data) if response.data else {}
        if response.status < 400:
            return payload
        if response.status in allow:
            return None
        payload = payload if isinstance(payload, dict) else {}
        reason, message = payload.get("reason", "Error"), payload.get("message", response.data.decode())
        raise kmock.KubernetesError(response.status, reason, message, payload.get("details") or {})

    # --- The emulator's test methods ---------------------------------------------------------------

    def create_object(self, resource: Ref, body: Body, namespace: str | None = None) -> Body:
        result = self.request("POST", resource_path(resource, namespace), body)
        assert result is not None
        return result

    def get_object(self, resource: Ref, namespace: str | None, name: str) -> Body | None:
        return self.request("GET", resource_path(resource, namespace, name), allow=(404,))

    def list_objects(
        self, resource: Ref, namespace: str | None = None, labels: str = "", fields: str = ""
    ) -> list[Body]:
        query = {k: v for k, v in {"labelSelector": labels, "fieldSelector": fields}.items() if v}
        result = self.request("GET", resource_path(resource, namespace), query=query)
        return list((result or {}).get("items") or [])

    def patch_object(
        self, resource: Ref, namespace: str | None, name: str, patch: Any, sub: str | None = None
    ) -> Body:
        """Merge-patch (a dict) or JSON-patch (a list) an object, or its status with ``sub='status'``."""
        kind = "application/json-patch+json" if isinstance(patch, list) else "application/merge-patch+json"
        path = resource_path(resource, namespace, name) + (f"/{sub}" if sub else "")
        result = self.request("PATCH", path, patch, content_type=kind)
        assert result is not None
        return result

    def delete_object(
        self, resource: Ref, namespace: str | None, name: str, grace_seconds: int | None = None
    ) -> Body | None:
        """Delete (in the background, like kubectl); None when it is gone already."""
        options: Body = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        return self.request("DELETE", resource_path(resource, namespace, name), options, allow=(404,))

    def events_for(self, name: str, namespace: str | None = None) -> list[Body]:
        """Core v1 events about an object, oldest first (kopf posts core v1 events)."""
        events = self.list_objects(EVENTS[0], namespace, fields=f"involvedObject.name={name}")
        return sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))

    async def wait_for(
        self, predicate: Callable[[], T | Awaitable[T]], timeout: float = 5, what: str = ""
    ) -> T:
        return await wait_for(predicate, timeout, what, interval=0.1)

"""Every call the operator makes to the Kubernetes API, in one small module.

The Helm chart's RBAC grants exactly the verbs used here (a test compares them). The client is the
synchronous ``kubernetes`` client run in worker threads; kopf itself watches and posts events.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from finetune_operator import GROUP, PLURAL, VERSION
from finetune_operator.api.naming import config_map_name, service_name


@dataclass
class KubeApiError(Exception):
    """The API server refused a call (forbidden, invalid, over quota, ...)."""

    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.reason} ({self.status}): {self.message}"


def _api_error(error: ApiException) -> KubeApiError:
    message = error.reason or ""
    try:
        body = json.loads(error.body or "{}")
        message = body.get("message", message)
        reason = body.get("reason") or error.reason or "Error"
    except ValueError:
        reason = error.reason or "Error"
    return KubeApiError(status=error.status or 0, reason=reason, message=message)


def load_api_client(server: str | None = None) -> kubernetes.client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig; ``server`` for tests."""
    configuration = kubernetes.client.Configuration()
    if server:
        configuration.host = server
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


class KubeApi:
    """Creates, deletes and patches the objects of FinetuneJobs."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self._core = kubernetes.client.CoreV1Api(client)
        self._custom = kubernetes.client.CustomObjectsApi(client)

    async def _call(self, method: Any, *args: Any, ignore: tuple[int, ...] = (), **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(method, *args, _preload_content=False, **kwargs)
        except ApiException as error:
            if error.status in ignore:
                return None
            raise _api_error(error) from None

    async def create(self, obj: dict[str, Any]) -> bool:
        """Creates a Pod, Service or ConfigMap; False when it exists already (creation is idempotent)."""
        create = {
            "Pod": self._core.create_namespaced_pod,
            "Service": self._core.create_namespaced_service,
            "ConfigMap": self._core.create_namespaced_config_map,
        }[obj["kind"]]
        response = await self._call(create, obj["metadata"]["namespace"], obj, ignore=(409,))
        return response is not None

    async def delete_pod(self, namespace: str, name: str) -> None:
        """Deletes a worker with its own grace period, so the trainer can save a checkpoint."""
        await self._call(self._core.delete_namespaced_pod, name, namespace, ignore=(404,))

    async def delete_rendezvous(self, namespace: str, job_name: str) -> None:
        """Deletes a finished job's Service and ConfigMap (its pods go one by one); the job stays."""
        await self._call(
            self._core.delete_namespaced_service, service_name(job_name), namespace, ignore=(404,)
        )
        await self._call(
            self._core.delete_namespaced_config_map, config_map_name(job_name), namespace, ignore=(404,)
        )

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """A merge patch of the status subresource (None values delete keys)."""
        await self._call(
            self._custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            ignore=(404,),
            _content_type="application/merge-patch+json",
        )

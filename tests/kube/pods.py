"""A pod-lifecycle simulator (like kwok): moves worker pods through the phases a kubelet would.

Tests call these to play the cluster's part; each writes the pod's status through the status
subresource, as a kubelet does, on the emulator or on the real API server.
"""

from __future__ import annotations

from typing import Any

from .client import KubeClient
from .emulator import KubeEmulator

PODS = "v1/pods"
Kube = KubeEmulator | KubeClient


def worker_pods(kube: Kube, namespace: str, job: str) -> list[dict[str, Any]]:
    pods = kube.list_objects(PODS, namespace, labels=f"finetune.dev/job-name={job}")
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def _set_status(kube: Kube, pod: dict[str, Any], status: dict[str, Any]) -> None:
    kube.patch_object(
        PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], {"status": status}, sub="status"
    )


def unschedulable(kube: Kube, pod: dict[str, Any], message: str) -> None:
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    _set_status(kube, pod, {"phase": "Pending", "conditions": [condition]})


def run(kube: Kube, pod: dict[str, Any], ready: bool = False, ip: str = "") -> None:
    rank = int(pod["metadata"]["labels"]["finetune.dev/node-rank"])
    _set_status(
        kube,
        pod,
        {
            "phase": "Running",
            "podIP": ip or f"10.0.0.{rank + 10}",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
            "containerStatuses": [{"name": "trainer", "ready": ready, "state": {"running": {}}}],
        },
    )


def terminate(kube: Kube, pod: dict[str, Any], code: int, message: str = "", reason: str = "") -> None:
    terminated = {
        "exitCode": code,
        "reason": reason or ("Completed" if code == 0 else "Error"),
        "message": message,
    }
    _set_status(
        kube,
        pod,
        {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "trainer", "ready": False, "state": {"terminated": terminated}}],
        },
    )

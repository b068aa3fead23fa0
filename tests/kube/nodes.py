"""GPU nodes for a real control plane that has no kubelets: Node objects, and the part of a kubelet
that every test needs all the time.

The scheduler binds pods only to registered Nodes with room for their requests, so the nodes here
declare ``nvidia.com/gpu`` capacity, as the NVIDIA device plugin does. A real API server keeps a
bound pod's graceful deletion waiting until its kubelet confirms that the containers stopped; the
``NodeAgent`` confirms it (a delete with grace period 0) for every pod on its nodes, in a thread of
its own, so that suspends, TTLs, namespace deletions and the garbage collector complete. Moving a
pod through its phases is the scenario's business (``pods.py``), or the process kubelet's, which
has a node of its own, tainted so that only the jobs that tolerate it land there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import kmock

from .client import KubeClient

NODES = "v1/nodes"
PODS = "v1/pods"
GPU = "nvidia.com/gpu"
PROCESS_TAINT = {"key": "finetune.dev/test-kubelet", "value": "process", "effect": "NoSchedule"}


def register_node(
    kube: KubeClient,
    name: str,
    gpus: int,
    *,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
) -> None:
    """Create a Ready node with ``gpus`` GPUs, room for 250 pods and plenty of CPU and memory."""
    metadata = {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}
    kube.create_object(NODES, {"metadata": metadata})
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "250", GPU: str(gpus)}
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated"}
    status = {"capacity": capacity, "allocatable": capacity, "conditions": [ready]}
    kube.patch_object(NODES, None, name, {"status": status}, sub="status")
    # Admission gave the new node the not-ready taint; the node lifecycle controller (not run here, so
    # that nothing evicts simulated pods) would lift it once Ready.
    kube.patch_object(NODES, None, name, {"spec": {"taints": taints or None}})


@dataclasses.dataclass
class NodeAgent:
    """Completes the graceful deletion of every pod bound to ``nodes``, every ``interval`` seconds."""

    kube: KubeClient
    nodes: frozenset[str]
    interval: float = 0.1
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    failure: BaseException | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                for pod in self.kube.list_objects(PODS):
                    meta = pod["metadata"]
                    if meta.get("deletionTimestamp") and pod["spec"].get("nodeName") in self.nodes:
                        with contextlib.suppress(kmock.KubernetesError):  # gone, or its namespace too
                            self.kube.delete_object(PODS, meta["namespace"], meta["name"], grace_seconds=0)
            except Exception as error:
                self.failure = error
                return

    @contextlib.contextmanager
    def running(self) -> Iterator[NodeAgent]:
        thread = threading.Thread(target=self._loop, name="node-agent", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)
        if self.failure is not None:
            raise self.failure

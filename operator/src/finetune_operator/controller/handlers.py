"""kopf wiring, and nothing else: events in, the reconciler called, per job.

Each FinetuneJob has a daemon that reconciles it whenever something about it changes (its own
events, or those of its worker pods, which wake it) and otherwise when a decision asked to look
again (deadlines, TTL) or after ``resync_seconds``. Worker pods are indexed by job, so every pass
sees the children as they are now, not as remembered from earlier events; so are the Nodes labelled
with nvidia.com/gpu.memory (cluster-scoped: kopf watches them cluster-wide even when it serves a list
of namespaces), for the MemoryFit check, unless the operator runs without reading nodes.

``build_registry`` registers the handlers: the index of nodes only when asked, since kopf would
otherwise watch nodes without the RBAC to (a 403, and the operator waits for an index that never fills).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from finetune_operator import GROUP, PLURAL, VERSION
from finetune_operator.api.memory_fit import GPU_MEMORY_LABEL, GpuNode
from finetune_operator.api.naming import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY
from finetune_operator.controller.observation import PodObservation, observe_pod
from finetune_operator.controller.reconciler import JobKey, Reconciler
from finetune_operator.controller.state import Event

WORKER_LABELS = {LABEL_JOB: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY}
NODES = ("v1", "nodes")  # the core group's: a bare "nodes" would also match metrics.k8s.io's NodeMetrics


@dataclass
class Wakeups:
    """One asyncio.Event per job, set when anything about the job changes."""

    events: dict[JobKey, asyncio.Event] = field(default_factory=dict)

    def get(self, key: JobKey) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    def wake(self, key: JobKey) -> None:
        self.get(key).set()


@dataclass
class OperatorContext:
    """What the handlers need, passed through kopf's memo so that tests can run several operators."""

    reconciler: Reconciler
    resync_seconds: float = 30.0
    wakeups: Wakeups = field(default_factory=Wakeups)


def post_event(body: Any, event: Event) -> None:
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """Annotations and finalizers under our own group; only warnings of handlers become Events."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # Only the GPU nodes, filtered by the API server: the others' status updates never reach the operator.
    settings.watching.label_selectors[NODES] = GPU_MEMORY_LABEL


def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_settings(settings)


async def close_connections(memo: Any, **_: Any) -> None:
    await memo.context.reconciler.poller.close()


def worker_pods(namespace: str, labels: dict[str, str], body: Any, **_: Any) -> dict[JobKey, PodObservation]:
    return {(namespace, labels[LABEL_JOB]): observe_pod(dict(body))}


def gpu_nodes(name: str, labels: Mapping[str, str], **_: Any) -> GpuNode:
    """One value per node, under the key None: the matching is the job's business (``gpu_memory_for``)."""
    return GpuNode.of(name, labels)


def wake_on_pod_event(namespace: str, labels: dict[str, str], memo: Any, **_: Any) -> None:
    memo.context.wakeups.wake((namespace, labels[LABEL_JOB]))


def wake_on_job_event(namespace: str, name: str, memo: Any, **_: Any) -> None:
    memo.context.wakeups.wake((namespace, name))


async def run_job(
    namespace: str,
    name: str,
    body: Any,
    worker_pods: kopf.Index,
    memo: Any,
    stopped: Any,
    gpu_nodes: kopf.Index | None = None,  # absent when the operator reads no nodes
    **_: Any,
) -> None:
    context: OperatorContext = memo.context
    key = (namespace, name)
    wakeup = context.wakeups.get(key)
    try:
        while not stopped:
            wakeup.clear()
            pods = list(worker_pods.get(key, []))
            nodes = list(gpu_nodes.get(None, [])) if gpu_nodes is not None else []
            requeue = await context.reconciler.reconcile(body, pods, nodes=nodes)
            timeout = min(requeue, context.resync_seconds) if requeue is not None else context.resync_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=max(timeout, 0.05))
    finally:
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
            context.reconciler.forget(key)
            context.wakeups.events.pop(key, None)


def build_registry(gpu_memory_from_nodes: bool = True) -> kopf.OperatorRegistry:
    """The operator's handlers; with ``gpu_memory_from_nodes`` also the index of GPU nodes, which needs
    list and watch on nodes cluster-wide (the chart's gpuMemoryFromNodes)."""
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(startup)
    kopf.on.cleanup(registry=registry)(close_connections)
    kopf.index("pods", labels=WORKER_LABELS, registry=registry)(worker_pods)
    if gpu_memory_from_nodes:
        kopf.index(*NODES, registry=registry)(gpu_nodes)
    kopf.on.event("pods", labels=WORKER_LABELS, registry=registry)(wake_on_pod_event)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(wake_on_job_event)
    kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10)(run_job)
    return registry


# The chart's default: GPU memory read from the nodes too.
registry = build_registry()

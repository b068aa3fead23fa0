"""kopf wiring, and nothing else: events in, the reconciler called, per job.

Each FinetuneJob has a daemon that reconciles it whenever something about it changes (its own
events, or those of its worker pods, which wake it) and otherwise when a decision asked to look
again (deadlines, TTL) or after ``resync_seconds``. Worker pods are indexed by job, so every pass
sees the children as they are now, not as remembered from earlier events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from finetune_operator import GROUP, PLURAL, VERSION
from finetune_operator.api.naming import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY
from finetune_operator.controller.observation import PodObservation, observe_pod
from finetune_operator.controller.reconciler import JobKey, Reconciler
from finetune_operator.controller.state import Event

registry = kopf.OperatorRegistry()
WORKER_LABELS = {LABEL_JOB: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY}


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


@kopf.on.startup(registry=registry)
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_settings(settings)


@kopf.on.cleanup(registry=registry)
async def close_connections(memo: Any, **_: Any) -> None:
    await memo.context.reconciler.poller.close()


@kopf.index("pods", labels=WORKER_LABELS, registry=registry)
def worker_pods(namespace: str, labels: dict[str, str], body: Any, **_: Any) -> dict[JobKey, PodObservation]:
    return {(namespace, labels[LABEL_JOB]): observe_pod(dict(body))}


@kopf.on.event("pods", labels=WORKER_LABELS, registry=registry)
def wake_on_pod_event(namespace: str, labels: dict[str, str], memo: Any, **_: Any) -> None:
    memo.context.wakeups.wake((namespace, labels[LABEL_JOB]))


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
def wake_on_job_event(namespace: str, name: str, memo: Any, **_: Any) -> None:
    memo.context.wakeups.wake((namespace, name))


@kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10)
async def run_job(
    namespace: str, name: str, body: Any, worker_pods: kopf.Index, memo: Any, stopped: Any, **_: Any
) -> None:
    context: OperatorContext = memo.context
    key = (namespace, name)
    wakeup = context.wakeups.get(key)
    try:
        while not stopped:
            wakeup.clear()
            requeue = await context.reconciler.reconcile(body, list(worker_pods.get(key, [])))
            timeout = min(requeue, context.resync_seconds) if requeue is not None else context.resync_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=max(timeout, 0.05))
    finally:
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
            context.reconciler.forget(key)
            context.wakeups.events.pop(key, None)

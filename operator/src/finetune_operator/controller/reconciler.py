"""Carries out the state machine's decisions for one job: observe, decide, act.

This is the only place where the pure parts (validation, ``state.decide``, ``manifests``) meet the
Kubernetes API (``kube.py``). It remembers four things between passes, all only as caches: the
status it last wrote (the watch may not have delivered it back yet, and acting on an older status
would count one failure twice), the parsed spec per generation, the gang it has just created
until the pod index shows it (the index lags the creates by a watch event, and the next pass, woken
by the status patch, would otherwise create the whole gang again, to four 409s: controller-runtime's
"expectations"), and which jobs' last pass failed on an API call (``decide`` clears ReconcileError
only after a pass that went through; clearing it optimistically in every pass would patch the status
twice a pass while the error lasts, and each patch wakes the job again).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from finetune_trainer.summary import parse_termination_message

from finetune_operator.api.memory_fit import GpuNode
from finetune_operator.api.spec import FinetuneJob, FinetuneJobStatus
from finetune_operator.api.timestamps import parse_time
from finetune_operator.api.validation import validate_object
from finetune_operator.controller.kube import KubeApi, KubeApiError
from finetune_operator.controller.manifests import WorkerSettings, build_gang
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.observation import PodObservation, ProgressReport, owned_by, parse_progress
from finetune_operator.controller.progress import ProgressPoller
from finetune_operator.controller.state import Decision, Event, JobObservation, decide, record_error

JobKey = tuple[str, str]
EventPoster = Callable[[Mapping[str, Any], Event], None]
# After an API error, try again this soon even without a new event.
RETRY_AFTER_ERROR_SECONDS = 15.0
# A created gang not in the pod index after this long is taken as gone (deleted before it was seen).
CREATION_EXPECTED_WITHIN_SECONDS = 30.0

logger = logging.getLogger(__name__)


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        settings: WorkerSettings,
        metrics: OperatorMetrics,
        post_event: EventPoster,
        poller: ProgressPoller | None = None,
        gpu_memory: int | None = None,
    ) -> None:
        self.api = api
        self.gpu_memory = gpu_memory  # bytes of one GPU, for MemoryFit (--gpu-memory)
        self.settings = settings
        self.metrics = metrics
        self.post_event = post_event
        self.poller = poller or ProgressPoller()
        self._written_status: dict[JobKey, FinetuneJobStatus] = {}
        self._parsed: dict[JobKey, tuple[int, FinetuneJob | None, tuple[str, ...]]] = {}
        self._creating: dict[JobKey, tuple[int, datetime]] = {}  # attempt created, and when
        self._failing: set[JobKey] = set()  # jobs whose last pass failed on an API call
        # Worker reports already checked for bad values (counted and logged once, not every pass): the
        # last /progress document, and (pod, termination message) pairs.
        self._progress_seen: dict[JobKey, dict[str, Any]] = {}
        self._messages_seen: dict[JobKey, set[tuple[str, str]]] = {}

    def forget(self, key: JobKey) -> None:
        """Drops what was remembered of a deleted job."""
        self._written_status.pop(key, None)
        self._parsed.pop(key, None)
        self._creating.pop(key, None)
        self._failing.discard(key)
        self._progress_seen.pop(key, None)
        self._messages_seen.pop(key, None)
        self.metrics.forget(key)
        self.poller.forget(key)

    def _parse(self, key: JobKey, body: Mapping[str, Any]) -> tuple[FinetuneJob | None, tuple[str, ...]]:
        generation = int(body.get("metadata", {}).get("generation") or 0)
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1], cached[2]
        manifest = {k: v for k, v in body.items() if k != "status"}
        job, issues = validate_object(manifest)
        reasons = tuple(str(issue) for issue in issues)
        self._parsed[key] = (generation, job, reasons)
        return job, reasons

    def observe(self, body: Mapping[str, Any], nodes: Iterable[GpuNode] = ()) -> JobObservation:
        """The job as ``decide`` takes it; ``nodes`` are the GPU nodes the operator's index holds now."""
        metadata = body.get("metadata", {})
        key = (metadata["namespace"], metadata["name"])
        job, reasons = self._parse(key, body)
        status = self._written_status.get(key) or FinetuneJobStatus.model_validate(body.get("status") or {})
        return JobObservation(
            name=metadata["name"],
            namespace=metadata["namespace"],
            generation=int(metadata.get("generation") or 0),
            created=parse_time(metadata.get("creationTimestamp")) or datetime.now(UTC),
            job=job,
            invalid_reasons=reasons,
            status=status,
            previous_pass_failed=key in self._failing,
            gpu_memory=self.gpu_memory,
            gpu_nodes=tuple(nodes),
        )

    async def reconcile(
        self,
        body: Mapping[str, Any],
        pods: Iterable[PodObservation],
        now: datetime | None = None,
        nodes: Iterable[GpuNode] = (),
    ) -> float | None:
        """One pass for one job; returns the seconds after which to look again without a new event.
        ``nodes``: the GPU nodes (kopf's index, so no API call per pass), for the MemoryFit check."""
        now = now or datetime.now(UTC)
        observed = self.observe(body, nodes)
        key = (observed.namespace, observed.name)
        # Workers are the pods the job controls: a pod with only its labels is another's, or anyone's.
        pods = owned_by(pods, str(body.get("metadata", {}).get("uid") or ""))
        self._check_messages(observed, pods)
        rank_zero = self._rank_zero(observed, pods)
        if rank_zero is not None:
            document = await self.poller.fetch(key, rank_zero.ip)
            progress = self._check_progress(key, document) if document is not None else None
            observed = replace(observed, progress=progress, progress_poll_seconds=self.poller.interval)
        decision = decide(observed, pods, now)
        if decision.create_attempt is None:
            self._creating.pop(key, None)  # the gang is all there, or none is wanted
        elif self._still_arriving(key, decision.create_attempt, now):
            decision = replace(decision, create_attempt=None)
        try:
            await self._apply(body, observed, decision)
        except KubeApiError as error:
            self._failing.add(key)
            await self._record_error(body, observed, error, now)
            return RETRY_AFTER_ERROR_SECONDS
        self._failing.discard(key)
        if decision.create_attempt is not None:
            self._creating[key] = (decision.create_attempt, now)
        self.metrics.phases[key] = decision.status.phase or "Pending"
        if decision.gang_restarted:
            self.metrics.gang_restarts.labels(observed.namespace).inc()
        if decision.all_workers_running_first_time:
            self.metrics.time_to_running.observe(max((now - observed.created).total_seconds(), 0.0))
        for event in decision.events:
            self.post_event(body, event)
        return decision.requeue_after

    def _dropped(self, key: JobKey, source: str, where: str, names: list[str]) -> None:
        """Bad values of a worker's report: a log line and the counter, once per report."""
        if names:
            self.metrics.dropped_report_values.labels(source).inc(len(names))
            logger.warning(
                "%s/%s: %s left out of the job's status (malformed, out of bounds or not finite): %s",
                *key,
                where,
                ", ".join(dict.fromkeys(names)),
            )

    def _check_progress(self, key: JobKey, document: dict[str, Any]) -> ProgressReport:
        report = parse_progress(document)
        if self._progress_seen.get(key) is not document:
            self._progress_seen[key] = document
            self._dropped(key, "progress", "values of rank 0's /progress", list(report.dropped))
        return report

    def _check_messages(self, observed: JobObservation, pods: list[PodObservation]) -> None:
        key = (observed.namespace, observed.name)
        output_uri = observed.job.spec.output.uri if observed.job is not None else None
        seen = self._messages_seen.setdefault(key, set())
        current = {(p.name, p.termination_message) for p in pods if p.termination_message}
        seen &= current  # forget pods that are gone
        for name, message in current - seen:
            seen.add((name, message))
            dropped: list[str] = []
            parse_termination_message(message, output_uri=output_uri, dropped=dropped)
            self._dropped(key, "termination", f"values of pod {name}'s termination message", dropped)

    def _still_arriving(self, key: JobKey, attempt: int, now: datetime) -> bool:
        """Whether this operator created the gang of ``attempt`` moments ago: the pods that the state
        machine misses are on their way into the index, not gone. Once a pass needs no creation, or
        the time is up, the next missing pod is a missing pod."""
        created = self._creating.get(key)
        if created is None or created[0] != attempt:
            return False
        if (now - created[1]).total_seconds() > CREATION_EXPECTED_WITHIN_SECONDS:
            del self._creating[key]
            return False
        return True

    @staticmethod
    def _rank_zero(observed: JobObservation, pods: list[PodObservation]) -> PodObservation | None:
        """Worker 0 of the current attempt, when it runs and has an address to poll."""
        if observed.job is None or observed.status.phase in ("Succeeded", "Failed", "Suspended"):
            return None
        attempt = observed.status.restarts
        return next(
            (p for p in pods if p.node_rank == 0 and p.attempt == attempt and p.phase == "Running" and p.ip),
            None,
        )

    async def _apply(self, body: Mapping[str, Any], observed: JobObservation, decision: Decision) -> None:
        """Status first: a pass that dies half-way leaves a status the next pass can act on."""
        await self._write_status(observed, decision.status)
        for name in decision.delete_pods:
            await self.api.delete_pod(observed.namespace, name)
        if decision.delete_children:
            await self.api.delete_rendezvous(observed.namespace, observed.name)
        if decision.create_attempt is not None and observed.job is not None:
            uid = body.get("metadata", {}).get("uid", "")
            for child in build_gang(observed.job, uid, decision.create_attempt, self.settings):
                await self.api.create(child)

    async def _write_status(self, observed: JobObservation, status: FinetuneJobStatus) -> None:
        """Patches only when something changed since the status last stored; keys that became None or
        unset are removed."""
        key = (observed.namespace, observed.name)
        stored = self._written_status.get(key, observed.status).to_api()
        present = status.to_api()
        if present == stored:
            return
        removed = {k: None for k in stored if k not in present}
        await self.api.patch_status(observed.namespace, observed.name, {**present, **removed})
        self._written_status[key] = status

    async def _record_error(
        self, body: Mapping[str, Any], observed: JobObservation, error: KubeApiError, now: datetime
    ) -> None:
        """The operator's own failures go into a condition and an event, not only into its log."""
        self.metrics.reconcile_errors.labels(error.reason).inc()
        message = f"the operator could not act on the job: {error}"
        logger.warning("%s/%s: %s", observed.namespace, observed.name, message)
        self.post_event(body, Event("Warning", "ReconcileError", message))
        known = self._written_status.get((observed.namespace, observed.name), observed.status)
        try:
            await self._write_status(
                observed, record_error(known, error.reason, message, now, observed.generation)
            )
        except KubeApiError as again:
            logger.warning(
                "%s/%s: cannot record the error in status: %s", observed.namespace, observed.name, again
            )

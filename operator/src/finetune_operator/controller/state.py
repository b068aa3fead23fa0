"""The lifecycle of a FinetuneJob as a pure function: observed job and worker pods in, actions out.

``decide`` never remembers anything between calls: everything it needs is in the job (its spec and
the status the operator wrote) and in the pods it observes, so a restarted operator or a missed
event converges to the same answer. ``reconciler.py`` feeds it and carries its actions out as they
are: the decision is complete, status included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_trainer.summary import (
    EVAL_GATE_NOT_MET,
    MAX_ERROR_CHARS,
    NON_FINITE_LOSS,
    NON_RETRYABLE_EXIT_CODE,
    STALLED,
    TerminationSummary,
    parse_termination_message,
)

from finetune_operator.api.memory_fit import (
    GpuNode,
    ModelConfigError,
    Plan,
    check_fit,
    gpu_memory_for,
    shape_from_annotation,
)
from finetune_operator.api.spec import Condition, FinetuneJob, FinetuneJobStatus, Phase, WorkersStatus
from finetune_operator.api.timestamps import format_time, parse_time
from finetune_operator.controller.observation import PodObservation, ProgressReport, progress_status

TERMINAL_PHASES: tuple[Phase, ...] = ("Succeeded", "Failed")
# Phases in which rank 0 reports progress, so the job is looked at again every poll interval.
REPORTING_PHASES: tuple[Phase, ...] = ("Initializing", "Running")
# Failure reasons the trainer reports that also become a condition of their own (type = reason,
# status True, the trainer's message), so that they can be watched for and are not lost in the phase.
TRAINER_CONDITIONS = (STALLED, NON_FINITE_LOSS)
# EVAL_GATE_NOT_MET, the trainer's reason for a run whose final metric missed spec.evaluation.gate, is not
# among them: the job is Failed with it as the reason, the model under <output>/rejected/, no outputModel.
# A trainer's reason is used as a condition reason only in the form Kubernetes allows (metav1.Condition).
_REASON = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]{0,1022}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class JobObservation:
    """The FinetuneJob as the reconciler sees it: parsed spec (or the reasons it is invalid) and status."""

    name: str
    namespace: str
    generation: int
    created: datetime
    job: FinetuneJob | None
    invalid_reasons: tuple[str, ...] = ()
    status: FinetuneJobStatus = field(default_factory=FinetuneJobStatus)
    # The newest /progress document of global rank 0, when the operator could read one (the reconciler
    # passes it parsed; a raw document is parsed here, its bad values left out).
    progress: ProgressReport | dict[str, Any] | None = None
    # While rank 0 runs: how often its /progress is read, the longest the job may wait for a look.
    progress_poll_seconds: float | None = None
    # The reconciler's previous pass failed on an API call (its ReconcileError is still current).
    previous_pass_failed: bool = False
    # The memory of one GPU in bytes (the operator's --gpu-memory), for the MemoryFit condition; a
    # job's nodeSelector on nvidia.com/gpu.memory overrides it, and so do the labels of the nodes it
    # matches (the operator's index of Nodes with nvidia.com/gpu.memory; empty when it reads no nodes).
    gpu_memory: int | None = None
    gpu_nodes: tuple[GpuNode, ...] = ()


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    """What to do now; the reconciler applies it in this order: status, deletions, creation, events."""

    status: FinetuneJobStatus
    create_attempt: int | None = None
    delete_pods: list[str] = field(default_factory=list)
    # The Service and ConfigMap (pods are named in delete_pods).
    delete_children: bool = False
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    gang_restarted: bool = False
    all_workers_running_first_time: bool = False


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """Conditions with one updated (None: Unknown); lastTransitionTime moves only when the status flips."""
    value = "Unknown" if status is None else "True" if status else "False"
    previous = next((c for c in conditions if c.type == type_), None)
    transition = previous.last_transition_time if previous and previous.status == value else format_time(now)
    updated = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [updated]


def _condition_true(status: FinetuneJobStatus, type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in status.conditions)


def record_error(
    status: FinetuneJobStatus, reason: str, message: str, now: datetime, generation: int
) -> FinetuneJobStatus:
    """The status with ReconcileError=True: the operator's own failures shown where users look.

    Only the reconciler sees an API call fail, so it calls this; ``decide`` clears the condition
    again after a pass that went through."""
    conditions = set_condition(status.conditions, "ReconcileError", True, reason, message, now, generation)
    return status.model_copy(update={"conditions": conditions})


def _summary(pod: PodObservation, output_uri: str | None = None) -> TerminationSummary | None:
    """The worker's summary, bounded; an outputModel only when under ``output_uri``."""
    return parse_termination_message(pod.termination_message, output_uri=output_uri)


# The latest moment a date can name: a deadline or TTL beyond it never comes.
_LATEST = datetime.max.replace(tzinfo=UTC)


def _after(moment: datetime, seconds: int) -> datetime:
    """``moment`` plus ``seconds``, clamped: 10**12 seconds is past what a datetime can hold."""
    try:
        return moment + timedelta(seconds=seconds)
    except OverflowError:
        return _LATEST


def _time(text: str | None) -> datetime | None:
    """A timestamp of the status; None when it is absent or not one (a status anyone may have patched)."""
    try:
        return parse_time(text)
    except (TypeError, ValueError):
        return None


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _trainer_reason(summary: TerminationSummary | None) -> str:
    """The reason the trainer gave for its failure (Stalled, NonFiniteLoss), when it gave a usable one."""
    reason = summary.reason if summary is not None else ""
    return reason if _REASON.fullmatch(reason) else ""


def _cause(failed: list[PodObservation]) -> PodObservation:
    """The failed worker whose failure ended the gang. A summary marked collateral says that its rank
    ended only because another rank failed, so the others come first; among those, the first to finish
    (the others often die of it: "connection reset by peer"), then the lowest node rank."""

    def key(pod: PodObservation) -> tuple[bool, str, int]:
        summary = _summary(pod)
        return (summary is not None and summary.collateral, pod.finished_at or "~", pod.node_rank)

    return min(failed, key=key)


def _failure_description(pod: PodObservation) -> tuple[str, str]:
    """(reason, message) for a failed or lost worker, preferring the trainer's own words."""
    summary = _summary(pod)
    where = f"worker {pod.node_rank} (pod {pod.name})"
    reason = _trainer_reason(summary)
    if pod.exit_code == NON_RETRYABLE_EXIT_CODE:
        error = (
            summary.error
            if summary and summary.error
            else _shorten(pod.termination_message, MAX_ERROR_CHARS) or "non-retryable error"
        )
        return reason or "NonRetryableError", f"{where}: {error}"
    if pod.deleting and pod.phase not in ("Failed", "Succeeded"):
        return "WorkerDeleted", f"{where} was deleted (preemption, eviction or node drain)"
    if pod.reason == "Evicted" or pod.exit_code is None:
        return pod.reason or "WorkerFailed", f"{where} failed: {pod.message or pod.reason or 'no exit code'}"
    detail = summary.error if summary and summary.error else pod.reason
    suffix = f" ({detail})" if detail else ""
    return (reason or ("OOMKilled" if pod.reason == "OOMKilled" else "WorkerFailed")), (
        f"{where} exited with code {pod.exit_code}{suffix}"
    )


class _Builder:
    """Accumulates the new status, events and actions of one decision."""

    def __init__(self, observed: JobObservation, now: datetime) -> None:
        self.observed = observed
        self.now = now
        known = observed.status
        # Copied, never changed in place: the observed status may be the reconciler's cache. The
        # fields set here are in every status written, as before the status was typed.
        self.status = known.model_copy(
            update={
                "phase": known.phase,
                "restarts": known.restarts,
                "conditions": known.conditions,
                "message": known.message,
                "observed_generation": observed.generation,
            }
        )
        self.decision = Decision(status=self.status)

    @property
    def phase(self) -> Phase | None:
        return self.status.phase

    def condition(self, type_: str, status: bool | None, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, status, reason, message, self.now, self.observed.generation
        )

    def move_to(self, phase: Phase, message: str, reason: str | None = None, warning: bool = False) -> None:
        """Sets the phase and message; an Event records every change of phase."""
        if self.phase != phase:
            self.decision.events.append(Event("Warning" if warning else "Normal", reason or phase, message))
        self.status.phase = phase
        self.status.message = message
        self.condition("Running", phase == "Running", reason or phase, message)

    def fail(self, reason: str, message: str) -> None:
        self.move_to("Failed", message, reason, warning=True)
        self.condition("Failed", True, reason, message)
        self.finish()

    def finish(self) -> None:
        self.status.completion_time = self.status.completion_time or format_time(self.now)

    def delete(self, pods: list[PodObservation]) -> None:
        for name in (p.name for p in pods if not p.deleting):
            if name not in self.decision.delete_pods:
                self.decision.delete_pods.append(name)

    def stop(self, pods: list[PodObservation]) -> None:
        """Deletes the workers still alive; finished ones stay for `kubectl logs` until the TTL."""
        self.delete([p for p in pods if p.phase not in ("Succeeded", "Failed")])


def _terminal(b: _Builder, pods: list[PodObservation], spec: FinetuneJob | None) -> Decision:
    """Finished jobs: stop leftover workers, then delete children after ttlSecondsAfterFinished."""
    b.stop(pods)
    ttl = spec.spec.run_policy.ttl_seconds_after_finished if spec else 0
    finished = _time(b.status.completion_time)
    if finished is None and b.status.completion_time:  # unreadable: the TTL counts from now
        b.status.completion_time = format_time(b.now)
        finished = _time(b.status.completion_time)
    cleaned = any(c.type == "ChildrenDeleted" for c in b.status.conditions)
    if ttl > 0 and finished is not None and not cleaned:
        due = _after(finished, ttl)
        if b.now >= due:
            b.delete(pods)
            b.decision.delete_children = True
            message = (
                f"ttlSecondsAfterFinished ({ttl}s) passed: deleted the job's pods, Service and ConfigMap"
            )
            b.condition("ChildrenDeleted", True, "TTLExpired", message)
            b.decision.events.append(Event("Normal", "ChildrenDeleted", message))
        else:
            b.decision.requeue_after = (due - b.now).total_seconds()
    return b.decision


def decide(observed: JobObservation, pods: list[PodObservation], now: datetime) -> Decision:
    """The next step for one job, from its spec, the status written so far and its worker pods."""
    b = _Builder(observed, now)
    decision = _next_step(b, pods)
    # An error recorded by a pass before the last one is over: that pass went through.
    if _condition_true(b.status, "ReconcileError") and not observed.previous_pass_failed:
        b.condition("ReconcileError", False, "Recovered")
    poll = observed.progress_poll_seconds
    if poll is not None and b.phase in REPORTING_PHASES:
        decision.requeue_after = min(decision.requeue_after or poll, poll)
    return decision


def _next_step(b: _Builder, pods: list[PodObservation]) -> Decision:
    observed, now = b.observed, b.now
    job = observed.job
    if job is None:
        if b.phase != "Failed":
            reasons = "; ".join(observed.invalid_reasons)
            b.fail("InvalidSpec", f"the FinetuneJob is invalid: {reasons}")
        return _terminal(b, pods, None)
    if b.phase in TERMINAL_PHASES:
        return _terminal(b, pods, job)

    policy = job.spec.run_policy
    attempt = b.status.restarts
    nodes = job.spec.resources.nodes
    current = [p for p in pods if p.attempt == attempt and 0 <= p.node_rank < nodes]
    stale = [p for p in pods if p.attempt != attempt]
    # A pod of this attempt with a rank the gang has not: never one of its workers, only deleted.
    b.delete([p for p in pods if p.attempt == attempt and not 0 <= p.node_rank < nodes])

    if policy.suspend:
        b.delete(pods)
        if b.phase != "Suspended":
            message = "suspended: workers deleted; checkpoints and outputs stay in S3"
            b.move_to("Suspended", message)
            b.condition("Suspended", True, "Suspended", message)
            b.status.start_time = None  # the deadline counts again from the resume, as for a batch Job
        b.status.workers = WorkersStatus(total=job.spec.resources.nodes, ready=0)
        return b.decision
    if b.phase == "Suspended":
        if pods:  # the suspended workers are still stopping: they must not look like failures
            b.delete(pods)
            b.status.message = "resuming: waiting for the suspended workers to stop"
            return b.decision
        b.condition("Suspended", False, "Resumed", "resumed from the newest complete checkpoint")
        b.decision.events.append(Event("Normal", "Resumed", "resuming from the newest complete checkpoint"))

    fit = memory_fit(job, observed.gpu_memory, observed.gpu_nodes)
    if fit is not None:
        b.condition("MemoryFit", *fit)
        # Before any pod of the job ran (also after a resume: resources may change while suspended),
        # never a gang that runs or ran: the estimate is an estimate.
        if fit[0] is False and not pods and not b.status.start_time:
            b.fail(INSUFFICIENT_GPU_MEMORY, f"the job does not fit in GPU memory: {fit[2]}")
            return b.decision

    started_at = _time(b.status.start_time)
    if started_at is None and b.status.start_time:  # unreadable: the deadline counts from now
        b.status.start_time = format_time(now)
        started_at = _time(b.status.start_time)
    if policy.active_deadline_seconds and started_at is not None:
        deadline = _after(started_at, policy.active_deadline_seconds)
        if now >= deadline:
            b.stop(pods)
            b.fail(
                "DeadlineExceeded",
                f"ran longer than activeDeadlineSeconds ({policy.active_deadline_seconds}s)",
            )
            return b.decision
        b.decision.requeue_after = (deadline - now).total_seconds()

    if stale:
        b.delete(stale)
        b.move_to("Restarting", b.status.message or "waiting for the previous workers to stop")
        return b.decision

    return _run_attempt(b, job, attempt, current)


def _run_attempt(b: _Builder, job: FinetuneJob, attempt: int, current: list[PodObservation]) -> Decision:
    nodes = job.spec.resources.nodes
    by_rank = {p.node_rank: p for p in current}
    started = [p for p in current if p.started]
    previously_ready = b.status.workers.ready if b.status.workers else 0
    b.status.workers = WorkersStatus(total=nodes, ready=sum(1 for p in current if p.phase == "Running"))

    failed = [p for p in current if p.phase == "Failed" or (p.deleting and p.phase != "Succeeded")]
    lost = [rank for rank in range(nodes) if rank not in by_rank] if started else []
    if failed or lost:
        return _handle_failure(b, job, attempt, current, failed, lost)

    if len(by_rank) < nodes:
        b.decision.create_attempt = attempt
        if b.phase in (None, "Suspended"):
            b.move_to("Pending", f"creating {nodes} worker pod(s)")
        return b.decision

    if all(p.phase == "Succeeded" for p in current):
        summary = _summary(by_rank[0], output_uri=job.spec.output.uri)
        b.move_to("Succeeded", "training finished")
        # What the trainer left out of its summary (a NaN metric) is said where the outcome is.
        notes = "".join(f"; {note}" for note in summary.notes) if summary is not None else ""
        b.condition("Succeeded", True, "Succeeded", f"every worker exited 0{notes}")
        if summary is not None:
            b.status.output_model = summary.output_model or b.status.output_model
            if summary.metrics:
                final = {k: round(v, 4) for k, v in summary.metrics.items()}
                b.status.metrics = {**b.status.metrics, **final}
            if summary.step is not None and b.status.progress:
                b.status.progress = b.status.progress.model_copy(
                    update={"step": summary.step, "percent": 100, "eta_seconds": 0}
                )
        b.finish()
        return b.decision

    if started and not b.status.start_time:
        b.status.start_time = format_time(b.now)
    if len(started) < nodes:
        blocked = next((p for p in current if p.unschedulable or p.waiting), None)
        if blocked is not None:
            detail = f"Unschedulable: {blocked.unschedulable}" if blocked.unschedulable else blocked.waiting
            reason = "Unschedulable" if blocked.unschedulable else "Pending"
            b.move_to("Pending", f"worker {blocked.node_rank}: {detail}", reason)
        elif started:
            b.move_to("Initializing", f"{len(started)} of {nodes} workers started")
        else:
            b.move_to("Pending", f"waiting for {nodes} worker pod(s) to start")
        return b.decision

    b.decision.all_workers_running_first_time = (
        attempt == 0 and previously_ready < nodes and b.status.workers.ready == nodes
    )
    # Running once rank 0 reports; it stays so while rank 0 finishes first or its probe flaps.
    if by_rank[0].ready or b.phase == "Running" or by_rank[0].phase == "Succeeded":
        b.move_to("Running", "training")
    else:
        b.move_to("Initializing", "all workers started; waiting for training to report progress")
    reported = progress_status(b.observed.progress) if b.observed.progress is not None else None
    if reported is not None and reported.progress is not None and reported.progress.total_steps:
        b.status.progress = reported.progress
        b.status.metrics = {**b.status.metrics, **reported.metrics}
        if reported.base_metrics:
            b.status.base_metrics = {**b.status.base_metrics, **reported.base_metrics}
        if reported.checkpoints:
            b.status.checkpoints = reported.checkpoints
    return b.decision


INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"


def memory_fit(
    job: FinetuneJob, gpu_memory: int | None, nodes: Iterable[GpuNode] = ()
) -> tuple[bool | None, str, str] | None:
    """The MemoryFit condition (status, reason, message), or None for a job that declares no model shape
    (annotation finetune.dev/model-config) or trains on CPUs: the estimate of api/memory_fit.py, against
    the GPU memory ``gpu_memory_for`` finds (job's nodeSelector, matching nodes, then ``gpu_memory``).

    False only when the estimate is above 100 % of the GPU: then the job fails before a pod exists."""
    if job.spec.resources.gpus_per_node == 0:
        return None
    try:
        shape = shape_from_annotation(job)
    except ModelConfigError as error:
        return None, "InvalidModelShape", _shorten(str(error), MAX_ERROR_CHARS)
    if shape is None:
        return None
    memory, origin = gpu_memory_for(job, gpu_memory, nodes)
    if memory is None:
        return (
            None,
            "UnknownGPUMemory",
            "no GPU memory known: no node that matches the job's nodeSelector has the label "
            "nvidia.com/gpu.memory (or the operator reads no nodes); set the operator's --gpu-memory "
            "(Helm gpuMemory) or a nodeSelector on nvidia.com/gpu.memory",
        )
    report = check_fit(shape, Plan.from_job(job), memory)
    message = _shorten(f"{report.summary}; GPU memory: {origin}", MAX_ERROR_CHARS)
    reason = {"fits": "Fits", "tight": "Tight", "does-not-fit": "DoesNotFit"}[report.verdict]
    return report.fits, reason, message


def rejected_prefix(output_uri: str) -> str:
    """Where the trainer writes a model the eval gate rejected: <output>/rejected/."""
    return output_uri.rstrip("/") + "/rejected/"


def _gate_failure(b: _Builder, job: FinetuneJob, cause: PodObservation, message: str) -> str:
    """A run the eval gate rejected: its final metrics go to status.metrics (the value that missed the
    gate among them), and the message says where the rejected model is. status.outputModel stays unset:
    it names only a model that passed, whatever the summary says."""
    summary = _summary(cause, output_uri=job.spec.output.uri)
    if summary is None:
        return message
    if summary.metrics:
        b.status.metrics = {**b.status.metrics, **{k: round(v, 4) for k, v in summary.metrics.items()}}
    rejected = summary.output_model  # under the job's spec.output.uri (parse_termination_message checks)
    if rejected.startswith(rejected_prefix(job.spec.output.uri)) and rejected not in message:
        message = f"{_shorten(message, MAX_ERROR_CHARS)}; the rejected model is at {rejected}"
    return message


def _handle_failure(
    b: _Builder,
    job: FinetuneJob,
    attempt: int,
    current: list[PodObservation],
    failed: list[PodObservation],
    lost: list[int],
) -> Decision:
    """Non-retryable errors fail at once; others restart the gang until backoffLimit is spent.

    A reason the trainer names (Stalled, NonFiniteLoss) is the failure's reason and, in
    TRAINER_CONDITIONS, a condition of its own with the trainer's message."""
    non_retryable = [p for p in failed if p.exit_code == NON_RETRYABLE_EXIT_CODE]
    if non_retryable:
        cause = _cause(non_retryable)
        reason, message = _failure_description(cause)
        if reason in TRAINER_CONDITIONS:
            b.condition(reason, True, reason, message)
        if reason == EVAL_GATE_NOT_MET:
            message = _gate_failure(b, job, cause, message)
        b.stop(current)
        b.fail(reason, message)
        return b.decision
    if failed:
        reason, message = _failure_description(_cause(failed))
    else:
        reason, message = "WorkerLost", f"worker {lost[0]}'s pod disappeared"
    if reason in TRAINER_CONDITIONS:
        b.condition(reason, True, reason, message)
    limit = job.spec.run_policy.backoff_limit
    if attempt >= limit:
        b.stop(current)
        b.fail(
            "BackoffLimitExceeded",
            f"the gang failed {attempt + 1} time(s) (backoffLimit {limit}); "
            f"last failure: {reason}: {message}",
        )
        return b.decision
    b.delete(current)
    b.status.restarts = attempt + 1
    b.decision.gang_restarted = True
    b.move_to(
        "Restarting",
        f"{reason}: {message}; restarting the gang from the newest complete checkpoint "
        f"(restart {attempt + 1} of {limit})",
        "GangRestart",
        warning=True,
    )
    return b.decision

"""What the operator reads from the cluster, parsed for the state machine: worker pods and rank 0's
/progress document.

Kept apart from ``state.py`` so that the state machine sees only typed observations, never a pod
body or a raw document, and so that the pod index (``handlers.py``) parses each pod once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_operator.api.naming import LABEL_ATTEMPT, LABEL_NODE_RANK
from finetune_operator.api.spec import CheckpointStatus, FinetuneJobStatus, ProgressStatus

# Waiting reasons that keep a pod from starting until someone fixes something; shown as Pending.
BLOCKED_WAITING_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)
# Checkpoints listed in status: the newest few are what people act on.
STATUS_CHECKPOINTS = 10


@dataclass(frozen=True)
class PodObservation:
    """What the state machine needs to know about one worker pod."""

    name: str
    node_rank: int
    attempt: int
    phase: str = "Pending"
    deleting: bool = False
    started: bool = False
    ready: bool = False
    exit_code: int | None = None
    finished_at: str = ""
    reason: str = ""
    message: str = ""
    termination_message: str = ""
    unschedulable: str = ""
    waiting: str = ""
    ip: str = ""


def observe_pod(pod: dict[str, Any]) -> PodObservation:
    """Reads a worker pod's body into a PodObservation."""
    metadata = pod.get("metadata", {})
    labels = metadata.get("labels", {})
    status = pod.get("status", {}) or {}
    container = next(iter(status.get("containerStatuses") or []), {})
    state = container.get("state", {}) or {}
    terminated = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    unschedulable = ""
    ready = False
    for condition in status.get("conditions") or []:
        if (condition.get("type"), condition.get("status"), condition.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            unschedulable = condition.get("message", "") or "no node fits the pod"
        if condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
    waiting_reason = waiting.get("reason", "")
    return PodObservation(
        name=metadata.get("name", ""),
        node_rank=int(labels.get(LABEL_NODE_RANK, "0")),
        attempt=int(labels.get(LABEL_ATTEMPT, "0")),
        phase=status.get("phase", "Pending"),
        deleting=bool(metadata.get("deletionTimestamp")),
        started="running" in state or "terminated" in state,
        ready=ready,
        exit_code=terminated.get("exitCode"),
        finished_at=terminated.get("finishedAt") or "",
        reason=terminated.get("reason") or status.get("reason", ""),
        message=status.get("message", ""),
        termination_message=terminated.get("message", ""),
        unschedulable=unschedulable,
        waiting=f"{waiting_reason}: {waiting.get('message', '')}".rstrip(": ")
        if waiting_reason in BLOCKED_WAITING_REASONS
        else "",
        ip=status.get("podIP", ""),
    )


def progress_status(document: dict[str, Any]) -> FinetuneJobStatus:
    """status.progress, status.metrics and status.checkpoints (only these set) from rank 0's /progress
    document."""
    step, total = int(document.get("step") or 0), int(document.get("totalSteps") or 0)
    progress = ProgressStatus(
        step=step,
        total_steps=total,
        epoch=round(float(document.get("epoch") or 0.0), 3),
        percent=min(100, step * 100 // total) if total else 0,
    )
    if document.get("etaSeconds") is not None:
        progress.eta_seconds = int(document["etaSeconds"])
    if document.get("tokensPerSecond") is not None:
        progress.tokens_per_second = round(float(document["tokensPerSecond"]), 1)
    metrics = {k: round(float(v), 4) for k, v in (document.get("evalMetrics") or {}).items()}
    if document.get("trainLoss") is not None:
        metrics["trainLoss"] = round(float(document["trainLoss"]), 4)
    checkpoints = [
        CheckpointStatus.model_validate(
            {k: c[k] for k in ("step", "uri", "evalLoss", "time") if c.get(k) is not None}
        )
        for c in (document.get("checkpoints") or [])[-STATUS_CHECKPOINTS:]
    ]
    return FinetuneJobStatus(progress=progress, metrics=metrics, checkpoints=checkpoints)

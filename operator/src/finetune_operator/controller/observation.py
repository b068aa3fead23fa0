"""What the operator reads from the cluster, parsed for the state machine: worker pods and rank 0's
/progress document.

Kept apart from ``state.py`` so that the state machine sees only typed observations, never a pod
body or a raw document, and so that the pod index (``handlers.py``) parses each pod once.
"""

from __future__ import annotations

import math
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


def _number(value: Any) -> float | None:
    """A finite JSON number, else None: the document is another process's, and json.loads reads NaN,
    Infinity and -Infinity, which the status (JSON, for the API server) cannot hold."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    """A finite, non-negative number that fits the API server's int64, as an int; else None."""
    number = _number(value)
    return int(number) if number is not None and 0 <= number < 2**63 else None


def _checkpoint(entry: Any) -> CheckpointStatus | None:
    """One entry of the document's checkpoints, or None when it lacks a step or a URI."""
    if not isinstance(entry, dict):
        return None
    step, uri = _count(entry.get("step")), entry.get("uri")
    if step is None or not isinstance(uri, str) or not uri:
        return None
    fields: dict[str, Any] = {"step": step, "uri": uri}
    if (loss := _number(entry.get("evalLoss"))) is not None:
        fields["evalLoss"] = loss
    if isinstance(entry.get("time"), str):
        fields["time"] = entry["time"]
    return CheckpointStatus.model_validate(fields)


def progress_status(document: dict[str, Any]) -> FinetuneJobStatus:
    """status.progress, status.metrics and status.checkpoints (only these set) from rank 0's /progress
    document. Never raises: a value that is missing, of the wrong type or not a finite number (NaN,
    Infinity) is left out, and the rest is kept."""
    step, total = _count(document.get("step")) or 0, _count(document.get("totalSteps")) or 0
    progress = ProgressStatus(
        step=step,
        total_steps=total,
        epoch=round(_number(document.get("epoch")) or 0.0, 3),
        percent=min(100, step * 100 // total) if total else 0,
    )
    if (eta := _count(document.get("etaSeconds"))) is not None:
        progress.eta_seconds = eta
    if (speed := _number(document.get("tokensPerSecond"))) is not None:
        progress.tokens_per_second = round(speed, 1)
    evaluated = document.get("evalMetrics")
    metrics: dict[str, float] = {}
    reported = [
        *(evaluated.items() if isinstance(evaluated, dict) else []),
        ("trainLoss", document.get("trainLoss")),
    ]
    for name, value in reported:
        if (number := _number(value)) is not None:
            metrics[name] = round(number, 4)
    listed = document.get("checkpoints")
    checkpoints = [c for c in map(_checkpoint, listed if isinstance(listed, list) else []) if c is not None]
    return FinetuneJobStatus(
        progress=progress, metrics=metrics, checkpoints=checkpoints[-STATUS_CHECKPOINTS:]
    )

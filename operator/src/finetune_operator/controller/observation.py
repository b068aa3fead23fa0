"""What the operator reads from the cluster, parsed for the state machine: worker pods and rank 0's
/progress document.

Kept apart from ``state.py`` so that the state machine sees only typed observations, never a pod
body or a raw document, and so that the pod index (``handlers.py``) parses each pod once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from finetune_operator import API_VERSION, KIND
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
# The kubelet's texts of a pod are bounded too: they end up in the job's status and events.
MAX_POD_TEXT_CHARS = 1024
# The termination message Kubernetes keeps is at most 4 KB; more is not from the kubelet.
MAX_TERMINATION_MESSAGE_CHARS = 4096
# A node rank or attempt label that is not a number: out of range, so the pod is never a worker.
INVALID = -1


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
    # The uid of the pod's controller (its ownerReference with controller: true), "" when it has none.
    # Only the pods whose controller is the job are its workers: labels anyone can set.
    owner_uid: str = ""


def _label_number(labels: Any, key: str) -> int:
    """A rank or attempt label as a non-negative int; INVALID when it is anything else."""
    value = labels.get(key, "0") if isinstance(labels, dict) else "0"
    if not isinstance(value, str) or not value.isdigit() or not value.isascii() or len(value) > 9:
        return INVALID
    return int(value)


def _text(value: Any, limit: int = MAX_POD_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        return ""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def controller_uid(metadata: Any) -> str:
    """The uid of the FinetuneJob that controls an object (its controller ownerReference), else ""."""
    references = metadata.get("ownerReferences") if isinstance(metadata, dict) else None
    for reference in references if isinstance(references, list) else []:
        if (
            isinstance(reference, dict)
            and reference.get("controller") is True
            and (reference.get("apiVersion"), reference.get("kind")) == (API_VERSION, KIND)
            and isinstance(reference.get("uid"), str)
        ):
            return reference["uid"]
    return ""


def owned_by(pods: Iterable[PodObservation], uid: str) -> list[PodObservation]:
    """The pods whose controller is the job with ``uid``: a pod that only carries the job's labels
    (another job's, or anyone's) must neither fail the job nor name its outputModel."""
    return [pod for pod in pods if uid and pod.owner_uid == uid]


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def observe_pod(pod: dict[str, Any]) -> PodObservation:
    """Reads a worker pod's body into a PodObservation; never raises, whatever the body holds."""
    metadata = _map(pod.get("metadata"))
    labels = _map(metadata.get("labels"))
    status = _map(pod.get("status"))
    statuses = status.get("containerStatuses")
    container = _map(next(iter(statuses), {}) if isinstance(statuses, list) else {})
    state = _map(container.get("state"))
    terminated = _map(state.get("terminated"))
    waiting = _map(state.get("waiting"))
    unschedulable = ""
    ready = False
    conditions = status.get("conditions")
    for condition in map(_map, conditions if isinstance(conditions, list) else []):
        if (condition.get("type"), condition.get("status"), condition.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            unschedulable = _text(condition.get("message")) or "no node fits the pod"
        if condition.get("type") == "Ready":
            ready = condition.get("status") == "True"
    waiting_reason = _text(waiting.get("reason"))
    exit_code = terminated.get("exitCode")
    phase = status.get("phase")
    return PodObservation(
        name=_text(metadata.get("name"), 253),
        node_rank=_label_number(labels, LABEL_NODE_RANK),
        attempt=_label_number(labels, LABEL_ATTEMPT),
        phase=phase if isinstance(phase, str) and phase else "Pending",
        deleting=bool(metadata.get("deletionTimestamp")),
        started="running" in state or "terminated" in state,
        ready=ready,
        exit_code=exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None,
        finished_at=_text(terminated.get("finishedAt"), 64),
        reason=_text(terminated.get("reason")) or _text(status.get("reason")),
        message=_text(status.get("message")),
        termination_message=_text(terminated.get("message"), MAX_TERMINATION_MESSAGE_CHARS),
        unschedulable=unschedulable,
        waiting=f"{waiting_reason}: {_text(waiting.get('message'))}".rstrip(": ")
        if waiting_reason in BLOCKED_WAITING_REASONS
        else "",
        ip=_text(status.get("podIP"), 64),
        owner_uid=controller_uid(metadata),
    )


# Bounds on what rank 0's /progress may put into status: the document is another process's.
MAX_DOCUMENT_CHECKPOINTS = 1000
MAX_EVAL_METRICS = 64
MAX_NAME_CHARS = 128
MAX_URI_CHARS = 1024
MAX_TIME_CHARS = 64
# Epochs and throughput beyond these are not numbers a trainer reports; they would only be noise.
MAX_EPOCH = 1e9
MAX_TOKENS_PER_SECOND = 1e15
_INT64 = 2**63
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _finite(value: Any) -> float:
    """A finite JSON number as a float; json.loads reads NaN, Infinity and -Infinity, which the status
    (JSON, for the API server) cannot hold, and integers beyond any float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a number")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("beyond any float") from None
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _whole(value: Any) -> int:
    """A finite number as an int (an ETA of 12.7 s is 12)."""
    return int(_finite(value))


def _plain_text(value: Any) -> Any:
    if isinstance(value, str) and _CONTROL.search(value):
        raise ValueError("control characters")
    return value


Finite = Annotated[float, BeforeValidator(_finite)]
Count = Annotated[int, BeforeValidator(_whole), Field(ge=0, lt=_INT64)]
Name = Annotated[str, BeforeValidator(_plain_text), Field(min_length=1, max_length=MAX_NAME_CHARS)]


class ReportedCheckpoint(BaseModel):
    """One entry of the document's checkpoints."""

    model_config = ConfigDict(extra="ignore", strict=False)

    step: Count
    uri: Annotated[str, BeforeValidator(_plain_text), Field(min_length=1, max_length=MAX_URI_CHARS)]
    eval_loss: Finite | None = Field(default=None, alias="evalLoss")
    time: Annotated[str, BeforeValidator(_plain_text), Field(max_length=MAX_TIME_CHARS)] | None = None


class ProgressReport(BaseModel):
    """Rank 0's /progress document, typed and bounded. Built by :func:`parse_progress`, which leaves
    out each value that does not fit (and says which in ``dropped``) instead of refusing the whole."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    step: Count | None = None
    total_steps: Count | None = Field(default=None, alias="totalSteps")
    epoch: Annotated[Finite, Field(ge=-MAX_EPOCH, le=MAX_EPOCH)] | None = None
    eta_seconds: Count | None = Field(default=None, alias="etaSeconds")
    tokens_per_second: Annotated[Finite, Field(ge=0, le=MAX_TOKENS_PER_SECOND)] | None = Field(
        default=None, alias="tokensPerSecond"
    )
    train_loss: Finite | None = Field(default=None, alias="trainLoss")
    eval_metrics: dict[Name, Finite] = Field(default_factory=dict, alias="evalMetrics")
    # The base model's evaluation before the first step (same names as evalMetrics).
    base_metrics: dict[Name, Finite] = Field(default_factory=dict, alias="baseMetrics")
    checkpoints: list[ReportedCheckpoint] = Field(default_factory=list)
    # Names of the values left out: wrong type, not finite, out of bounds.
    dropped: tuple[str, ...] = Field(default=(), exclude=True)


_SCALARS = ("step", "total_steps", "epoch", "eta_seconds", "tokens_per_second", "train_loss")
_ADAPTERS = {name: TypeAdapter(ProgressReport.model_fields[name].annotation) for name in _SCALARS}
_METRIC_NAME = TypeAdapter(Name)
_METRIC_VALUE = TypeAdapter(Finite)
_CHECKPOINT_LOSS = TypeAdapter(ReportedCheckpoint.model_fields["eval_loss"].annotation)
_CHECKPOINT_TIME = TypeAdapter(ReportedCheckpoint.model_fields["time"].annotation)


def _checkpoint(entry: Any, dropped: list[str]) -> ReportedCheckpoint | None:
    """One checkpoint entry: without a usable step or URI it is left out, while an unusable evalLoss or
    time leaves out only that value."""
    if not isinstance(entry, dict):
        dropped.append("checkpoints")
        return None
    fields = {key: entry[key] for key in ("step", "uri") if key in entry}
    for key, adapter in (("evalLoss", _CHECKPOINT_LOSS), ("time", _CHECKPOINT_TIME)):
        if entry.get(key) is not None:
            try:
                fields[key] = adapter.validate_python(entry[key])
            except ValidationError:
                dropped.append(f"checkpoints.{key}")
    try:
        return ReportedCheckpoint.model_validate(fields)
    except ValidationError:
        dropped.append("checkpoints")
        return None


def _metrics(document: dict[str, Any], key: str, dropped: list[str]) -> dict[str, float]:
    """A {name: finite number} map of the document, at most MAX_EVAL_METRICS of its entries; an entry
    with a bad name or value is left out, and ``key`` named in ``dropped`` once."""
    reported = document.get(key)
    metrics: dict[str, float] = {}
    if isinstance(reported, dict):
        for name, value in list(reported.items())[: MAX_EVAL_METRICS + 1]:
            try:
                metrics[_METRIC_NAME.validate_python(name)] = _METRIC_VALUE.validate_python(value)
            except ValidationError:
                dropped.append(key)
        if len(reported) > MAX_EVAL_METRICS:
            metrics = dict(list(metrics.items())[:MAX_EVAL_METRICS])
            dropped.append(key)
    elif reported is not None:
        dropped.append(key)
    return metrics


def parse_progress(document: Any) -> ProgressReport:
    """The typed report of a /progress document. Never raises: a value that is missing, of the wrong
    type, out of bounds or not a finite number (NaN, Infinity) is left out and named in ``dropped``,
    and the rest is kept; a document that is not a JSON object is all dropped."""
    if isinstance(document, ProgressReport):
        return document
    if not isinstance(document, dict):
        return ProgressReport(dropped=("document",))
    fields: dict[str, Any] = {}
    dropped: list[str] = []
    for name in _SCALARS:
        key = ProgressReport.model_fields[name].alias or name
        if document.get(key) is None:
            continue
        try:
            fields[name] = _ADAPTERS[name].validate_python(document[key])
        except ValidationError:
            dropped.append(key)
    metrics = _metrics(document, "evalMetrics", dropped)
    base_metrics = _metrics(document, "baseMetrics", dropped)
    listed = document.get("checkpoints")
    checkpoints: list[ReportedCheckpoint] = []
    if isinstance(listed, list):
        if len(listed) > MAX_DOCUMENT_CHECKPOINTS:
            dropped.append("checkpoints")
        for entry in listed[-MAX_DOCUMENT_CHECKPOINTS:]:
            if checkpoint := _checkpoint(entry, dropped):
                checkpoints.append(checkpoint)
    elif listed is not None:
        dropped.append("checkpoints")
    return ProgressReport(
        **fields,
        eval_metrics=metrics,
        base_metrics=base_metrics,
        checkpoints=checkpoints,
        dropped=tuple(dict.fromkeys(dropped)),
    )


def progress_status(document: dict[str, Any] | ProgressReport) -> FinetuneJobStatus:
    """status.progress, status.metrics, status.baseMetrics and status.checkpoints (only these set) from
    rank 0's /progress document. Never raises: a value that is missing, of the wrong type or not a finite
    number (NaN, Infinity) is left out, and the rest is kept."""
    report = parse_progress(document)
    step, total = report.step or 0, report.total_steps or 0
    progress = ProgressStatus(
        step=step,
        total_steps=total,
        epoch=round(report.epoch or 0.0, 3),
        percent=min(100, step * 100 // total) if total else 0,
    )
    if report.eta_seconds is not None:
        progress.eta_seconds = report.eta_seconds
    if report.tokens_per_second is not None:
        progress.tokens_per_second = round(report.tokens_per_second, 1)
    metrics = {name: round(value, 4) for name, value in report.eval_metrics.items()}
    if report.train_loss is not None:
        metrics["trainLoss"] = round(report.train_loss, 4)
    checkpoints = [
        CheckpointStatus.model_validate(c.model_dump(by_alias=True, exclude_none=True))
        for c in report.checkpoints[-STATUS_CHECKPOINTS:]
    ]
    status = FinetuneJobStatus(progress=progress, metrics=metrics, checkpoints=checkpoints)
    if report.base_metrics:  # set only when reported: a status without them stays as it was
        status.base_metrics = {name: round(value, 4) for name, value in report.base_metrics.items()}
    return status

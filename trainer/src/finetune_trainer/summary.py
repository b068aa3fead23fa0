"""What a worker tells the operator when it exits: its exit code and a summary in the pod's status.

Kubernetes copies the termination-message file (at most 4 KB) into the container's terminated
state, so the operator learns the outcome, the final metrics and the trainer's own error message
without the workers needing any Kubernetes permissions.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

logger = logging.getLogger(__name__)

# The one exit code for errors a restart cannot fix (bad data, bad configuration, a missing object):
# the operator fails the job at once instead of restarting the gang. Every other non-zero code is
# retryable. 78 is EX_CONFIG in sysexits.h.
NON_RETRYABLE_EXIT_CODE = 78

# A run stopped by SIGTERM after saving a checkpoint: not done, so never 0 (a pod that exits 0 reads
# as finished); any other non-zero code is retryable. 143 is the shell's 128 + SIGTERM.
STOPPED_EXIT_CODE = 143

TERMINATION_MESSAGE_LIMIT = 4096

# Reasons a failure carries beyond its exit class; the operator uses them as condition reasons.
STALLED = "Stalled"  # no optimizer step within runPolicy.stallTimeoutSeconds (retryable)
NON_FINITE_LOSS = "NonFiniteLoss"  # the training loss became NaN or infinite
EVAL_GATE_NOT_MET = "EvalGateNotMet"  # the final metrics miss evaluation.gate; the model is in rejected/


def finite_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The finite numbers of ``metrics`` and a note for each value left out: JSON has no NaN, and one
    such value must not make a whole summary, /progress document or metrics file unreadable."""
    kept: dict[str, float] = {}
    notes: list[str] = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            notes.append(f"{name} omitted: {value!r} is not a finite number")
        else:
            kept[name] = float(value)
    return kept, notes


class TerminationSummary(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True, extra="ignore")

    outcome: Literal["succeeded", "failed", "stopped"]
    retryable: bool = True
    error: str = ""
    # Why, where the exit class alone does not say it: STALLED, NON_FINITE_LOSS, EVAL_GATE_NOT_MET.
    reason: str = ""
    # The global rank whose failure this is (this rank's own, or the one whose failure ended it).
    rank: int | None = None
    # This node ended because another rank failed: the cause is in that rank's summary.
    collateral: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    # What was left out of ``metrics`` (non-finite values) and why.
    notes: list[str] = Field(default_factory=list)
    output_model: str = ""
    step: int | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def _finite_only(cls, value: Any) -> Any:
        """A summary with a NaN metric (or a null, as JSON writes NaN) keeps everything else."""
        if not isinstance(value, dict):
            return {}
        return finite_metrics(value)[0]

    def exit_code(self) -> int:
        """The process's exit code for this outcome: what the operator reads first."""
        if self.outcome == "failed":
            return 1 if self.retryable else NON_RETRYABLE_EXIT_CODE
        return STOPPED_EXIT_CODE if self.outcome == "stopped" else 0

    def to_message(self) -> str:
        """JSON within the 4 KB Kubernetes keeps; a long error is shortened, never the JSON cut."""
        summary = self
        text = summary.model_dump_json(by_alias=True, exclude_defaults=True)
        while len(text.encode()) > TERMINATION_MESSAGE_LIMIT and summary.error:
            summary = summary.model_copy(update={"error": summary.error[: len(summary.error) // 2] + "..."})
            text = summary.model_dump_json(by_alias=True, exclude_defaults=True)
        return text


# Bounds on what the operator takes from a summary: it is another process's text, shown in status.
MAX_MESSAGE_CHARS = 16 * TERMINATION_MESSAGE_LIMIT  # Kubernetes keeps 4 KB; a local run passes the file
MAX_ERROR_CHARS = 2048
MAX_REASON_CHARS = 128
MAX_NOTES = 16
MAX_NOTE_CHARS = 256
MAX_METRICS = 64
MAX_METRIC_NAME_CHARS = 128
MAX_URI_CHARS = 1024
_INT64 = 2**63
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(text: str) -> bool:
    return not _CONTROL.intersection(text)


def _under(uri: str, prefix: str) -> bool:
    """Whether ``uri`` names ``prefix`` itself or something inside it, with no ``.``/``..`` steps."""
    directory = prefix if prefix.endswith("/") else prefix + "/"
    if uri.rstrip("/") == prefix.rstrip("/"):
        return True
    if not uri.startswith(directory):
        return False
    return not any(part in (".", "..") for part in uri[len(directory) :].split("/"))


def _output_model(uri: str, output_uri: str | None) -> str:
    """The URI when it is printable and bounded and, where ``output_uri`` is given (the operator always
    gives the job's), an ``s3://bucket/...`` URI under it; else ""."""
    if len(uri) > MAX_URI_CHARS or not _plain(uri) or any(c.isspace() for c in uri):
        return ""
    if output_uri is None:
        return uri
    if not uri.startswith("s3://") or len(uri) <= len("s3://") or uri[5] == "/":
        return ""
    return uri if _under(uri, output_uri) else ""


def parse_termination_message(
    text: str | None, output_uri: str | None = None, dropped: list[str] | None = None
) -> TerminationSummary | None:
    """The summary in a pod's termination message, or None when there is none (e.g. OOM-killed) or it
    is not a summary. Never raises, for any text: the message is written by the worker, which the
    operator does not trust, so every field is bounded (long texts shortened, out-of-range numbers and
    non-finite metrics left out) and ``outputModel`` is kept only as an ``s3://`` URI under
    ``output_uri`` (the job's spec.output.uri) when that is given. What was left out is appended to
    ``dropped`` (field names), for the operator's log and counter."""
    if not text or not isinstance(text, str):
        return None
    drops: list[str] = [] if dropped is None else dropped
    if len(text) > MAX_MESSAGE_CHARS:
        drops.append("message")
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:  # a message of other words (the kubelet's, a shell's): no summary
        return None
    except (ValueError, RecursionError):  # digits beyond int's limit, nested beyond the parser
        drops.append("message")
        return None
    try:
        if not isinstance(document, dict):
            drops.append("message")
            return None
        if isinstance(document.get("metrics"), dict):
            kept, _ = finite_metrics(
                {
                    k: v
                    for k, v in list(document["metrics"].items())[:MAX_METRICS]
                    if isinstance(k, str)
                    and 0 < len(k) <= MAX_METRIC_NAME_CHARS
                    and _plain(k)
                    and not (isinstance(v, int) and not isinstance(v, bool) and abs(v) >= _INT64)
                }
            )
            if len(kept) < len(document["metrics"]):
                drops.append("metrics")
            document = {**document, "metrics": kept}
        summary = TerminationSummary.model_validate(document)
    except (ValueError, TypeError, ValidationError, RecursionError, ArithmeticError):
        # Not JSON, nested beyond the parser, not a summary, or numbers beyond any float.
        drops.append("message")
        return None
    update: dict[str, Any] = {}
    if len(summary.error) > MAX_ERROR_CHARS:
        update["error"] = _shorten(summary.error, MAX_ERROR_CHARS)
    if len(summary.reason) > MAX_REASON_CHARS or not _plain(summary.reason):
        update["reason"] = ""
    if summary.rank is not None and not 0 <= summary.rank < _INT64:
        update["rank"] = None
    if summary.step is not None and not 0 <= summary.step < _INT64:
        update["step"] = None
    notes = [_shorten(note, MAX_NOTE_CHARS) for note in summary.notes[:MAX_NOTES]]
    if notes != summary.notes:
        update["notes"] = notes
    if summary.output_model and not (model := _output_model(summary.output_model, output_uri)):
        update["output_model"] = model
    drops.extend(name for name in update if name != "error")
    return summary.model_copy(update=update) if update else summary


def write_termination_message(path: str, summary: TerminationSummary) -> None:
    """Best effort: a missing or read-only path must not turn a success into a failure."""
    try:
        Path(path).write_text(summary.to_message(), encoding="utf-8")
    except OSError as error:
        logger.warning("cannot write the termination message to %s: %s", path, error)


def rank_summary_path(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank}.json"


def rank_log_path(workspace: Path, rank: int) -> Path:
    """Where a rank keeps its own log (beside the summaries), so that it can go to the output with the
    results: on a cluster the pod's log is gone with the pod."""
    return workspace / "logs" / f"rank-{rank}.log"


def write_rank_summary(directory: Path, rank: int, summary: TerminationSummary) -> None:
    """One rank's summary for its node's launcher; written whole or not at all (rename)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / f".rank-{rank}.json.partial"
        partial.write_text(summary.to_message(), encoding="utf-8")
        partial.replace(rank_summary_path(directory, rank))
    except OSError as error:
        logger.warning("cannot write rank %d's summary to %s: %s", rank, directory, error)


def read_rank_summaries(directory: Path) -> dict[int, TerminationSummary | None]:
    """The summaries the node's ranks left, by global rank (None: unreadable)."""
    found: dict[int, TerminationSummary | None] = {}
    for path in sorted(directory.glob("rank-*.json")):
        with_rank = path.stem.removeprefix("rank-")
        if with_rank.isdigit():
            try:
                found[int(with_rank)] = parse_termination_message(path.read_text(encoding="utf-8"))
            except OSError:
                found[int(with_rank)] = None
    return found


def node_summary(summaries: dict[int, TerminationSummary | None], expected: int) -> TerminationSummary | None:
    """The node's one summary from its ranks': the cause of a failure, else a stop, else rank 0's result.

    A failure's cause is the first of: a rank's own non-retryable error, its own retryable error, a rank
    that left no summary (killed, e.g. out of memory), a failure this node only echoed (``collateral``).
    """
    present = [s for s in summaries.values() if s is not None]
    failed = [s for s in present if s.outcome == "failed"]
    own = sorted((s for s in failed if not s.collateral), key=lambda s: (s.retryable, s.rank or 0))
    if own:
        return own[0]
    if len(present) < expected:
        return TerminationSummary(
            outcome="failed",
            error=f"{expected - len(present)} of this node's {expected} rank(s) ended without a report "
            "(killed by a signal, e.g. out of memory); see the worker's log",
        )
    if failed:
        return failed[0]
    stopped = [s for s in present if s.outcome == "stopped"]
    if stopped:
        return stopped[0]
    return min(present, key=lambda s: s.rank or 0) if present else None

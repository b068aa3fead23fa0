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
    # Why, where the exit class alone does not say it: STALLED, NON_FINITE_LOSS.
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


def parse_termination_message(text: str | None) -> TerminationSummary | None:
    """The summary in a pod's termination message, or None when there is none (e.g. OOM-killed)."""
    if not text:
        return None
    try:
        return TerminationSummary.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return None


def write_termination_message(path: str, summary: TerminationSummary) -> None:
    """Best effort: a missing or read-only path must not turn a success into a failure."""
    try:
        Path(path).write_text(summary.to_message(), encoding="utf-8")
    except OSError as error:
        logger.warning("cannot write the termination message to %s: %s", path, error)


def rank_summary_path(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank}.json"


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

"""The gang's pure parts: which rank's summary speaks for a node, the derived stall timeout, finite
metrics, and the abort mark on a real c10d TCPStore (in-process, a free port)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from finetune_trainer.errors import PeerFailedError
from finetune_trainer.gang import STALL_FLOOR_SECONDS, Gang, is_peer_gone
from finetune_trainer.summary import (
    TerminationSummary,
    finite_metrics,
    node_summary,
    parse_termination_message,
    read_rank_summaries,
    write_rank_summary,
)


def failed(rank: int, error: str, retryable: bool = True, collateral: bool = False) -> TerminationSummary:
    return TerminationSummary(
        outcome="failed", rank=rank, error=error, retryable=retryable, collateral=collateral
    )


OK = TerminationSummary(outcome="succeeded", rank=0, output_model="s3://b/out/model/", step=6)
STOPPED = TerminationSummary(outcome="stopped", rank=1, step=4)


@pytest.mark.parametrize(
    ("summaries", "expected", "error"),
    [
        pytest.param({0: OK, 1: OK.model_copy(update={"rank": 1})}, "succeeded", "", id="all-succeeded"),
        pytest.param({0: OK, 1: STOPPED}, "stopped", "", id="one-stopped"),
        pytest.param(
            {0: failed(0, "echo", collateral=True), 1: failed(1, "bad rows", retryable=False)},
            "failed",
            "bad rows",
            id="own-non-retryable-over-echo",
        ),
        pytest.param(
            {0: failed(0, "S3 timeout"), 1: failed(1, "bad rows", retryable=False)},
            "failed",
            "bad rows",
            id="non-retryable-over-retryable",
        ),
        pytest.param(
            {0: failed(0, "Connection closed by peer", collateral=True)},
            "failed",
            "1 of this node's 2 rank(s) ended without a report",
            id="killed-rank-over-echo",
        ),
        pytest.param(
            {0: failed(0, "S3 timeout"), 1: None},
            "failed",
            "S3 timeout",
            id="own-error-over-unreadable",
        ),
        pytest.param(
            {0: failed(0, "rank 3 failed: x", collateral=True), 1: STOPPED},
            "failed",
            "rank 3 failed: x",
            id="only-echoes",
        ),
    ],
)
def test_the_node_summary_is_the_cause_not_its_echoes(
    summaries: dict[int, TerminationSummary | None], expected: str, error: str
) -> None:
    summary = node_summary(summaries, expected=2)
    assert summary is not None and summary.outcome == expected
    assert error in summary.error


def test_rank_summaries_round_trip_through_the_workspace(tmp_path: Path) -> None:
    write_rank_summary(tmp_path, 0, OK)
    write_rank_summary(tmp_path, 1, failed(1, "x"))
    (tmp_path / "rank-2.json").write_text("{not json")
    found = read_rank_summaries(tmp_path)
    assert found[0] == OK and found[1] is not None and found[1].error == "x" and found[2] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-0.json", "rank-1.json", "rank-2.json"]


def test_non_finite_metrics_are_left_out_with_a_note_and_never_break_a_summary() -> None:
    kept, notes = finite_metrics({"evalLoss": 1.5, "perplexity": math.inf, "trainLoss": math.nan})
    assert kept == {"evalLoss": 1.5}
    assert notes == [
        "perplexity omitted: inf is not a finite number",
        "trainLoss omitted: nan is not a finite number",
    ]
    # What JSON writers make of NaN (null) must not lose the rest of the summary.
    text = '{"outcome": "succeeded", "metrics": {"trainLoss": null, "evalLoss": 1.5}, "outputModel": "m"}'
    summary = parse_termination_message(text)
    assert summary is not None and summary.output_model == "m" and summary.metrics == {"evalLoss": 1.5}


def test_the_stall_timeout_is_configured_or_derived_from_the_slowest_step(tmp_path: Path) -> None:
    now = [0.0]
    derived = Gang(0, tmp_path, 10, None, clock=lambda: now[0])
    assert derived.stall_timeout() is None  # nothing measured yet: no stall clock
    for moment in (1.0, 2.0, 5.0, 6.0):  # steps of 1 s and one of 3 s
        now[0] = moment
        derived.beat()
    assert derived.stall_timeout() == STALL_FLOOR_SECONDS
    now[0] = 6.0 + 120.0
    derived.beat()
    assert derived.stall_timeout() == 1200.0  # ten times the slowest step
    assert Gang(0, tmp_path, 10, 7, clock=lambda: 0.0).stall_timeout() == 7


def test_peer_errors_are_echoes() -> None:
    assert is_peer_gone(RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1457"))
    assert is_peer_gone(PeerFailedError("another node failed to upload checkpoint step-4"))
    assert not is_peer_gone(RuntimeError("CUDA out of memory"))


def test_the_first_rank_to_mark_the_gang_is_its_cause(tmp_path: Path) -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
    first, second = Gang(1, tmp_path, 10, None), Gang(0, tmp_path, 10, None)
    first.attach_store(client)
    second.attach_store(server)
    assert second._read_mark() is None
    assert first._mark(failed(1, "bad rows", retryable=False))
    assert not second._mark(failed(0, "Connection closed by peer", collateral=True))
    cause = second._read_mark()
    assert cause is not None and cause.rank == 1 and cause.error == "bad rows" and not cause.retryable
    echo = second._collateral(cause)
    assert echo.collateral and echo.error == "rank 1 failed: bad rows" and echo.exit_code() == 78

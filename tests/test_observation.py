"""Pod bodies and rank 0's /progress document, read into what the state machine works with."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_operator.controller.observation import observe_pod, progress_status


def test_observe_pod_reads_the_kubelet_status() -> None:
    body = {
        "metadata": {
            "name": "job-worker-1",
            "labels": {"finetune.dev/node-rank": "1", "finetune.dev/attempt": "2"},
            "deletionTimestamp": "2026-11-21T12:00:00Z",
        },
        "status": {
            "phase": "Failed",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "OOMKilled",
                            "message": '{"outcome":"failed"}',
                        }
                    }
                }
            ],
        },
    }
    observed = observe_pod(body)
    assert (observed.node_rank, observed.attempt, observed.exit_code) == (1, 2, 137)
    assert (observed.reason, observed.deleting, observed.started, observed.ip) == (
        "OOMKilled",
        True,
        True,
        "10.0.0.7",
    )
    pending = observe_pod(
        {
            "metadata": {"name": "p", "labels": {}},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "no GPUs",
                    }
                ],
            },
        }
    )
    assert pending.unschedulable == "no GPUs" and not pending.started


def test_progress_document_becomes_status() -> None:
    document = {
        "step": 7,
        "totalSteps": 9,
        "epoch": 1.23456,
        "etaSeconds": 12.7,
        "tokensPerSecond": 1234.56,
        "trainLoss": 0.123456,
        "evalMetrics": {"evalLoss": 0.5, "f1": 0.75},
        "checkpoints": [{"step": s, "uri": f"s3://o/step-{s}/", "time": "t"} for s in range(1, 13)],
    }
    reported = progress_status(document).to_api()
    assert reported["progress"] == {
        "step": 7,
        "totalSteps": 9,
        "epoch": 1.235,
        "percent": 77,
        "etaSeconds": 12,
        "tokensPerSecond": 1234.6,
    }
    assert reported["metrics"] == {"evalLoss": 0.5, "f1": 0.75, "trainLoss": 0.1235}
    assert [c["step"] for c in reported["checkpoints"]] == list(range(3, 13))  # the newest ten


# Documents as the poller reads them: json.loads accepts NaN, Infinity and -Infinity, which the
# status (JSON for the API server) cannot hold; a trainer may also write null, or a wrong type.
GOOD = (
    '{"step": 7, "totalSteps": 9, "epoch": 1.5, "etaSeconds": 12, "tokensPerSecond": 100.0,'
    ' "trainLoss": 0.5, "evalMetrics": {"evalLoss": 0.25},'
    ' "checkpoints": [{"step": 5, "uri": "s3://o/step-5/", "evalLoss": 0.3, "time": "t"}]}'
)


@pytest.mark.parametrize(
    ("text", "progress", "metrics", "checkpoints"),
    [
        pytest.param(
            GOOD.replace('"trainLoss": 0.5', '"trainLoss": NaN'),
            {
                "step": 7,
                "totalSteps": 9,
                "epoch": 1.5,
                "percent": 77,
                "etaSeconds": 12,
                "tokensPerSecond": 100.0,
            },
            {"evalLoss": 0.25},
            [{"step": 5, "uri": "s3://o/step-5/", "evalLoss": 0.3, "time": "t"}],
            id="nan-train-loss-dropped",
        ),
        pytest.param(
            GOOD.replace('"evalLoss": 0.25', '"evalLoss": Infinity, "f1": null, "accuracy": 0.9'),
            None,
            {"trainLoss": 0.5, "accuracy": 0.9},
            None,
            id="non-finite-and-null-eval-metrics-dropped",
        ),
        pytest.param(
            GOOD.replace(
                '"etaSeconds": 12, "tokensPerSecond": 100.0', '"etaSeconds": Infinity, "tokensPerSecond": NaN'
            ),
            {"step": 7, "totalSteps": 9, "epoch": 1.5, "percent": 77},
            None,
            None,
            id="non-finite-eta-and-throughput-dropped",
        ),
        pytest.param(
            GOOD.replace('"step": 7,', '"step": NaN,').replace('"epoch": 1.5', '"epoch": -Infinity'),
            {
                "step": 0,
                "totalSteps": 9,
                "epoch": 0.0,
                "percent": 0,
                "etaSeconds": 12,
                "tokensPerSecond": 100.0,
            },
            None,
            None,
            id="non-finite-step-and-epoch-read-as-zero",
        ),
        pytest.param(
            GOOD.replace('"totalSteps": 9', '"totalSteps": Infinity'),
            {
                "step": 7,
                "totalSteps": 0,
                "epoch": 1.5,
                "percent": 0,
                "etaSeconds": 12,
                "tokensPerSecond": 100.0,
            },
            None,
            None,
            id="non-finite-total-steps-reads-as-unknown",
        ),
        pytest.param(
            GOOD.replace('"evalLoss": 0.3', '"evalLoss": NaN'),
            None,
            None,
            [{"step": 5, "uri": "s3://o/step-5/", "time": "t"}],
            id="checkpoint-keeps-everything-but-its-nan-eval-loss",
        ),
        pytest.param(
            GOOD.replace(
                '"checkpoints": [',
                '"checkpoints": [{"step": NaN, "uri": "s3://o/x/"}, {"step": 3}, "junk",'
                ' {"step": 4, "uri": 7},',
            ),
            None,
            None,
            [{"step": 5, "uri": "s3://o/step-5/", "evalLoss": 0.3, "time": "t"}],
            id="checkpoints-without-a-step-or-uri-dropped",
        ),
        pytest.param(
            '{"step": "7", "totalSteps": true, "epoch": [1], "etaSeconds": {}, "trainLoss": "0.5",'
            ' "evalMetrics": [1, 2], "checkpoints": {"step": 1}}',
            {"step": 0, "totalSteps": 0, "epoch": 0.0, "percent": 0},
            {},
            [],
            id="wrong-types-read-as-absent",
        ),
        pytest.param(
            '{"step": 1e400, "totalSteps": 100000000000000000000000000000, "trainLoss": -1e400}',
            {"step": 0, "totalSteps": 0, "epoch": 0.0, "percent": 0},
            {},
            [],
            id="numbers-beyond-int64-or-float-dropped",
        ),
    ],
)
def test_progress_document_with_non_finite_numbers_keeps_the_rest(
    text: str,
    progress: dict[str, Any] | None,
    metrics: dict[str, float] | None,
    checkpoints: list[dict[str, Any]] | None,
) -> None:
    reported = progress_status(json.loads(text)).to_api()
    json.dumps(reported, allow_nan=False)  # raises on NaN or Infinity anywhere in it
    for key, expected in (("progress", progress), ("metrics", metrics), ("checkpoints", checkpoints)):
        if expected is not None:
            assert reported.get(key, {} if key == "metrics" else []) == expected, key

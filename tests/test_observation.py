"""Pod bodies and rank 0's /progress document, read into what the state machine works with."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_operator import API_VERSION, KIND
from finetune_operator.controller.observation import (
    INVALID,
    MAX_EVAL_METRICS,
    MAX_POD_TEXT_CHARS,
    observe_pod,
    owned_by,
    parse_progress,
    progress_status,
)
from finetune_trainer.summary import parse_termination_message


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
    assert "baseMetrics" not in reported  # none reported: none written


def test_base_metrics_become_status_beside_the_latest() -> None:
    document = {
        "step": 20,
        "totalSteps": 40,
        "evalMetrics": {"evalLoss": 1.1, "answerAccuracy": 0.6},
        "baseMetrics": {"evalLoss": 2.7500049, "perplexity": 15.64263, "answerAccuracy": 0.05},
    }
    reported = progress_status(document).to_api()
    assert reported["baseMetrics"] == {"evalLoss": 2.75, "perplexity": 15.6426, "answerAccuracy": 0.05}
    assert reported["metrics"] == {"evalLoss": 1.1, "answerAccuracy": 0.6}
    assert parse_progress(document).dropped == ()


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


# Hostile /progress documents: each bad value is left out (and named in ``dropped``), never an
# exception, never NaN in status.
@pytest.mark.parametrize(
    ("document", "dropped"),
    [
        pytest.param({"step": "7", "totalSteps": 9}, ("step",), id="non-number-step"),
        pytest.param({"step": 1, "etaSeconds": float("inf")}, ("etaSeconds",), id="infinite-eta"),
        pytest.param({"step": -3}, ("step",), id="negative-step"),
        pytest.param({"step": 2**64}, ("step",), id="step-beyond-int64"),
        pytest.param({"evalMetrics": [1, 2]}, ("evalMetrics",), id="list-where-a-map-belongs"),
        pytest.param({"evalMetrics": {"evalLoss": float("nan")}}, ("evalMetrics",), id="nan-metric"),
        pytest.param({"evalMetrics": {"x" * 10_000: 1.0}}, ("evalMetrics",), id="huge-metric-name"),
        pytest.param({"evalMetrics": {"a\nb": 1.0}}, ("evalMetrics",), id="control-char-metric-name"),
        pytest.param({"tokensPerSecond": 1e300}, ("tokensPerSecond",), id="absurd-throughput"),
        pytest.param({"baseMetrics": 0.5}, ("baseMetrics",), id="base-metrics-not-a-map"),
        pytest.param(
            {"baseMetrics": {"evalLoss": float("inf"), "answerAccuracy": "high"}},
            ("baseMetrics",),
            id="base-metrics-not-finite-numbers",
        ),
        pytest.param(
            {"baseMetrics": {f"m{i}": 1.0 for i in range(MAX_EVAL_METRICS + 1)}},
            ("baseMetrics",),
            id="too-many-base-metrics",
        ),
        pytest.param({"baseMetrics": {"": 1.0}}, ("baseMetrics",), id="empty-base-metric-name"),
        pytest.param(
            {"evalMetrics": [1], "baseMetrics": {"a\tb": 1.0}},
            ("evalMetrics", "baseMetrics"),
            id="eval-and-base-metrics-each-named",
        ),
        pytest.param(
            {"checkpoints": [{"step": 1, "uri": "s3://o/" + "x" * 5000}]}, ("checkpoints",), id="huge-uri"
        ),
        pytest.param({"checkpoints": {"step": 1}}, ("checkpoints",), id="map-where-a-list-belongs"),
        pytest.param(
            {"checkpoints": [{"step": 1, "uri": "s3://o/1/", "time": "t" * 999}]},
            ("checkpoints.time",),
            id="huge-time",
        ),
        pytest.param([1, 2, 3], ("document",), id="not-an-object"),
        pytest.param({"trainLoss": True}, ("trainLoss",), id="boolean-loss"),
    ],
)
def test_hostile_progress_values_are_dropped_and_named(document: Any, dropped: tuple[str, ...]) -> None:
    report = parse_progress(document)
    assert report.dropped == dropped
    status = progress_status(document if isinstance(document, dict) else report).to_api()
    json.dumps(status, allow_nan=False)


def _owned_pod(*references: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "p", "labels": {}, "ownerReferences": list(references)}, "status": {}}


JOB_REFERENCE = {"apiVersion": API_VERSION, "kind": KIND, "name": "llm", "uid": "u-1", "controller": True}


@pytest.mark.parametrize(
    ("references", "owner"),
    [
        pytest.param([JOB_REFERENCE], "u-1", id="controlled-by-the-job"),
        pytest.param([{**JOB_REFERENCE, "controller": False}], "", id="owner-but-not-controller"),
        pytest.param([{**JOB_REFERENCE, "kind": "Job", "apiVersion": "batch/v1"}], "", id="another-kind"),
        pytest.param([{**JOB_REFERENCE, "uid": 7}], "", id="uid-not-a-string"),
        pytest.param(["junk", {**JOB_REFERENCE, "uid": "u-2"}], "u-2", id="another-jobs-pod"),
        pytest.param([], "", id="no-owner"),
    ],
)
def test_a_pods_owner_is_its_controller_reference(references: list[Any], owner: str) -> None:
    observed = observe_pod(_owned_pod(*references))
    assert observed.owner_uid == owner
    assert owned_by([observed], "u-1") == ([observed] if owner == "u-1" else [])


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"metadata": None, "status": None},
        {"metadata": {"labels": {"finetune.dev/node-rank": "x", "finetune.dev/attempt": "-1"}}},
        {"metadata": {"labels": {"finetune.dev/node-rank": "٣"}}},  # a digit, but not an ASCII one
        {"status": {"containerStatuses": "junk", "conditions": [None, 3]}},
        {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": "1", "message": 5}}}]}},
        {"metadata": {"ownerReferences": "junk"}, "status": {"phase": 3}},
    ],
)
def test_observe_pod_never_raises(body: dict[str, Any]) -> None:
    observed = observe_pod(body)
    assert observed.node_rank in (0, INVALID) and observed.attempt in (0, INVALID)
    assert observed.exit_code is None and observed.owner_uid == ""


def test_long_pod_texts_are_shortened() -> None:
    message = "m" * 100_000
    body = {
        "status": {"message": message, "containerStatuses": [{"state": {"terminated": {"message": message}}}]}
    }
    observed = observe_pod(body)
    assert len(observed.message) <= MAX_POD_TEXT_CHARS and len(observed.termination_message) <= 4096


OUTPUT = "s3://out/llm/"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", None, id="empty"),
        pytest.param("Error: killed", None, id="plain-text"),
        pytest.param("[" * 100_000, None, id="nested-beyond-the-parser"),
        pytest.param("1" * 5000, None, id="digits-beyond-ints-limit"),
        pytest.param(
            '{"outcome": "failed", "metrics": {"a": 1e999999}}', {"metrics": {}}, id="infinite-metric"
        ),
        pytest.param(
            '{"outcome": "failed", "metrics": {"a": ' + "9" * 400 + "}}",
            {"metrics": {}},
            id="huge-int-metric",
        ),
        pytest.param('{"outcome": "failed", "metrics": [1]}', {"metrics": {}}, id="list-metrics"),
        pytest.param(
            '{"outcome": "failed", "step": -1, "rank": 99999999999999999999}',
            {"step": None, "rank": None},
            id="ranges",
        ),
        pytest.param(
            json.dumps({"outcome": "failed", "error": "e" * 20_000}),
            {"error": "e" * 2045 + "..."},
            id="huge-error",
        ),
        pytest.param(
            json.dumps({"outcome": "failed", "reason": "R\n" * 10}), {"reason": ""}, id="reason-with-newlines"
        ),
        pytest.param(
            json.dumps({"outcome": "succeeded", "outputModel": "s3://out/llm/model/"}),
            {"output_model": "s3://out/llm/model/"},
            id="model-under-the-output",
        ),
        pytest.param(
            json.dumps({"outcome": "succeeded", "outputModel": "s3://other/model/"}),
            {"output_model": ""},
            id="model-elsewhere",
        ),
        pytest.param(
            json.dumps({"outcome": "succeeded", "outputModel": "s3://out/llm-v2/model/"}),
            {"output_model": ""},
            id="model-beside-the-output",
        ),
        pytest.param(
            json.dumps({"outcome": "succeeded", "outputModel": "s3://out/llm/../x/"}),
            {"output_model": ""},
            id="model-climbing-out",
        ),
        pytest.param(
            json.dumps({"outcome": "succeeded", "outputModel": "https://evil/"}),
            {"output_model": ""},
            id="not-s3",
        ),
        pytest.param(
            json.dumps({"outcome": "succeeded", "outputModel": "s3://out/llm/m\n/"}),
            {"output_model": ""},
            id="control-char-model",
        ),
    ],
)
def test_termination_messages_never_raise_and_are_bounded(text: str, expected: dict[str, Any] | None) -> None:
    summary = parse_termination_message(text, output_uri=OUTPUT)
    if expected is None:
        assert summary is None
    else:
        assert summary is not None
        for name, value in expected.items():
            assert getattr(summary, name) == value, name
        json.dumps(summary.model_dump(), allow_nan=False)

"""The job lifecycle as a table: observed job and pods in, status, actions and events out."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator.api.spec import FinetuneJobStatus
from finetune_operator.api.timestamps import format_time
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.controller.observation import PodObservation
from finetune_operator.controller.state import (
    EVAL_GATE_NOT_MET,
    Decision,
    JobObservation,
    decide,
    record_error,
    set_condition,
)
from finetune_trainer.summary import NON_FINITE_LOSS, NON_RETRYABLE_EXIT_CODE, STALLED, TerminationSummary

from tests.manifests import minimal_manifest

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
CREATED = NOW - timedelta(minutes=10)
MANIFEST = minimal_manifest(resources={"nodes": 2, "gpusPerNode": 1}, runPolicy={"backoffLimit": 2})


def ts(moment: datetime) -> str:
    return format_time(moment)


def job(status: dict[str, Any] | None = None, nodes: int = 2, **run_policy: Any) -> JobObservation:
    manifest = copy.deepcopy(MANIFEST)
    manifest["spec"]["runPolicy"].update(run_policy)
    manifest["spec"]["resources"]["nodes"] = nodes
    return JobObservation(
        name="job",
        namespace="team",
        generation=1,
        created=CREATED,
        job=parse_finetune_job(manifest),
        status=FinetuneJobStatus.model_validate(status or {}),
    )


def pod(rank: int, attempt: int = 0, **fields: Any) -> PodObservation:
    return PodObservation(name=f"job-worker-{rank}", node_rank=rank, attempt=attempt, **fields)


RUNNING = {"phase": "Running", "started": True}
READY = {**RUNNING, "ready": True}


def succeeded(**summary: Any) -> dict[str, Any]:
    message = TerminationSummary(outcome="succeeded", **summary).to_message() if summary else ""
    return {"phase": "Succeeded", "started": True, "exit_code": 0, "termination_message": message}


def failed(
    code: int, reason: str = "Error", error: str = "", because: str = "", **summary: Any
) -> dict[str, Any]:
    """A failed worker (``reason``: the kubelet's); with ``error``, ``because`` (the trainer's reason)
    or other summary fields, the trainer's termination summary."""
    written = error or because or summary
    message = (
        TerminationSummary(outcome="failed", error=error, reason=because, **summary).to_message()
        if written
        else ""
    )
    return {
        "phase": "Failed",
        "started": True,
        "exit_code": code,
        "reason": reason,
        "termination_message": message,
    }


# What a worker says when it ended only because another rank failed.
COLLATERAL = {"error": "rank 1 failed; stopping", "collateral": True, "rank": 1}
# A 78 exit carrying NonFiniteLoss: the trainer's default (runPolicy.nonFiniteLoss: fail).
NAN_LOSS = {"error": "the training loss is nan at step 12", "because": NON_FINITE_LOSS, "retryable": False}
STALL = {"error": "no optimizer step for 600s; stacks are in the log", "because": STALLED, "rank": 1}
# A succeeded worker 0 whose loss went NaN: JSON writes it null, which must not lose the rest.
NAN_TRAIN_LOSS_MESSAGE = (
    '{"outcome": "succeeded", "outputModel": "s3://out/job/model/", "step": 40,'
    ' "metrics": {"trainLoss": null, "evalLoss": 1.5},'
    ' "notes": ["trainLoss omitted: nan is not a finite number"]}'
)


# A 78 exit of worker 0 whose final answerAccuracy missed spec.evaluation.gate: the model went to rejected/.
GATE_NOT_MET = {
    "error": "eval gate not met: answerAccuracy 0.42 < 0.8 (spec.evaluation.gate.min)",
    "because": EVAL_GATE_NOT_MET,
    "retryable": False,
    "metrics": {"trainLoss": 0.9, "evalLoss": 1.1, "answerAccuracy": 0.42},
    "output_model": "s3://out/job/rejected/",
    "step": 40,
}
BASE_METRICS = {"evalLoss": 2.75, "perplexity": 15.6426, "answerAccuracy": 0.05}


def running_status(**extra: Any) -> dict[str, Any]:
    return {"phase": "Running", "restarts": 0, "startTime": ts(NOW - timedelta(minutes=5)), **extra}


# (id, observed job, pods, expectations): expectations name Decision/status fields to check.
CASES = [
    ("new-job-creates-the-gang", job(), [], {"phase": "Pending", "create": 0, "events": ["Pending"]}),
    (
        "pods-not-yet-scheduled",
        job({"phase": "Pending"}),
        [pod(0), pod(1)],
        {"phase": "Pending", "events": []},
    ),
    (
        "unschedulable-reason-from-the-scheduler",
        job({"phase": "Pending"}),
        [pod(0, unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."), pod(1)],
        {
            "phase": "Pending",
            "message": "Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        },
    ),
    (
        "image-pull-failure-keeps-it-pending-with-the-reason",
        job({"phase": "Pending"}),
        [pod(0, waiting="ImagePullBackOff: back-off pulling image"), pod(1)],
        {"phase": "Pending", "message": "ImagePullBackOff: back-off pulling image"},
    ),
    (
        "some-workers-started",
        job({"phase": "Pending"}),
        [pod(0, **RUNNING), pod(1)],
        {"phase": "Initializing", "events": ["Initializing"], "start_time": True},
    ),
    (
        "all-started-waiting-for-training",
        job({"phase": "Pending"}),
        [pod(0, **RUNNING), pod(1, **RUNNING)],
        {"phase": "Initializing", "first_running": True, "workers": {"total": 2, "ready": 2}},
    ),
    (
        "rank-zero-ready-means-running",
        job({"phase": "Initializing", "workers": {"total": 2, "ready": 2}}),
        [pod(0, **READY), pod(1, **RUNNING)],
        {"phase": "Running", "events": ["Running"], "first_running": False},
    ),
    (
        "steady-running-changes-nothing",
        job(running_status(workers={"total": 2, "ready": 2})),
        [pod(0, **READY), pod(1, **RUNNING)],
        {"phase": "Running", "events": [], "delete": [], "create": None},
    ),
    (
        "every-worker-exited-0",
        job(running_status()),
        [
            pod(0, **succeeded(output_model="s3://out/job/model/", metrics={"evalLoss": 1.5})),
            pod(1, **succeeded()),
        ],
        {
            "phase": "Succeeded",
            "events": ["Succeeded"],
            "completion": True,
            "output_model": "s3://out/job/model/",
            "metrics": {"evalLoss": 1.5},
        },
    ),
    (
        "one-finished-early-others-running",
        job(running_status()),
        [pod(0, **READY), pod(1, **succeeded())],
        {"phase": "Running", "events": []},
    ),
    (
        "rank-zero-finished-first-stays-running",
        job(running_status()),
        [pod(0, **succeeded()), pod(1, **RUNNING)],
        {"phase": "Running", "events": []},
    ),
    (
        "readiness-flap-does-not-leave-running",
        job(running_status()),
        [pod(0, **RUNNING), pod(1, **RUNNING)],
        {"phase": "Running", "events": []},
    ),
    (
        "worker-failure-restarts-the-gang",
        job(running_status()),
        [pod(0, **READY), pod(1, **failed(1, error="CUDA error: an illegal memory access"))],
        {
            "phase": "Restarting",
            "restarts": 1,
            "delete": ["job-worker-0", "job-worker-1"],
            "events": ["GangRestart"],
            "warning": True,
            "message": "worker 1 (pod job-worker-1) exited with code 1 (CUDA error: an illegal memory access",
            "gang_restarted": True,
        },
    ),
    (
        "oom-killed-is-named",
        job(running_status()),
        [pod(0, **failed(137, reason="OOMKilled")), pod(1, **RUNNING)],
        {"phase": "Restarting", "restarts": 1, "message": "OOMKilled"},
    ),
    (
        "past-backoff-limit-fails-with-the-last-reason",
        job(running_status(restarts=2)),
        [pod(0, attempt=2, **failed(137, reason="OOMKilled")), pod(1, attempt=2, **RUNNING)],
        {
            "phase": "Failed",
            "condition": ("Failed", "BackoffLimitExceeded"),
            "message": "last failure: OOMKilled",
            "delete": ["job-worker-1"],
            "completion": True,
        },
    ),
    (
        "non-retryable-exit-fails-at-once-with-the-trainers-message",
        job(running_status()),
        [
            pod(0, **failed(NON_RETRYABLE_EXIT_CODE, error="no usable rows in s3://data/train.jsonl")),
            pod(1, **RUNNING),
        ],
        {
            "phase": "Failed",
            "restarts": 0,
            "condition": ("Failed", "NonRetryableError"),
            "message": "no usable rows in s3://data/train.jsonl",
            "delete": ["job-worker-1"],
        },
    ),
    (
        "evicted-or-deleted-worker-restarts-the-gang",
        job(running_status()),
        [pod(0, **READY), pod(1, **RUNNING, deleting=True)],
        {"phase": "Restarting", "restarts": 1, "message": "deleted (preemption", "delete": ["job-worker-0"]},
    ),
    (
        "vanished-worker-restarts-the-gang",
        job(running_status()),
        [pod(0, **READY)],
        {"phase": "Restarting", "restarts": 1, "message": "worker 1's pod disappeared"},
    ),
    (
        "missing-worker-before-any-start-is-just-created",
        job({"phase": "Pending"}),
        [pod(0)],
        {"phase": "Pending", "create": 0, "restarts": 0},
    ),
    (
        "previous-attempt-is-torn-down-before-the-next",
        job({"phase": "Restarting", "restarts": 1}),
        [pod(0, attempt=0, **READY), pod(1, attempt=0, **failed(1), deleting=True)],
        {"phase": "Restarting", "delete": ["job-worker-0"], "create": None},
    ),
    (
        "next-attempt-created-once-the-old-pods-are-gone",
        job({"phase": "Restarting", "restarts": 1}),
        [],
        {"phase": "Restarting", "create": 1},
    ),
    (
        "suspend-deletes-workers",
        job(running_status(), suspend=True),
        [pod(0, **READY), pod(1, **RUNNING)],
        {
            "phase": "Suspended",
            "delete": ["job-worker-0", "job-worker-1"],
            "events": ["Suspended"],
            "condition": ("Suspended", "Suspended"),
            "start_time": False,
        },
    ),
    (
        "resume-creates-the-gang-again",
        job({"phase": "Suspended", "restarts": 1}),
        [],
        {"phase": "Pending", "create": 1, "events": ["Resumed", "Pending"], "condition_false": "Suspended"},
    ),
    (
        "resume-waits-for-the-suspended-workers-to-stop",
        job({"phase": "Suspended", "restarts": 1}),
        [pod(0, attempt=1, **RUNNING, deleting=True), pod(1, attempt=1, **RUNNING)],
        {"phase": "Suspended", "restarts": 1, "delete": ["job-worker-1"], "create": None, "events": []},
    ),
    (
        "the-first-worker-to-fail-is-named",
        job(running_status()),
        [
            pod(0, **failed(1, error="Connection reset by peer"), finished_at="2026-11-21T12:00:09Z"),
            pod(1, **failed(137, reason="OOMKilled"), finished_at="2026-11-21T12:00:05Z"),
        ],
        {"phase": "Restarting", "message": "OOMKilled: worker 1"},
    ),
    (
        "a-worker-that-is-not-collateral-is-the-cause-though-it-finished-later",
        job(running_status()),
        [
            pod(0, **failed(1, **COLLATERAL), finished_at="2026-11-21T12:00:01Z"),
            pod(
                1,
                **failed(1, error="CUDA error: an illegal memory access"),
                finished_at="2026-11-21T12:00:04Z",
            ),
        ],
        {
            "phase": "Restarting",
            "message": "WorkerFailed: worker 1 (pod job-worker-1) exited with code 1 (CUDA",
        },
    ),
    (
        "among-non-collateral-failures-the-first-to-finish-is-the-cause",
        job(running_status(), nodes=3),
        [
            pod(0, **failed(1, **COLLATERAL), finished_at="2026-11-21T12:00:01Z"),
            pod(1, **failed(1, error="disk full"), finished_at="2026-11-21T12:00:09Z"),
            pod(2, **failed(137, reason="OOMKilled"), finished_at="2026-11-21T12:00:05Z"),
        ],
        {"phase": "Restarting", "message": "OOMKilled: worker 2"},
    ),
    (
        "only-collateral-failures-seen-the-first-to-finish-is-named",
        job(running_status()),
        [
            pod(0, **failed(1, **COLLATERAL), finished_at="2026-11-21T12:00:03Z"),
            pod(1, **failed(1, **COLLATERAL), finished_at="2026-11-21T12:00:02Z"),
        ],
        {"phase": "Restarting", "message": "worker 1 (pod job-worker-1) exited with code 1 (rank 1 failed"},
    ),
    (
        "stalled-rank-restarts-the-gang-with-reason-and-condition-stalled",
        job(running_status()),
        [
            pod(0, **failed(1, **COLLATERAL), finished_at="2026-11-21T12:00:01Z"),
            pod(1, **failed(1, **STALL), finished_at="2026-11-21T12:00:02Z"),
        ],
        {
            "phase": "Restarting",
            "restarts": 1,
            "events": ["GangRestart"],
            "message": "Stalled: worker 1 (pod job-worker-1) exited with code 1 (no optimizer step for 600s",
            "conditions": {
                "Stalled": ("Stalled", "worker 1 (pod job-worker-1) exited with code 1 (no optimizer")
            },
            "gang_restarted": True,
        },
    ),
    (
        "stalled-past-the-backoff-limit-fails-naming-the-stall",
        job(running_status(restarts=2)),
        [pod(0, attempt=2, **RUNNING), pod(1, attempt=2, **failed(1, **STALL))],
        {
            "phase": "Failed",
            "message": "last failure: Stalled: worker 1",
            "conditions": {
                "Failed": ("BackoffLimitExceeded", "last failure: Stalled"),
                "Stalled": ("Stalled", "no optimizer step for 600s"),
            },
        },
    ),
    (
        "non-finite-loss-fails-at-once-with-its-reason-and-condition",
        job(running_status()),
        [
            pod(0, **failed(NON_RETRYABLE_EXIT_CODE, **NAN_LOSS), finished_at="2026-11-21T12:00:04Z"),
            pod(
                1,
                **failed(NON_RETRYABLE_EXIT_CODE, **COLLATERAL, retryable=False),
                finished_at="2026-11-21T12:00:01Z",
            ),
        ],
        {
            "phase": "Failed",
            "restarts": 0,
            "events": ["NonFiniteLoss"],
            "message": "worker 0 (pod job-worker-0): the training loss is nan at step 12",
            "conditions": {
                "Failed": ("NonFiniteLoss", "worker 0 (pod job-worker-0): the training loss is nan"),
                "NonFiniteLoss": ("NonFiniteLoss", "worker 0 (pod job-worker-0): the training loss is nan"),
            },
            "completion": True,
        },
    ),
    (
        "non-finite-loss-with-restart-policy-restarts-the-gang",
        job(running_status(), nonFiniteLoss="restart"),
        [pod(0, **failed(1, **{**NAN_LOSS, "retryable": True})), pod(1, **RUNNING)],
        {
            "phase": "Restarting",
            "restarts": 1,
            "message": "NonFiniteLoss: worker 0 (pod job-worker-0) exited with code 1 (the training loss",
            "conditions": {"NonFiniteLoss": ("NonFiniteLoss", "the training loss is nan at step 12")},
        },
    ),
    (
        "a-reason-kubernetes-would-refuse-is-not-used",
        job(running_status()),
        [pod(0, **failed(1, error="boom", because="not a reason!")), pod(1, **RUNNING)],
        {
            "phase": "Restarting",
            "message": "WorkerFailed: worker 0",
            "no_conditions": ["Stalled", "NonFiniteLoss"],
        },
    ),
    (
        "succeeded-with-a-nan-train-loss-keeps-the-output-model-and-the-other-metrics",
        job(running_status(progress={"step": 39, "totalSteps": 40, "percent": 97})),
        [
            pod(0, phase="Succeeded", started=True, exit_code=0, termination_message=NAN_TRAIN_LOSS_MESSAGE),
            pod(1, **succeeded()),
        ],
        {
            "phase": "Succeeded",
            "output_model": "s3://out/job/model/",
            "metrics": {"evalLoss": 1.5},
            "conditions": {"Succeeded": ("Succeeded", "trainLoss omitted: nan is not a finite number")},
        },
    ),
    (
        "eval-gate-not-met-fails-with-the-trainers-reason-and-message-and-no-output-model",
        job(running_status(baseMetrics=BASE_METRICS)),
        [
            pod(0, **failed(NON_RETRYABLE_EXIT_CODE, **GATE_NOT_MET)),
            pod(1, **succeeded()),
        ],
        {
            "phase": "Failed",
            "restarts": 0,
            "events": ["EvalGateNotMet"],
            "warning": True,
            "message": "worker 0 (pod job-worker-0): eval gate not met: answerAccuracy 0.42 < 0.8 "
            "(spec.evaluation.gate.min); the rejected model is at s3://out/job/rejected/",
            "conditions": {"Failed": ("EvalGateNotMet", "answerAccuracy 0.42 < 0.8")},
            "no_conditions": ["EvalGateNotMet", "Succeeded"],
            "output_model": None,
            "metrics": {"trainLoss": 0.9, "evalLoss": 1.1, "answerAccuracy": 0.42},
            "base_metrics": BASE_METRICS,
            "delete": [],
            "completion": True,
        },
    ),
    (
        "eval-gate-not-met-stops-the-workers-still-running",
        job(running_status(metrics={"trainLoss": 1.2, "evalLoss": 1.3})),
        [pod(0, **failed(NON_RETRYABLE_EXIT_CODE, **GATE_NOT_MET)), pod(1, **RUNNING)],
        {
            "phase": "Failed",
            "condition": ("Failed", "EvalGateNotMet"),
            "delete": ["job-worker-1"],
            "metrics": {"trainLoss": 0.9, "evalLoss": 1.1, "answerAccuracy": 0.42},
        },
    ),
    (
        "eval-gate-not-met-never-names-model-as-the-output",
        job(running_status()),
        [
            pod(
                0,
                **failed(NON_RETRYABLE_EXIT_CODE, **{**GATE_NOT_MET, "output_model": "s3://out/job/model/"}),
            ),
            pod(1, **succeeded(output_model="s3://out/job/model/")),
        ],
        {"phase": "Failed", "condition": ("Failed", "EvalGateNotMet"), "output_model": None},
    ),
    (
        "eval-gate-not-met-without-a-summary-location-says-only-the-trainers-words",
        job(running_status()),
        [
            pod(0, **failed(NON_RETRYABLE_EXIT_CODE, **{**GATE_NOT_MET, "output_model": ""})),
            pod(1, **succeeded()),
        ],
        {"phase": "Failed", "condition": ("Failed", "EvalGateNotMet"), "output_model": None},
    ),
    (
        "succeeded-keeps-the-base-metrics-beside-the-final-ones",
        job(running_status(baseMetrics=BASE_METRICS, metrics={"trainLoss": 1.0})),
        [
            pod(
                0,
                **succeeded(
                    output_model="s3://out/job/model/", metrics={"evalLoss": 1.1, "answerAccuracy": 0.9}
                ),
            ),
            pod(1, **succeeded()),
        ],
        {
            "phase": "Succeeded",
            "output_model": "s3://out/job/model/",
            "metrics": {"trainLoss": 1.0, "evalLoss": 1.1, "answerAccuracy": 0.9},
            "base_metrics": BASE_METRICS,
        },
    ),
    (
        "deadline-exceeded",
        job(running_status(startTime=ts(NOW - timedelta(hours=2))), activeDeadlineSeconds=3600),
        [pod(0, **READY), pod(1, **RUNNING)],
        {
            "phase": "Failed",
            "condition": ("Failed", "DeadlineExceeded"),
            "delete": ["job-worker-0", "job-worker-1"],
        },
    ),
    (
        "deadline-ahead-asks-to-look-again-then",
        job(running_status(startTime=ts(NOW - timedelta(minutes=30))), activeDeadlineSeconds=3600),
        [pod(0, **READY), pod(1, **RUNNING)],
        {"phase": "Running", "requeue": 1800.0},
    ),
    (
        "ttl-not-yet-due",
        job(
            {"phase": "Succeeded", "completionTime": ts(NOW - timedelta(seconds=60))},
            ttlSecondsAfterFinished=600,
        ),
        [],
        {"phase": "Succeeded", "requeue": 540.0, "delete_children": False},
    ),
    (
        "ttl-due-deletes-children-keeps-the-job",
        job(
            {"phase": "Succeeded", "completionTime": ts(NOW - timedelta(seconds=700))},
            ttlSecondsAfterFinished=600,
        ),
        [pod(0, **succeeded())],
        {
            "phase": "Succeeded",
            "delete_children": True,
            "delete": ["job-worker-0"],
            "condition": ("ChildrenDeleted", "TTLExpired"),
        },
    ),
    (
        "finished-job-never-recreates-children",
        job({"phase": "Failed", "completionTime": ts(NOW)}),
        [],
        {"phase": "Failed", "create": None, "events": []},
    ),
    (
        "failed-job-stops-leftover-workers",
        job({"phase": "Failed", "completionTime": ts(NOW)}),
        [pod(1, **RUNNING)],
        {"phase": "Failed", "delete": ["job-worker-1"]},
    ),
]


def _condition(decision: Decision, type_: str) -> dict[str, Any] | None:
    return next((c for c in decision.status.to_api()["conditions"] if c["type"] == type_), None)


@pytest.mark.parametrize(("observed", "pods", "expect"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_lifecycle(observed: JobObservation, pods: list[PodObservation], expect: dict[str, Any]) -> None:
    decision = decide(observed, pods, NOW)
    status = decision.status.to_api()
    assert status["phase"] == expect["phase"]
    checks = {
        "create": lambda: decision.create_attempt,
        "delete": lambda: sorted(decision.delete_pods),
        "events": lambda: [e.reason for e in decision.events],
        "restarts": lambda: status["restarts"],
        "requeue": lambda: decision.requeue_after,
        "delete_children": lambda: decision.delete_children,
        "first_running": lambda: decision.all_workers_running_first_time,
        "gang_restarted": lambda: decision.gang_restarted,
        "workers": lambda: status["workers"],
        "output_model": lambda: status.get("outputModel"),
        "metrics": lambda: status.get("metrics"),
        "base_metrics": lambda: status.get("baseMetrics"),
    }
    for key, actual in checks.items():
        if key in expect:
            assert actual() == expect[key], key
    if "message" in expect:
        assert expect["message"] in status["message"]
    if "warning" in expect:
        assert [e.type for e in decision.events] == ["Warning"]
    if "condition" in expect:
        type_, reason = expect["condition"]
        condition = _condition(decision, type_)
        assert condition is not None and (condition["status"], condition["reason"]) == ("True", reason)
        assert condition["message"]
    for type_, (reason, message) in expect.get("conditions", {}).items():
        condition = _condition(decision, type_)
        assert condition is not None and (condition["status"], condition["reason"]) == ("True", reason), type_
        assert message in condition["message"], condition
    for type_ in expect.get("no_conditions", []):
        assert _condition(decision, type_) is None, type_
    if "condition_false" in expect:
        assert _condition(decision, expect["condition_false"])["status"] == "False"
    if "completion" in expect:
        assert status["completionTime"] == ts(NOW)
    if "start_time" in expect:
        assert bool(status.get("startTime")) is expect["start_time"]
    assert status["observedGeneration"] == 1


def test_invalid_spec_fails_with_the_reasons_and_creates_nothing() -> None:
    observed = JobObservation(
        "job", "team", 3, CREATED, job=None, invalid_reasons=("spec.resources.nodes: got 0",)
    )
    decision = decide(observed, [], NOW)
    assert decision.status.phase == "Failed"
    assert decision.create_attempt is None
    condition = _condition(decision, "Failed")
    assert condition["reason"] == "InvalidSpec" and "spec.resources.nodes: got 0" in condition["message"]
    assert [e.reason for e in decision.events] == ["InvalidSpec"]
    again = decide(replace(observed, status=decision.status), [], NOW)
    assert again.events == [] and again.status == decision.status


def test_decisions_are_idempotent() -> None:
    """Feeding a decision's status back in with the same pods changes nothing and emits nothing."""
    for _, observed, pods, _ in CASES:
        first = decide(observed, pods, NOW)
        if first.delete_pods or first.create_attempt is not None or first.delete_children:
            continue  # the world changes before the next pass
        second = decide(replace(observed, status=copy.deepcopy(first.status)), pods, NOW)
        assert second.status == first.status
        assert second.events == []


def test_condition_transition_time_moves_only_when_status_flips() -> None:
    first = set_condition([], "Suspended", True, "Suspended", "a", NOW, 1)
    later = NOW + timedelta(hours=1)
    same = set_condition(first, "Suspended", True, "Suspended", "b", later, 2)
    flipped = set_condition(same, "Suspended", False, "Resumed", "c", later, 2)
    assert same[0].last_transition_time == ts(NOW) and same[0].message == "b"
    assert flipped[0].last_transition_time == ts(later)


def test_running_job_takes_its_progress_from_rank_zero() -> None:
    observed = replace(job(running_status()), progress={"step": 3, "totalSteps": 6, "trainLoss": 2.0})
    decision = decide(observed, [pod(0, **READY), pod(1, **RUNNING)], NOW)
    assert decision.status.progress.percent == 50 and decision.status.metrics == {"trainLoss": 2.0}
    assert decision.events == []


def test_base_metrics_from_rank_zero_are_kept_beside_the_latest() -> None:
    """The base model's metrics (step 0) go to status.baseMetrics; a later document without them (a
    resumed attempt) keeps them, and so does the final status of a finished job."""
    document = {
        "step": 0,
        "totalSteps": 40,
        "evalMetrics": BASE_METRICS,
        "baseMetrics": BASE_METRICS,
    }
    pods = [pod(0, **READY), pod(1, **RUNNING)]
    first = decide(replace(job(running_status()), progress=document), pods, NOW)
    assert first.status.base_metrics == BASE_METRICS and first.status.metrics == BASE_METRICS
    later = {"step": 30, "totalSteps": 40, "evalMetrics": {"evalLoss": 1.2}}
    second = decide(replace(job(first.status.to_api()), progress=later), pods, NOW)
    assert second.status.base_metrics == BASE_METRICS
    assert second.status.metrics == {**BASE_METRICS, "evalLoss": 1.2}
    finished = [pod(0, **succeeded(metrics={"evalLoss": 1.1})), pod(1, **succeeded())]
    final = decide(job(second.status.to_api()), finished, NOW).status.to_api()
    assert final["phase"] == "Succeeded" and final["baseMetrics"] == BASE_METRICS
    assert final["metrics"]["evalLoss"] == 1.1


def test_a_status_without_base_metrics_does_not_gain_an_empty_map() -> None:
    observed = replace(job(running_status()), progress={"step": 3, "totalSteps": 6, "trainLoss": 2.0})
    status = decide(observed, [pod(0, **READY), pod(1, **RUNNING)], NOW).status.to_api()
    assert "baseMetrics" not in status


@pytest.mark.parametrize(
    ("document", "progress", "metrics"),
    [
        pytest.param(
            {"step": 3, "totalSteps": 6, "trainLoss": float("nan"), "evalMetrics": {"evalLoss": 1.0}},
            {"step": 3, "totalSteps": 6, "epoch": 0.0, "percent": 50},
            {"trainLoss": 1.25, "evalLoss": 1.0},
            id="nan-loss-keeps-the-last-finite-one",
        ),
        pytest.param(
            {"step": 3, "totalSteps": float("inf"), "trainLoss": 2.0},
            {"step": 1, "totalSteps": 6, "percent": 16},
            {"trainLoss": 1.25},
            id="non-finite-total-steps-changes-nothing",
        ),
    ],
)
def test_a_progress_document_with_non_finite_numbers_never_reaches_the_status(
    document: dict[str, Any], progress: dict[str, Any], metrics: dict[str, float]
) -> None:
    before = running_status(progress={"step": 1, "totalSteps": 6, "percent": 16}, metrics={"trainLoss": 1.25})
    observed = replace(job(before), progress=document)
    decision = decide(observed, [pod(0, **READY), pod(1, **RUNNING)], NOW)
    status = decision.status.to_api()
    assert (status["phase"], status["progress"], status["metrics"]) == ("Running", progress, metrics)
    assert decision.events == []


ERROR = {
    "type": "ReconcileError",
    "status": "True",
    "reason": "Forbidden",
    "message": "the operator could not act on the job: exceeded quota",
    "lastTransitionTime": ts(CREATED),
    "observedGeneration": 1,
}


@pytest.mark.parametrize(
    ("previous_pass_failed", "expected"),
    [
        pytest.param(False, ("False", "Recovered", ts(NOW)), id="last-pass-went-through-recovers"),
        pytest.param(True, ("True", "Forbidden", ts(CREATED)), id="last-pass-failed-keeps-the-error"),
    ],
)
def test_a_recorded_error_is_cleared_once_a_pass_went_through(
    previous_pass_failed: bool, expected: tuple[str, str, str]
) -> None:
    observed = replace(job(running_status(conditions=[ERROR])), previous_pass_failed=previous_pass_failed)
    decision = decide(observed, [pod(0, **READY), pod(1, **RUNNING)], NOW)
    condition = _condition(decision, "ReconcileError")
    assert (condition["status"], condition["reason"], condition["lastTransitionTime"]) == expected
    assert decision.events == []


def test_record_error_sets_the_condition_and_keeps_its_time_while_the_error_lasts() -> None:
    first = record_error(FinetuneJobStatus(phase="Pending"), "Forbidden", "quota", NOW, 2)
    again = record_error(first, "Forbidden", "quota", NOW + timedelta(minutes=1), 2)
    assert again.to_api() == first.to_api()
    assert first.to_api()["conditions"] == [
        {
            "type": "ReconcileError",
            "status": "True",
            "reason": "Forbidden",
            "message": "quota",
            "lastTransitionTime": ts(NOW),
            "observedGeneration": 2,
        }
    ]


@pytest.mark.parametrize(
    ("observed", "pods", "poll", "requeue"),
    [
        pytest.param(job(running_status()), [pod(0, **READY), pod(1, **RUNNING)], 2.0, 2.0, id="running"),
        pytest.param(
            job(running_status(startTime=ts(NOW - timedelta(minutes=30))), activeDeadlineSeconds=3600),
            [pod(0, **READY), pod(1, **RUNNING)],
            2.0,
            2.0,
            id="poll-sooner-than-the-deadline",
        ),
        pytest.param(
            job(running_status(startTime=ts(NOW - timedelta(seconds=3599))), activeDeadlineSeconds=3600),
            [pod(0, **READY), pod(1, **RUNNING)],
            2.0,
            1.0,
            id="deadline-sooner-than-the-poll",
        ),
        pytest.param(
            job({"phase": "Pending"}), [pod(0, **RUNNING), pod(1)], 2.0, 2.0, id="initializing-polls-too"
        ),
        pytest.param(job(running_status()), [pod(0, **READY), pod(1, **RUNNING)], None, None, id="no-poll"),
        pytest.param(
            job(running_status()),
            [pod(0, **READY), pod(1, **succeeded())],
            2.0,
            2.0,
            id="rank-zero-still-running",
        ),
        pytest.param(
            job(running_status()),
            [pod(0, **succeeded()), pod(1, **succeeded())],
            2.0,
            None,
            id="finished-no-more-polls",
        ),
    ],
)
def test_rank_zero_is_polled_at_least_every_interval_while_it_reports(
    observed: JobObservation, pods: list[PodObservation], poll: float | None, requeue: float | None
) -> None:
    decision = decide(replace(observed, progress_poll_seconds=poll), pods, NOW)
    assert decision.requeue_after == requeue


def _huge_policy(observation: JobObservation, **policy: int) -> JobObservation:
    """The job with run-policy values beyond what the API accepts (decide must hold even then)."""
    assert observation.job is not None
    spec = observation.job.spec
    job_ = observation.job.model_copy(
        update={"spec": spec.model_copy(update={"run_policy": spec.run_policy.model_copy(update=policy)})}
    )
    return replace(observation, job=job_)


HOSTILE_SUMMARY = '{"outcome": "failed", "retryable": false, "error": "' + "e" * 50_000 + '"}'
# Observations that made decide raise (or write NaN) before it was total: each must now give a decision.
HOSTILE = [
    (
        "deadline-10^12",
        _huge_policy(job(running_status()), active_deadline_seconds=10**12),
        [pod(0, **RUNNING)],
    ),
    ("deadline-int64", _huge_policy(job(running_status()), active_deadline_seconds=2**63 - 1), []),
    (
        "ttl-10^12",
        _huge_policy(
            job({"phase": "Succeeded", "completionTime": ts(NOW)}), ttl_seconds_after_finished=10**12
        ),
        [],
    ),
    ("unreadable-start-time", job(running_status(startTime="yesterday")), [pod(0, **RUNNING)]),
    (
        "unreadable-completion-time",
        job({"phase": "Failed", "completionTime": "soon"}, ttlSecondsAfterFinished=5),
        [],
    ),
    (
        "start-time-year-9999",
        job(running_status(startTime="9999-12-31T23:59:59Z"), activeDeadlineSeconds=60),
        [],
    ),
    ("rank-out-of-range-succeeded", job(running_status()), [pod(5, **succeeded()), pod(6, **succeeded())]),
    ("negative-rank", job(running_status()), [pod(-1, **failed(1)), pod(0, **RUNNING)]),
    ("duplicated-ranks", job(running_status()), [pod(0, **READY), replace(pod(0, **succeeded()), name="x")]),
    ("stale-negative-attempt", job(running_status()), [pod(0, attempt=-1, **RUNNING)]),
    (
        "huge-termination-error",
        job(running_status()),
        [pod(0, exit_code=78, phase="Failed", termination_message=HOSTILE_SUMMARY)],
    ),
    (
        "termination-message-nested",
        job(running_status()),
        [pod(0, **failed(1)), replace(pod(1, **RUNNING), termination_message="[" * 50_000)],
    ),
    (
        "summary-with-huge-int-metric",
        job(running_status()),
        [
            replace(
                pod(r, **succeeded()),
                termination_message='{"outcome":"succeeded","metrics":{"a":' + "9" * 400 + "}}",
            )
            for r in (0, 1)
        ],
    ),
    (
        "output-model-elsewhere",
        job(running_status()),
        [pod(0, **succeeded(output_model="s3://evil/m/")), pod(1, **succeeded())],
    ),
    (
        "progress-nan-and-lists",
        replace(
            job(running_status()),
            progress={"step": float("nan"), "totalSteps": [1], "evalMetrics": [1], "trainLoss": float("inf")},
        ),
        [pod(0, **READY), pod(1, **RUNNING)],
    ),
    (
        "progress-huge-numbers",
        replace(
            job(running_status()),
            progress={"step": 10**30, "totalSteps": 10, "etaSeconds": 1e308, "epoch": 1e300},
        ),
        [pod(0, **READY), pod(1, **RUNNING)],
    ),
]


@pytest.mark.parametrize(("observed", "pods"), [pytest.param(o, p, id=i) for i, o, p in HOSTILE])
def test_decide_is_total_over_hostile_observations(
    observed: JobObservation, pods: list[PodObservation]
) -> None:
    decision = decide(observed, pods, NOW)
    json.dumps(decision.status.to_api(), allow_nan=False)
    assert decision.requeue_after is None or math.isfinite(decision.requeue_after)
    assert len(decision.status.message) < 4096
    assert decision.status.output_model in ("", "s3://out/job/model/")


def test_a_deadline_beyond_any_date_never_comes() -> None:
    decision = decide(_huge_policy(job(running_status()), active_deadline_seconds=10**12), [], NOW)
    assert decision.status.phase != "Failed" and decision.requeue_after is not None


def test_pods_with_a_rank_the_gang_has_not_are_deleted_not_counted() -> None:
    decision = decide(job(running_status()), [pod(0, **READY), pod(1, **READY), pod(7, **failed(1))], NOW)
    assert decision.status.phase == "Running" and decision.delete_pods == ["job-worker-7"]


def test_an_output_model_outside_the_jobs_output_is_not_taken() -> None:
    pods = [pod(0, **succeeded(output_model="s3://other/model/")), pod(1, **succeeded())]
    assert decide(job(running_status()), pods, NOW).status.output_model == ""
    pods = [pod(0, **succeeded(output_model="s3://out/job/model/")), pod(1, **succeeded())]
    assert decide(job(running_status()), pods, NOW).status.output_model == "s3://out/job/model/"

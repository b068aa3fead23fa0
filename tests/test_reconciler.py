"""The reconciler's own memory between passes: a gang it has just created is not created again while
kopf's pod index catches up (benchmarks/operator_scale.py found every job's gang created twice, four
409s a job, on the real API server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator.controller.kube import KubeApi, KubeApiError
from finetune_operator.controller.manifests import WorkerSettings
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.observation import PodObservation
from finetune_operator.controller.reconciler import CREATION_EXPECTED_WITHIN_SECONDS, Reconciler

from tests.manifests import minimal_manifest

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
UID = "u-1"


@dataclass
class RecordingApi(KubeApi):
    """Records the calls the reconciler makes instead of making them."""

    created: list[str] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    refuse_pods: bool = False

    async def create(self, obj: dict[str, Any]) -> bool:
        if self.refuse_pods and obj["kind"] == "Pod":
            raise KubeApiError(403, "Forbidden", "exceeded quota")
        self.created.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return True

    async def delete_pod(self, namespace: str, name: str) -> None:
        raise AssertionError(f"nothing should be deleted, not pod {name}")

    async def delete_rendezvous(self, namespace: str, job_name: str) -> None:
        raise AssertionError("nothing should be deleted")

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(status)


def reconciler() -> tuple[Reconciler, RecordingApi]:
    api = RecordingApi()
    settings = WorkerSettings(default_image="trainer:test")
    return Reconciler(api, settings, OperatorMetrics(), lambda _body, _event: None), api


def body() -> dict[str, Any]:
    job = minimal_manifest("llm", "ml", resources={"nodes": 2, "gpusPerNode": 1})
    job["metadata"] |= {"uid": UID, "generation": 1, "creationTimestamp": "2026-12-02T12:00:00Z"}
    return job


def pending(rank: int, attempt: int = 0) -> PodObservation:
    return PodObservation(name=f"llm-worker-{rank}", node_rank=rank, attempt=attempt, owner_uid=UID)


GANG = ["Service/llm-workers", "ConfigMap/llm-config", "Pod/llm-worker-0", "Pod/llm-worker-1"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("seen_next", "seconds_later", "created_again"),
    [
        pytest.param([], 1, [], id="index-has-none-yet"),
        pytest.param([pending(0)], 1, [], id="index-has-one-of-two"),
        pytest.param([], CREATION_EXPECTED_WITHIN_SECONDS + 1, GANG, id="never-seen-so-gone"),
        pytest.param([pending(0), pending(1)], 1, [], id="all-seen"),
    ],
)
async def test_a_gang_just_created_is_not_created_again(
    seen_next: list[PodObservation], seconds_later: float, created_again: list[str]
) -> None:
    operator, api = reconciler()
    await operator.reconcile(body(), [], now=T0)
    assert api.created == GANG
    api.created.clear()
    await operator.reconcile(body(), seen_next, now=T0 + timedelta(seconds=seconds_later))
    assert api.created == created_again


@pytest.mark.asyncio
async def test_pods_that_went_after_they_were_seen_are_created_again_at_once() -> None:
    operator, api = reconciler()
    await operator.reconcile(body(), [], now=T0)
    await operator.reconcile(body(), [pending(0), pending(1)], now=T0 + timedelta(seconds=1))
    api.created.clear()
    await operator.reconcile(body(), [], now=T0 + timedelta(seconds=2))  # deleted before they started
    assert api.created == GANG


def _reconcile_error(status: dict[str, Any]) -> tuple[str, str]:
    condition = next(c for c in status["conditions"] if c["type"] == "ReconcileError")
    return condition["status"], condition["reason"]


@pytest.mark.asyncio
async def test_an_api_error_is_recorded_once_and_cleared_by_the_pass_after_one_that_went_through() -> None:
    """One status patch a pass at most while the error lasts: each patch wakes the job again."""
    operator, api = reconciler()
    api.refuse_pods = True
    await operator.reconcile(body(), [], now=T0)
    assert [_reconcile_error(s) for s in api.statuses if "ReconcileError" in str(s)] == [
        ("True", "Forbidden")
    ]
    api.statuses.clear()
    await operator.reconcile(body(), [], now=T0 + timedelta(seconds=CREATION_EXPECTED_WITHIN_SECONDS + 1))
    assert api.statuses == []  # the same error again changes nothing
    api.refuse_pods = False
    await operator.reconcile(body(), [], now=T0 + timedelta(seconds=60))
    assert api.statuses == []  # the error stays until a pass has gone through
    await operator.reconcile(body(), [pending(0), pending(1)], now=T0 + timedelta(seconds=61))
    assert [_reconcile_error(s) for s in api.statuses] == [("False", "Recovered")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "owner", [pytest.param("u-2", id="another-jobs-pod"), pytest.param("", id="a-pod-without-owner")]
)
async def test_a_pod_with_the_jobs_labels_but_another_controller_is_not_a_worker(owner: str) -> None:
    """It can neither fail the job with its own message nor name the job's outputModel."""
    operator, api = reconciler()
    await operator.reconcile(body(), [], now=T0)
    foreign = PodObservation(
        name="intruder",
        node_rank=0,
        attempt=0,
        phase="Failed",
        started=True,
        exit_code=78,
        termination_message='{"outcome": "failed", "retryable": false, "error": "not yours"}',
        owner_uid=owner,
    )
    await operator.reconcile(body(), [pending(0), pending(1), foreign], now=T0 + timedelta(seconds=1))
    assert all(s.get("phase") != "Failed" and "not yours" not in str(s) for s in api.statuses)


@pytest.mark.asyncio
async def test_bad_values_of_a_termination_message_are_counted_once() -> None:
    operator, _ = reconciler()
    message = '{"outcome": "failed", "reason": "' + "R" * 1000 + '", "metrics": {"loss": NaN}}'
    failed = PodObservation(
        name="llm-worker-0",
        node_rank=0,
        attempt=0,
        phase="Running",
        termination_message=message,
        owner_uid=UID,
    )
    for second in (1, 2, 3):
        await operator.reconcile(body(), [failed, pending(1)], now=T0 + timedelta(seconds=second))
    counter = operator.metrics.dropped_report_values.labels("termination")
    assert counter._value.get() == 2  # metrics and reason, counted at the first pass only

"""The real operator (kopf, in-process) against the emulated Kubernetes API over HTTP.

A pod-lifecycle simulator (tests/kube/pods.py) plays the kubelet: the scenarios move worker pods
through their phases and assert on the FinetuneJob's status, conditions and events and on the
children the operator keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kopf
import pytest
from finetune_operator.handlers import OperatorContext, post_event, registry
from finetune_operator.kube import KubeApi, load_api_client
from finetune_operator.manifests import WorkerSettings
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.progress import ProgressPoller
from finetune_operator.reconciler import Reconciler
from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, TerminationSummary

from tests.kube import pods as kubelet
from tests.kube.emulator import KubeEmulator
from tests.kube.fixtures import emulated_cluster, running_operator
from tests.kube.semantics import FINETUNEJOBS
from tests.manifests import minimal_manifest

pytestmark = pytest.mark.asyncio

NS = "ml"
DEFAULTS: dict[str, dict[str, Any]] = {
    "dataset": {"evalSplit": 0.1},
    "resources": {"nodes": 2, "gpusPerNode": 1},
    "storage": {"credentialsSecret": "s3-creds"},
}


def manifest(name: str = "llm", **spec: dict[str, Any]) -> dict[str, Any]:
    sections = {key: {**DEFAULTS.get(key, {}), **spec.get(key, {})} for key in {*DEFAULTS, *spec}}
    return minimal_manifest(name, None, **sections)


@contextlib.asynccontextmanager
async def operator(url: str, progress_port: int = 1) -> AsyncIterator[OperatorMetrics]:
    """The operator as the runner builds it; progress polls go to 127.0.0.1:progress_port quickly."""
    metrics = OperatorMetrics()
    poller = ProgressPoller(interval=0.2, rate=100, timeout=0.5, port=progress_port)
    reconciler = Reconciler(
        KubeApi(load_api_client(url)),
        WorkerSettings(default_image="trainer:test"),
        metrics,
        post_event,
        poller,
    )
    memo = kopf.Memo(context=OperatorContext(reconciler=reconciler, resync_seconds=0.5))
    async with running_operator(url, registry, namespaces=[NS], memo=memo):
        yield metrics


def status(kube: KubeEmulator, name: str = "llm") -> dict[str, Any]:
    job = kube.get_object(FINETUNEJOBS, NS, name)
    return (job or {}).get("status") or {}


async def phase(kube: KubeEmulator, expected: str, name: str = "llm", timeout: float = 10) -> dict[str, Any]:
    await kube.wait_for(lambda: status(kube, name).get("phase") == expected, timeout, f"{name} {expected}")
    return status(kube, name)


async def gang(
    kube: KubeEmulator, attempt: int = 0, name: str = "llm", nodes: int = 2
) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        pods = kubelet.worker_pods(kube, NS, name)
        attempts = {p["metadata"]["labels"]["finetune.dev/attempt"] for p in pods}
        return pods if len(pods) == nodes and attempts == {str(attempt)} else None

    return await kube.wait_for(ready, 10, f"{nodes} pods of attempt {attempt}")


def condition(job_status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in job_status["conditions"] if c["type"] == type_)


def event_reasons(kube: KubeEmulator, name: str = "llm") -> list[str]:
    return [e.get("reason") for e in kube.events_for(name, NS)]


def summary(**fields: Any) -> str:
    return TerminationSummary(**fields).to_message()


def run_all(kube: KubeEmulator, pods: list[dict[str, Any]]) -> None:
    for pod in pods:
        kubelet.run(kube, pod, ready=pod["metadata"]["labels"]["finetune.dev/node-rank"] == "0")


async def test_two_node_job_from_pending_to_succeeded() -> None:
    async with emulated_cluster() as (url, kube), operator(url) as metrics:
        job = kube.create_object(FINETUNEJOBS, manifest(), NS)
        pods = await gang(kube)
        assert (await phase(kube, "Pending"))["workers"] == {"total": 2, "ready": 0}
        uid = job["metadata"]["uid"]
        service = kube.get_object("v1/services", NS, "llm-workers")
        config_map = kube.get_object("v1/configmaps", NS, "llm-config")
        for child in [service, config_map, *pods]:
            assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert service["spec"]["publishNotReadyAddresses"] is True

        kubelet.run(kube, pods[0])
        assert "1 of 2 workers started" in (await phase(kube, "Initializing"))["message"]
        kubelet.run(kube, pods[1])
        kubelet.run(kube, pods[0], ready=True)
        running = await phase(kube, "Running")
        assert running["workers"] == {"total": 2, "ready": 2} and running["startTime"]

        result = summary(outcome="succeeded", output_model="s3://out/llm/model/", metrics={"evalLoss": 1.25})
        kubelet.terminate(kube, pods[0], 0, message=result)
        kubelet.terminate(kube, pods[1], 0, message=summary(outcome="succeeded"))
        done = await phase(kube, "Succeeded")
        assert done["outputModel"] == "s3://out/llm/model/"
        assert done["metrics"] == {"evalLoss": 1.25}
        assert done["completionTime"] and condition(done, "Succeeded")["status"] == "True"
        await kube.wait_for(lambda: "Succeeded" in event_reasons(kube))
        assert event_reasons(kube) == ["Pending", "Initializing", "Running", "Succeeded"]
        assert metrics.time_to_running.collect()[0].samples[-1].value > 0  # _sum of the first attempt
        assert metrics.phases[(NS, "llm")] == "Succeeded"


async def test_worker_failure_restarts_the_whole_gang_then_succeeds() -> None:
    async with emulated_cluster() as (url, kube), operator(url) as metrics:
        kube.create_object(FINETUNEJOBS, manifest(), NS)
        first = await gang(kube)
        run_all(kube, first)
        await phase(kube, "Running")
        kubelet.terminate(kube, first[1], 137, reason="OOMKilled")

        second = await gang(kube, attempt=1)
        restarted = status(kube)
        assert restarted["restarts"] == 1
        assert {p["metadata"]["uid"] for p in second}.isdisjoint({p["metadata"]["uid"] for p in first})
        run_all(kube, second)
        await phase(kube, "Running")
        for pod in second:
            kubelet.terminate(kube, pod, 0)
        done = await phase(kube, "Succeeded")
        assert done["restarts"] == 1
        assert "GangRestart" in event_reasons(kube)
        restart_event = next(e for e in kube.events_for("llm", NS) if e["reason"] == "GangRestart")
        assert restart_event["type"] == "Warning" and "OOMKilled" in restart_event["message"]
        assert metrics.gang_restarts.labels(NS)._value.get() == 1


async def test_failures_past_the_backoff_limit_fail_the_job() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest(runPolicy={"backoffLimit": 1}), NS)
        for attempt in (0, 1):
            pods = await gang(kube, attempt=attempt)
            run_all(kube, pods)
            kubelet.terminate(kube, pods[0], 1, message=summary(outcome="failed", error="NCCL timeout"))
        failed = await phase(kube, "Failed")
        assert failed["restarts"] == 1
        assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
        assert "NCCL timeout" in failed["message"]
        # The failed worker stays for `kubectl logs`; the one still running is stopped.
        await kube.wait_for(lambda: len(kubelet.worker_pods(kube, NS, "llm")) == 1)
        await asyncio.sleep(1.0)  # several resyncs: a finished job never gets new pods
        assert len(kubelet.worker_pods(kube, NS, "llm")) == 1


async def test_non_retryable_exit_fails_at_once_with_the_trainers_message() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest(), NS)
        pods = await gang(kube)
        run_all(kube, pods)
        error = "dataset s3://data/train.jsonl: 0 usable rows of 120 (rows 1-120: missing 'messages')"
        kubelet.terminate(
            kube, pods[0], NON_RETRYABLE_EXIT_CODE, summary(outcome="failed", retryable=False, error=error)
        )
        failed = await phase(kube, "Failed")
        assert failed["restarts"] == 0
        assert condition(failed, "Failed")["reason"] == "NonRetryableError"
        assert error in condition(failed, "Failed")["message"] and error in failed["message"]


async def test_suspend_deletes_workers_and_resume_creates_them_again() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest(), NS)
        run_all(kube, await gang(kube))
        await phase(kube, "Running")
        kube.patch_object(FINETUNEJOBS, NS, "llm", {"spec": {"runPolicy": {"suspend": True}}})
        suspended = await phase(kube, "Suspended")
        assert condition(suspended, "Suspended")["status"] == "True"
        await kube.wait_for(lambda: kubelet.worker_pods(kube, NS, "llm") == [], what="workers deleted")
        assert kube.get_object("v1/configmaps", NS, "llm-config") is not None  # everything else stays

        kube.patch_object(FINETUNEJOBS, NS, "llm", {"spec": {"runPolicy": {"suspend": False}}})
        pods = await gang(kube, attempt=0)
        resumed = await phase(kube, "Pending")
        assert condition(resumed, "Suspended")["status"] == "False" and resumed["restarts"] == 0
        await kube.wait_for(lambda: {"Suspended", "Resumed"} <= set(event_reasons(kube)), what="events")
        run_all(kube, pods)
        await phase(kube, "Running")


async def test_active_deadline_fails_the_job() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest(runPolicy={"activeDeadlineSeconds": 2}), NS)
        run_all(kube, await gang(kube))
        await phase(kube, "Running")
        failed = await phase(kube, "Failed", timeout=10)
        assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"
        await kube.wait_for(
            lambda: kubelet.worker_pods(kube, NS, "llm") == [], what="running workers stopped"
        )


async def test_ttl_deletes_children_and_keeps_the_job_with_its_status() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest(runPolicy={"ttlSecondsAfterFinished": 1}), NS)
        pods = await gang(kube)
        run_all(kube, pods)
        for pod in pods:
            kubelet.terminate(kube, pod, 0)
        await phase(kube, "Succeeded")
        await kube.wait_for(
            lambda: (
                kube.get_object("v1/services", NS, "llm-workers") is None
                and kube.get_object("v1/configmaps", NS, "llm-config") is None
                and kubelet.worker_pods(kube, NS, "llm") == []
            ),
            timeout=10,
            what="children deleted",
        )
        kept = status(kube)
        assert kept["phase"] == "Succeeded" and condition(kept, "ChildrenDeleted")["reason"] == "TTLExpired"
        await asyncio.sleep(1.0)
        assert kubelet.worker_pods(kube, NS, "llm") == []  # never recreated


async def test_deleting_the_job_removes_everything_it_owns() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest(), NS)
        run_all(kube, await gang(kube))
        await phase(kube, "Running")
        kube.delete_object(FINETUNEJOBS, NS, "llm")
        await kube.wait_for(lambda: kube.get_object(FINETUNEJOBS, NS, "llm") is None, what="job gone")
        await kube.wait_for(
            lambda: (
                not kubelet.worker_pods(kube, NS, "llm")
                and kube.get_object("v1/services", NS, "llm-workers") is None
                and kube.get_object("v1/configmaps", NS, "llm-config") is None
            ),
            what="children collected",
        )


async def test_operator_restarted_mid_run_converges_without_duplicates() -> None:
    async with emulated_cluster() as (url, kube):
        async with operator(url):
            kube.create_object(FINETUNEJOBS, manifest(), NS)
            pods = await gang(kube)
            run_all(kube, pods)
            await phase(kube, "Running")
        # While no operator runs, a worker dies.
        kubelet.terminate(kube, pods[1], 1)
        async with operator(url):
            second = await gang(kube, attempt=1)
            assert status(kube)["restarts"] == 1
            run_all(kube, second)
            await phase(kube, "Running")
            await asyncio.sleep(1.0)  # resyncs of a new operator change nothing
            assert status(kube)["restarts"] == 1
            assert [p["metadata"]["name"] for p in kubelet.worker_pods(kube, NS, "llm")] == [
                "llm-worker-0",
                "llm-worker-1",
            ]
            assert len(kube.list_objects("v1/services", NS)) == 1
            assert event_reasons(kube).count("GangRestart") == 1


async def test_invalid_object_fails_clearly_and_other_jobs_go_on() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest("broken", resources={"nodes": 0}), NS)
        kube.create_object(FINETUNEJOBS, manifest("fine"), NS)
        failed = await phase(kube, "Failed", name="broken")
        reason = condition(failed, "Failed")
        assert reason["reason"] == "InvalidSpec"
        assert "spec.resources.nodes: got 0; must be greater than or equal to 1" in reason["message"]
        assert kubelet.worker_pods(kube, NS, "broken") == []
        await gang(kube, name="fine")
        await phase(kube, "Pending", name="fine")


async def test_api_refusals_are_recorded_in_a_condition_and_an_event() -> None:
    async with emulated_cluster() as (url, kube), operator(url) as metrics:
        quota = kube.exceed_quota("v1/pods", NS)
        kube.create_object(FINETUNEJOBS, manifest(), NS)
        await kube.wait_for(
            lambda: any(c["type"] == "ReconcileError" for c in status(kube).get("conditions", []))
        )
        error = condition(status(kube), "ReconcileError")
        assert error["status"] == "True" and "exceeded quota" in error["message"]
        await kube.wait_for(lambda: "ReconcileError" in event_reasons(kube))
        assert metrics.reconcile_errors.labels("Forbidden")._value.get() >= 1
        kube.refusals.remove(quota)
        await gang(kube)
        await kube.wait_for(
            lambda: condition(status(kube), "ReconcileError")["status"] == "False", timeout=10
        )


async def test_unschedulable_reason_is_shown_while_pending() -> None:
    async with emulated_cluster() as (url, kube), operator(url):
        kube.create_object(FINETUNEJOBS, manifest(), NS)
        pods = await gang(kube)
        kubelet.unschedulable(kube, pods[0], "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
        await kube.wait_for(lambda: "Insufficient nvidia.com/gpu" in status(kube).get("message", ""))
        assert status(kube)["phase"] == "Pending"


async def test_fifty_jobs_at_once() -> None:
    names = [f"job-{i:02d}" for i in range(50)]
    async with emulated_cluster() as (url, kube), operator(url) as metrics:
        for name in names:
            kube.create_object(FINETUNEJOBS, manifest(name, resources={"nodes": 2}), NS)
        for name in names:
            run_all(kube, await gang(kube, name=name, nodes=2))
        for name in names:
            await phase(kube, "Running", name=name, timeout=30)
        assert len(kube.list_objects("v1/pods", NS)) == 100
        assert len(kube.list_objects("v1/services", NS)) == 50
        # The metric follows the status patch of the same pass.
        await kube.wait_for(lambda: sum(1 for p in metrics.phases.values() if p == "Running") == 50)


class FakeRankZero:
    """Serves a /progress document on loopback, as global rank 0 does."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def test_running_jobs_report_progress_metrics_and_checkpoints_in_status() -> None:
    rank_zero = FakeRankZero()
    async with emulated_cluster() as (url, kube), operator(url, progress_port=rank_zero.port):
        kube.create_object(FINETUNEJOBS, manifest(), NS)
        pods = await gang(kube)
        # While nothing answers on the port, the job simply has no progress yet.
        for pod in pods:
            kubelet.run(kube, pod, ready=pod["metadata"]["name"].endswith("-0"), ip="127.0.0.1")
        await phase(kube, "Running")
        rank_zero.document = {
            "state": "training",
            "step": 30,
            "totalSteps": 120,
            "epoch": 0.5,
            "tokensPerSecond": 91000.0,
            "etaSeconds": 540,
            "trainLoss": 1.23456,
            "evalMetrics": {"evalLoss": 1.31, "perplexity": 3.7, "tokenAccuracy": 0.61},
            "checkpoints": [
                {"step": 25, "uri": "s3://out/llm/checkpoints/step-25/", "evalLoss": 1.31, "time": "t"}
            ],
        }
        await kube.wait_for(lambda: status(kube).get("progress", {}).get("step") == 30, what="progress")
        reported = status(kube)
        assert reported["progress"] == {
            "step": 30,
            "totalSteps": 120,
            "epoch": 0.5,
            "percent": 25,
            "etaSeconds": 540,
            "tokensPerSecond": 91000.0,
        }
        assert reported["metrics"] == {
            "trainLoss": 1.2346,
            "evalLoss": 1.31,
            "perplexity": 3.7,
            "tokenAccuracy": 0.61,
        }
        assert reported["checkpoints"] == [
            {"step": 25, "uri": "s3://out/llm/checkpoints/step-25/", "evalLoss": 1.31, "time": "t"}
        ]
        rank_zero.document = {**rank_zero.document, "step": 60}
        await kube.wait_for(lambda: status(kube)["progress"]["percent"] == 50, what="progress advances")
        rank_zero.server.shutdown()  # unreachable progress while pods run is not a failure
        await asyncio.sleep(1.0)
        assert status(kube)["phase"] == "Running" and status(kube)["progress"]["step"] == 60

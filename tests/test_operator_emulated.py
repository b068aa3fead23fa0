"""The real operator (kopf, in-process) against the emulated Kubernetes API, for what the real one
can't do on demand.

The lifecycle scenarios run on the real control plane (test_operator.py). These need the emulator:
API refusals injected at will (quota, 403), an object that the CRD would have refused reaching the
operator (an older CRD, or one edited by hand), fifty jobs at once in seconds, and a fake rank 0 on
loopback whose progress document the test rewrites.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from finetune_operator.controller.handlers import registry
from finetune_operator.controller.kube import KubeApi, load_api_client
from finetune_operator.controller.manifests import WorkerSettings
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.progress import ProgressPoller
from finetune_operator.controller.runner import operator_memo

from tests.kube import pods as kubelet
from tests.kube.emulator import KubeEmulator
from tests.kube.fixtures import emulated_cluster, running_operator
from tests.kube.semantics import FINETUNEJOBS
from tests.test_operator import condition, manifest

pytestmark = pytest.mark.asyncio

NS = "ml"


@contextlib.asynccontextmanager
async def operator(url: str, progress_port: int = 1) -> AsyncIterator[OperatorMetrics]:
    """The operator as the runner builds it; progress polls go to 127.0.0.1:progress_port quickly."""
    metrics = OperatorMetrics()
    poller = ProgressPoller(interval=0.2, rate=100, timeout=0.5, port=progress_port)
    settings = WorkerSettings(default_image="trainer:test")
    memo = operator_memo(KubeApi(load_api_client(url)), settings, metrics, poller, resync_seconds=0.5)
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


def event_reasons(kube: KubeEmulator, name: str = "llm") -> list[str]:
    return [e.get("reason") for e in kube.events_for(name, NS)]


def run_all(kube: KubeEmulator, pods: list[dict[str, Any]]) -> None:
    for pod in pods:
        kubelet.run(kube, pod, ready=pod["metadata"]["labels"]["finetune.dev/node-rank"] == "0")


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

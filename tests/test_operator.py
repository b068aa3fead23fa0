"""The real operator (kopf, in-process) against the real control plane, as the chart's ServiceAccount.

The API server, etcd, the garbage collector and the scheduler are the real ones (tests/kube/
controlplane.py); the operator authenticates with a token of the ServiceAccount that the Helm chart
creates and holds exactly the chart's RBAC, so a missing grant fails these scenarios. Pods are bound
by the real scheduler to registered 8-GPU nodes; the scenario plays their kubelet (tests/kube/pods.py)
and moves them through their phases; the node agent completes their graceful deletion.

What the real server cannot do on demand (409/422/500 or quota refusals, objects the CRD would have
refused, many jobs in seconds) stays on the emulator, in test_operator_emulated.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from finetune_operator.api.memory_fit import GPU_MEMORY_LABEL, MODEL_CONFIG_ANNOTATION, annotation_value
from finetune_operator.controller.handlers import registry
from finetune_operator.controller.kube import KubeApi
from finetune_operator.controller.manifests import WorkerSettings
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.progress import ProgressPoller
from finetune_operator.controller.runner import operator_memo
from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, TerminationSummary

from tests.kube import pods as kubelet
from tests.kube.client import KubeClient
from tests.kube.cluster import GPU_NODES, GPUS_PER_NODE, Identity, RealCluster, chart_rbac
from tests.kube.fixtures import running_operator
from tests.kube.semantics import FINETUNEJOBS
from tests.manifests import minimal_manifest
from tests.test_chart import render
from tests.test_memory_fit import LLAMA_3_8B

pytestmark = pytest.mark.asyncio

DEFAULTS: dict[str, dict[str, Any]] = {
    "dataset": {"evalSplit": 0.1},
    "resources": {"nodes": 2, "gpusPerNode": 1},
    "storage": {"credentialsSecret": "s3-creds"},
}
TIMEOUT = 30.0  # seconds for a step of a scenario; the real API and scheduler take a few hundred ms


def manifest(name: str = "llm", **spec: dict[str, Any]) -> dict[str, Any]:
    sections = {key: {**DEFAULTS.get(key, {}), **spec.get(key, {})} for key in {*DEFAULTS, *spec}}
    return minimal_manifest(name, None, **sections)


def summary(**fields: Any) -> str:
    return TerminationSummary(**fields).to_message()


def condition(job_status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in job_status["conditions"] if c["type"] == type_)


@dataclasses.dataclass
class Job:
    """One FinetuneJob in the test's namespace, seen through the admin's client."""

    kube: KubeClient
    namespace: str
    name: str = "llm"

    def create(self, **spec: dict[str, Any]) -> dict[str, Any]:
        return self.kube.create_object(FINETUNEJOBS, manifest(self.name, **spec), self.namespace)

    def patch(self, patch: dict[str, Any]) -> None:
        self.kube.patch_object(FINETUNEJOBS, self.namespace, self.name, patch)

    def status(self) -> dict[str, Any]:
        job = self.kube.get_object(FINETUNEJOBS, self.namespace, self.name)
        return (job or {}).get("status") or {}

    async def phase(self, expected: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        what = f"{self.name} {expected}"
        try:
            await self.kube.wait_for(lambda: self.status().get("phase") == expected, timeout, what)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.describe()}") from None
        return self.status()

    def pods(self) -> list[dict[str, Any]]:
        return kubelet.worker_pods(self.kube, self.namespace, self.name)

    async def gang(self, attempt: int = 0, nodes: int = 2) -> list[dict[str, Any]]:
        """The workers of ``attempt`` once all exist and the scheduler has bound them to nodes."""

        def bound() -> list[dict[str, Any]] | None:
            pods = self.pods()
            attempts = {p["metadata"]["labels"]["finetune.dev/attempt"] for p in pods}
            placed = all(p["spec"].get("nodeName") for p in pods)
            return pods if len(pods) == nodes and attempts == {str(attempt)} and placed else None

        try:
            return await self.kube.wait_for(bound, TIMEOUT, f"{nodes} bound pods of attempt {attempt}")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.describe()}") from None

    def describe(self) -> str:
        """The job's status and its pods' placement and phases, for failure messages."""
        pods = [
            (p["metadata"]["name"], p["spec"].get("nodeName"), p.get("status", {}).get("phase"))
            for p in self.pods()
        ]
        return f"status: {self.status()}\npods: {pods}"

    def run_all(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            kubelet.run(self.kube, pod, ready=pod["metadata"]["labels"]["finetune.dev/node-rank"] == "0")

    def events(self) -> list[dict[str, Any]]:
        return self.kube.events_for(self.name, self.namespace)

    def event_reasons(self) -> list[str]:
        return [e.get("reason") for e in self.events()]

    def children(self) -> dict[str, Any]:
        ns = self.namespace
        return {
            "pods": self.pods(),
            "service": self.kube.get_object("v1/services", ns, f"{self.name}-workers"),
            "configMap": self.kube.get_object("v1/configmaps", ns, f"{self.name}-config"),
        }

    def no_children(self) -> bool:
        return not any(self.children().values())


@contextlib.asynccontextmanager
async def operator(
    cluster: RealCluster, identity: Identity, namespace: str
) -> AsyncIterator[OperatorMetrics]:
    """The operator as the runner builds it, logged in as ``identity``, watching ``namespace``."""
    metrics = OperatorMetrics()
    poller = ProgressPoller(interval=0.2, rate=100, timeout=0.5, port=1)  # nothing answers: no progress
    settings = WorkerSettings(default_image="trainer:test")
    memo = operator_memo(KubeApi(identity.api_client()), settings, metrics, poller, resync_seconds=0.5)
    connection = identity.connection(cluster.url, cluster.ca_path)
    async with running_operator(connection, registry, namespaces=[namespace], memo=memo):
        yield metrics


@pytest.fixture
def job(control_plane: RealCluster, namespace: str) -> Job:
    return Job(control_plane.admin, namespace)


Operating = Callable[[], contextlib.AbstractAsyncContextManager[OperatorMetrics]]


@pytest.fixture
def operating(control_plane: RealCluster, operator_identity: Identity, namespace: str) -> Operating:
    """Starts the operator as the chart's ServiceAccount, watching the test's namespace."""
    return lambda: operator(control_plane, operator_identity, namespace)


async def test_two_node_job_from_pending_to_succeeded(job: Job, operating: Operating) -> None:
    async with operating() as metrics:
        created = job.create()
        pods = await job.gang()
        assert (await job.phase("Pending"))["workers"] == {"total": 2, "ready": 0}
        uid = created["metadata"]["uid"]
        children = job.children()
        for child in [children["service"], children["configMap"], *pods]:
            assert child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert children["service"]["spec"]["publishNotReadyAddresses"] is True
        assert children["service"]["spec"]["clusterIP"] == "None"  # headless, as the real API keeps it
        assert {p["spec"]["nodeName"] for p in pods} <= set(GPU_NODES)  # bound by the real scheduler

        kubelet.run(job.kube, pods[0])
        assert "1 of 2 workers started" in (await job.phase("Initializing"))["message"]
        kubelet.run(job.kube, pods[1])
        kubelet.run(job.kube, pods[0], ready=True)
        running = await job.phase("Running")
        assert running["workers"] == {"total": 2, "ready": 2} and running["startTime"]

        result = summary(outcome="succeeded", output_model="s3://out/llm/model/", metrics={"evalLoss": 1.25})
        kubelet.terminate(job.kube, pods[0], 0, message=result)
        kubelet.terminate(job.kube, pods[1], 0, message=summary(outcome="succeeded"))
        done = await job.phase("Succeeded")
        assert done["outputModel"] == "s3://out/llm/model/"
        assert done["metrics"] == {"evalLoss": 1.25}
        assert done["completionTime"] and condition(done, "Succeeded")["status"] == "True"
        await job.kube.wait_for(lambda: "Succeeded" in job.event_reasons(), TIMEOUT)
        assert job.event_reasons() == ["Pending", "Initializing", "Running", "Succeeded"]
        assert metrics.time_to_running.collect()[0].samples[-1].value > 0  # _sum of the first attempt
        assert metrics.phases[(job.namespace, "llm")] == "Succeeded"


async def test_worker_failure_restarts_the_whole_gang_then_succeeds(job: Job, operating: Operating) -> None:
    async with operating() as metrics:
        job.create()
        first = await job.gang()
        job.run_all(first)
        await job.phase("Running")
        kubelet.terminate(job.kube, first[1], 137, reason="OOMKilled")

        second = await job.gang(attempt=1)
        assert job.status()["restarts"] == 1
        assert {p["metadata"]["uid"] for p in second}.isdisjoint({p["metadata"]["uid"] for p in first})
        job.run_all(second)
        await job.phase("Running")
        for pod in second:
            kubelet.terminate(job.kube, pod, 0)
        done = await job.phase("Succeeded")
        assert done["restarts"] == 1
        restart_event = next(e for e in job.events() if e["reason"] == "GangRestart")
        assert restart_event["type"] == "Warning" and "OOMKilled" in restart_event["message"]
        assert metrics.gang_restarts.labels(job.namespace)._value.get() == 1


async def test_failures_past_the_backoff_limit_fail_the_job(job: Job, operating: Operating) -> None:
    async with operating():
        job.create(runPolicy={"backoffLimit": 1})
        for attempt in (0, 1):
            pods = await job.gang(attempt=attempt)
            job.run_all(pods)
            kubelet.terminate(job.kube, pods[0], 1, message=summary(outcome="failed", error="NCCL timeout"))
        failed = await job.phase("Failed")
        assert failed["restarts"] == 1
        assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
        assert "NCCL timeout" in failed["message"]
        # The failed worker stays for `kubectl logs`; the one still running is stopped.
        await job.kube.wait_for(lambda: len(job.pods()) == 1, TIMEOUT, "the running worker stopped")
        await asyncio.sleep(1.5)  # several resyncs: a finished job never gets new pods
        assert [p["status"]["phase"] for p in job.pods()] == ["Failed"]


async def test_non_retryable_exit_fails_at_once_with_the_trainers_message(
    job: Job, operating: Operating
) -> None:
    async with operating():
        job.create()
        pods = await job.gang()
        job.run_all(pods)
        error = "dataset s3://data/train.jsonl: 0 usable rows of 120 (rows 1-120: missing 'messages')"
        message = summary(outcome="failed", retryable=False, error=error)
        kubelet.terminate(job.kube, pods[0], NON_RETRYABLE_EXIT_CODE, message)
        failed = await job.phase("Failed")
        assert failed["restarts"] == 0
        assert condition(failed, "Failed")["reason"] == "NonRetryableError"
        assert error in condition(failed, "Failed")["message"] and error in failed["message"]


async def test_suspend_deletes_workers_and_resume_creates_them_again(job: Job, operating: Operating) -> None:
    async with operating():
        job.create()
        job.run_all(await job.gang())
        await job.phase("Running")
        job.patch({"spec": {"runPolicy": {"suspend": True}}})
        suspended = await job.phase("Suspended")
        assert condition(suspended, "Suspended")["status"] == "True"
        await job.kube.wait_for(lambda: job.pods() == [], TIMEOUT, "workers deleted")
        assert job.children()["configMap"] is not None  # everything else stays

        job.patch({"spec": {"runPolicy": {"suspend": False}}})
        pods = await job.gang(attempt=0)
        resumed = await job.phase("Pending")
        assert condition(resumed, "Suspended")["status"] == "False" and resumed["restarts"] == 0
        await job.kube.wait_for(lambda: {"Suspended", "Resumed"} <= set(job.event_reasons()), TIMEOUT)
        job.run_all(pods)
        await job.phase("Running")


async def test_active_deadline_fails_the_job(job: Job, operating: Operating) -> None:
    async with operating():
        job.create(runPolicy={"activeDeadlineSeconds": 2})
        job.run_all(await job.gang())
        await job.phase("Running")
        failed = await job.phase("Failed")
        assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"
        await job.kube.wait_for(lambda: job.pods() == [], TIMEOUT, "running workers stopped")


async def test_ttl_deletes_children_and_keeps_the_job_with_its_status(job: Job, operating: Operating) -> None:
    async with operating():
        job.create(runPolicy={"ttlSecondsAfterFinished": 1})
        pods = await job.gang()
        job.run_all(pods)
        for pod in pods:
            kubelet.terminate(job.kube, pod, 0)
        await job.phase("Succeeded")
        await job.kube.wait_for(job.no_children, TIMEOUT, "children deleted")
        kept = job.status()
        assert kept["phase"] == "Succeeded" and condition(kept, "ChildrenDeleted")["reason"] == "TTLExpired"
        await asyncio.sleep(1.5)
        assert job.pods() == []  # never recreated


async def test_deleting_the_job_lets_the_garbage_collector_remove_its_children(
    job: Job, operating: Operating
) -> None:
    async with operating():
        job.create()
        job.run_all(await job.gang())
        await job.phase("Running")
        job.kube.delete_object(FINETUNEJOBS, job.namespace, job.name)
        # kopf's finalizer (it keeps the job until its daemon has stopped) goes, and so does the job.
        await job.kube.wait_for(lambda: job.kube.get_object(FINETUNEJOBS, job.namespace, "llm") is None)
    # No operator runs now: only the real garbage collector can remove what the job owned.
    await job.kube.wait_for(job.no_children, 90, "children collected by the garbage collector")


async def test_operator_restarted_mid_run_converges_without_duplicates(
    job: Job, operating: Operating
) -> None:
    async with operating():
        job.create()
        pods = await job.gang()
        job.run_all(pods)
        await job.phase("Running")
    # While no operator runs, a worker dies.
    kubelet.terminate(job.kube, pods[1], 1)
    async with operating():
        second = await job.gang(attempt=1)
        assert job.status()["restarts"] == 1
        job.run_all(second)
        await job.phase("Running")
        await asyncio.sleep(1.5)  # resyncs of a new operator change nothing
        assert job.status()["restarts"] == 1
        assert [p["metadata"]["name"] for p in job.pods()] == ["llm-worker-0", "llm-worker-1"]
        assert len(job.kube.list_objects("v1/services", job.namespace)) == 1
        assert job.event_reasons().count("GangRestart") == 1


async def test_more_gpus_than_any_node_has_is_pending_with_the_schedulers_message(
    job: Job, operating: Operating
) -> None:
    async with operating():
        job.create(resources={"nodes": 2, "gpusPerNode": GPUS_PER_NODE * 2})
        await job.kube.wait_for(lambda: len(job.pods()) == 2, TIMEOUT, "pods created")
        message = f"0/{len(GPU_NODES) + 1} nodes are available"
        pending = await job.kube.wait_for(
            lambda: (s := job.status()).get("phase") == "Pending" and message in s.get("message", "") and s,
            TIMEOUT,
            "the scheduler's message in the status",
        )
        assert "Insufficient nvidia.com/gpu" in pending["message"]
        unschedulable = condition(pending, "Running")
        assert unschedulable["reason"] == "Unschedulable" and message in unschedulable["message"]
        assert all(not p["spec"].get("nodeName") for p in job.pods())


async def test_a_missing_grant_is_refused_by_the_real_authorizer(
    control_plane: RealCluster, job: Job
) -> None:
    """The chart's roles without `create pods`: the operator's calls meet 403 and the job says so."""
    rbac = chart_rbac(render({"watchNamespaces": [job.namespace]}))
    for obj in rbac:
        obj["metadata"]["name"] = f"{obj['metadata']['name']}-no-pods"
        for rule in obj.get("rules", []):
            if "pods" in rule.get("resources", []):
                rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
        if obj["kind"].endswith("Binding"):
            obj["roleRef"]["name"] += "-no-pods"
            for subject in obj["subjects"]:
                subject["name"] += "-no-pods"
    identity = control_plane.grant("no-pods", rbac)
    async with operator(control_plane, identity, job.namespace):
        job.create()
        error = await job.kube.wait_for(
            lambda: next(
                (c for c in job.status().get("conditions", []) if c["type"] == "ReconcileError"), None
            ),
            TIMEOUT,
            "a ReconcileError condition",
        )
        assert error["status"] == "True" and "forbidden" in error["message"]
        assert 'cannot create resource "pods"' in error["message"]
        assert job.pods() == []


async def test_a_foreign_pod_with_the_jobs_labels_does_not_affect_the_job(
    job: Job, operating: Operating
) -> None:
    """A pod anyone made with the job's labels (controlled by something else) is not a worker: its
    non-retryable exit and its outputModel never reach the job, which succeeds with its own gang."""
    async with operating():
        job.create()
        pods = await job.gang()
        owner = job.kube.create_object(
            "v1/configmaps", {"metadata": {"name": "someone-else"}, "data": {}}, job.namespace
        )
        intruder = {
            "metadata": {
                "name": "llm-intruder",
                "labels": pods[0]["metadata"]["labels"],
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "someone-else",
                        "uid": owner["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {"containers": [{"name": "trainer", "image": "trainer:test"}], "nodeName": GPU_NODES[0]},
        }
        intruder = job.kube.create_object(kubelet.PODS, intruder, job.namespace)
        kubelet.run(job.kube, intruder)
        message = summary(outcome="failed", retryable=False, error="not yours")
        kubelet.terminate(job.kube, intruder, NON_RETRYABLE_EXIT_CODE, message)
        job.run_all(pods)
        await job.phase("Running")
        await asyncio.sleep(1.5)  # several resyncs with the intruder in the index
        assert "not yours" not in str(job.status())
        foreign_model = summary(outcome="succeeded", output_model="s3://elsewhere/model/")
        kubelet.terminate(
            job.kube, pods[0], 0, message=summary(outcome="succeeded", output_model="s3://out/llm/model/")
        )
        kubelet.terminate(job.kube, pods[1], 0, message=foreign_model)
        done = await job.phase("Succeeded")
        assert done["outputModel"] == "s3://out/llm/model/" and done["restarts"] == 0
        assert job.kube.get_object(kubelet.PODS, job.namespace, "llm-intruder") is not None  # left alone


async def test_a_job_without_a_gpu_label_gets_its_gpu_memory_from_the_nodes_it_matches(
    control_plane: RealCluster, job: Job, operating: Operating
) -> None:
    """The smallest nvidia.com/gpu.memory of the Nodes its nodeSelector matches (a label that is not a size
    is ignored), read through the operator's index with the chart's RBAC: too small, failed before any pod."""
    pool = f"pool-{uuid.uuid4().hex[:8]}"
    sizes = {f"{pool}-small": "24576", f"{pool}-large": "81559", f"{pool}-odd": "lots"}
    for name, mib in sizes.items():  # unschedulable: no other test's pod lands on a node no agent serves
        labels = {"finetune.dev/test-pool": pool, GPU_MEMORY_LABEL: mib}
        job.kube.create_object(
            "v1/nodes", {"metadata": {"name": name, "labels": labels}, "spec": {"unschedulable": True}}
        )
    try:
        async with operating():  # kopf fills its indices before it runs a daemon: the nodes are in
            body = manifest(
                method={"type": "full"}, resources={"nodeSelector": {"finetune.dev/test-pool": pool}}
            )
            body["metadata"]["annotations"] = {MODEL_CONFIG_ANNOTATION: annotation_value(LLAMA_3_8B)}
            job.kube.create_object(FINETUNEJOBS, body, job.namespace)
            failed = await job.phase("Failed")
        assert condition(failed, "Failed")["reason"] == "InsufficientGPUMemory"
        fit = condition(failed, "MemoryFit")
        assert fit["status"] == "False" and "per GPU of 24.0 GiB" in fit["message"]
        origin = f"{GPU_MEMORY_LABEL} 24576 MiB on node {pool}-small, the smallest of the 2 matching nodes"
        assert origin in fit["message"]
        assert job.pods() == []
    finally:
        for name in sizes:
            job.kube.delete_object("v1/nodes", None, name)

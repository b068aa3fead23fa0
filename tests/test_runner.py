"""`finetune-operator` as users run it: a real process on the real control plane, logging in through a
kubeconfig that holds a token of the chart's ServiceAccount, so the real authorizer judges every call
with exactly the RBAC that `helm template` renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube import pods as kubelet
from tests.kube.client import resource_path
from tests.kube.cluster import Identity, RealCluster, chart_rbac
from tests.kube.operator_process import OPERATOR, OperatorProcess
from tests.kube.semantics import FINETUNEJOBS
from tests.test_chart import CHART_DIR, render
from tests.test_operator import Job


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


@contextlib.asynccontextmanager
async def operator_process(
    identity: Identity, namespace: str | None, log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[OperatorProcess]:
    """Runs the operator (on one namespace, or all when None) until the block exits, then stops it
    with SIGTERM."""
    scope = f"--namespace={namespace}" if namespace else "--all-namespaces"
    flags = ["--default-image=registry.example/trainer:9", "--resync-seconds=1"]
    operator = OperatorProcess(identity.kubeconfig, scope, log, args=flags, env=env)
    try:
        yield operator
    finally:
        await asyncio.to_thread(operator.stop)


@pytest.mark.asyncio
async def test_operator_process_serves_jobs_liveness_metrics_and_json_logs(
    control_plane: RealCluster, operator_identity: Identity, namespace: str, tmp_path: Path
) -> None:
    job = Job(control_plane.admin, namespace)
    async with operator_process(operator_identity, namespace, tmp_path / "operator.log") as operator:
        job.create()
        pods = await job.gang()
        assert pods[0]["spec"]["containers"][0]["image"] == "registry.example/trainer:9"

        url = f"http://127.0.0.1:{operator.liveness}/healthz"
        health = await job.kube.wait_for(lambda: asyncio.to_thread(_get, url), timeout=10)
        assert health[0] == 200
        await job.phase("Pending")
        status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{operator.metrics}/metrics")
        assert status == 200
        assert 'finetune_jobs{phase="Pending"} 1.0' in text
        assert "finetune_time_to_all_workers_running_seconds_bucket" in text
    assert operator.process.returncode in (0, -signal.SIGTERM)
    lines = operator.lines()
    assert lines and all(json.loads(line)["message"] is not None for line in lines)
    assert "Traceback" not in "\n".join(lines)
    assert operator_identity.token not in operator.log.read_text()


@pytest.mark.asyncio
async def test_cluster_wide_operator_with_the_charts_default_rbac(
    control_plane: RealCluster, namespace: str, tmp_path: Path
) -> None:
    """The chart's default: one ClusterRole, every namespace watched (another release, so that its
    ServiceAccount and grants stay apart from the namespaced ones of the other tests)."""
    identity = control_plane.grant("cluster-wide", chart_rbac(render(release="cw")))
    job = Job(control_plane.admin, namespace)
    async with operator_process(identity, None, tmp_path / "operator.log") as operator:
        job.create()
        job.run_all(await job.gang())
        await job.phase("Running")
    assert operator.process.returncode in (0, -signal.SIGTERM)
    lines = operator.lines()
    assert "Traceback" not in "\n".join(lines)
    # Other tests' jobs in namespaces being deleted are this operator's too: judge only this job.
    ours = [json.loads(line) for line in lines if f'"namespace": "{namespace}"' in line]
    assert ours and not [entry for entry in ours if entry["severity"] in ("error", "critical")]


@pytest.mark.asyncio
async def test_without_node_access_the_operator_reads_no_nodes(
    control_plane: RealCluster, namespace: str, tmp_path: Path
) -> None:
    """`gpuMemoryFromNodes: false`: no grant on nodes, and the operator, told so by the chart's variable,
    watches none (kopf would retry a forbidden list of nodes and never run a job)."""
    rendered = render({"watchNamespaces": [namespace], "gpuMemoryFromNodes": False}, release="no-nodes")
    assert "nodes" not in str([o["rules"] for o in rendered if o["kind"] in ("Role", "ClusterRole")])
    identity = control_plane.grant("no-nodes", chart_rbac(rendered))
    [deployment] = [o for o in rendered if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    variable = {
        e["name"]: e["value"] for e in container["env"] if e["name"] == "FINETUNE_GPU_MEMORY_FROM_NODES"
    }
    assert variable == {"FINETUNE_GPU_MEMORY_FROM_NODES": "false"}
    job = Job(control_plane.admin, namespace)
    async with operator_process(identity, namespace, tmp_path / "operator.log", variable) as operator:
        job.create()
        await job.gang()
    assert "forbidden" not in operator.log.read_text().lower()  # kopf logs each refused list of nodes


@pytest.mark.asyncio
async def test_operator_killed_mid_run_and_restarted_converges_without_duplicates(
    control_plane: RealCluster, operator_identity: Identity, namespace: str, tmp_path: Path
) -> None:
    """SIGKILL, as when its node dies: no cleanup ran; the next process picks the job up from the API."""
    job = Job(control_plane.admin, namespace)
    log = tmp_path / "operator.log"
    async with operator_process(operator_identity, namespace, log) as first:
        job.create()
        pods = await job.gang()
        job.run_all(pods)
        await job.phase("Running")
        first.process.kill()
    assert first.process.returncode == -signal.SIGKILL
    kubelet.terminate(job.kube, pods[1], 1)  # while no operator runs, a worker dies
    async with operator_process(operator_identity, namespace, log):
        second = await job.gang(attempt=1)
        assert job.status()["restarts"] == 1
        job.run_all(second)
        await job.phase("Running")
        await asyncio.sleep(3)  # several resyncs of the new process change nothing
        assert job.status()["restarts"] == 1
        assert [p["metadata"]["name"] for p in job.pods()] == ["llm-worker-0", "llm-worker-1"]
        assert len(job.kube.list_objects("v1/services", namespace)) == 1
        assert [c["metadata"]["name"] for c in job.kube.list_objects("v1/configmaps", namespace)] == [
            "llm-config"
        ]
        assert job.event_reasons().count("GangRestart") == 1
        assert job.kube.get_object(FINETUNEJOBS, namespace, "llm") is not None


@pytest.mark.asyncio
async def test_two_peered_replicas_run_one_operator_and_the_other_takes_over(
    control_plane: RealCluster, namespace: str, tmp_path: Path
) -> None:
    """The chart with `replicas: 2`: its KopfPeering, its peering grants and the replicas' settings."""
    rendered = render({"replicas": 2, "watchNamespaces": [namespace]}, release="ha")
    control_plane.kubectl("apply", "--server-side", "-f", str(CHART_DIR / "crds" / "kopf-peering.yaml"))
    control_plane.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev")
    control_plane.apply([o for o in rendered if o["kind"] == "KopfPeering"])
    identity = control_plane.grant("peered", chart_rbac(rendered))
    [deployment] = [o for o in rendered if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    chart_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    peering = {k: v for k, v in chart_env.items() if k in ("FINETUNE_PEERING", "FINETUNE_PRIORITY")}
    assert peering["FINETUNE_PRIORITY"] == "random"
    job = Job(control_plane.admin, namespace)
    async with (
        operator_process(identity, namespace, tmp_path / "a.log", {**peering, "POD_ID": "peer-a"}) as a,
        operator_process(identity, namespace, tmp_path / "b.log", {**peering, "POD_ID": "peer-b"}) as b,
    ):
        path = resource_path("kopf.dev/v1/kopfpeerings", namespace, peering["FINETUNE_PEERING"])

        def peers() -> dict[str, Any]:
            body = job.kube.request("GET", path) or {}
            return {k: v for k, v in (body.get("status") or {}).items() if k in ("peer-a", "peer-b")}

        known = await job.kube.wait_for(lambda: len(peers()) == 2 and peers(), 30, "both replicas peered")
        job.create()
        pods = await job.gang()
        job.run_all(pods)
        await job.phase("Running")
        active = max(known, key=lambda peer: known[peer]["priority"])
        leaving, staying = (a, b) if active == "peer-a" else (b, a)
        await job.kube.wait_for(lambda: "Running" in job.event_reasons(), 10, "the Running event")
        assert job.event_reasons().count("Running") == 1  # one operator acted, not two
        assert "Handler" not in staying.log.read_text()  # the other replica stays paused, silent
        leaving.process.send_signal(signal.SIGTERM)  # a rolling update: the active replica goes first
        await asyncio.to_thread(leaving.process.wait, 20)
        kubelet.terminate(job.kube, pods[1], 1)  # only the replica that stays can restart the gang
        job.run_all(await job.gang(attempt=1))
        await job.phase("Running")
        assert job.status()["restarts"] == 1 and staying.process.poll() is None
        assert "Resuming operations" in staying.log.read_text()
    for replica in (a, b):
        assert "Traceback" not in replica.log.read_text()


def test_help_lists_the_settings() -> None:
    result = subprocess.run([OPERATOR, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--namespace", "--all-namespaces", "--default-image", "--peering", "--liveness-port"):
        assert flag in result.stdout


def test_a_bad_boolean_in_the_environment_is_a_usage_error_naming_its_flag() -> None:
    result = subprocess.run(
        [OPERATOR],  # parsed before any connection: no cluster needed
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FINETUNE_GPU_MEMORY_FROM_NODES": "yes please"},
    )
    assert result.returncode == 2
    assert "--gpu-memory-from-nodes/--no-gpu-memory-from-nodes: 'yes please': expected true or false" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr

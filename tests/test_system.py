"""The whole system on one machine: the real operator, the real trainer, nothing played by hand.

The operator (kopf, in-process, as the chart's ServiceAccount) runs against the real control plane;
the scheduler binds the workers to the process kubelet's node (tainted: only these jobs tolerate
it) and the process kubelet (tests/kube/process_kubelet.py) runs them as local processes (two
nodes are two launchers of one CPU rank each, meeting at worker 0's torchrun store on 127.0.0.1).
The pods share the host's network, so every run gives the operator free rendezvous and progress
ports (its --rendezvous-port and --progress-port settings) and two runs on one machine never meet.
The trainer reads and writes a moto S3 server on loopback, with credentials from a Secret as a
cluster gives them. Each scenario checks what a user would see: the job's status, its events,
the trainer's logs and what lands in S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from finetune_operator.controller.handlers import registry
from finetune_operator.controller.kube import KubeApi
from finetune_operator.controller.manifests import WorkerSettings
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.progress import ProgressPoller
from finetune_operator.controller.runner import operator_memo
from finetune_trainer.summary import STOPPED_EXIT_CODE, parse_termination_message
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.kube.client import KubeClient
from tests.kube.cluster import PROCESS_NODE, Identity, RealCluster
from tests.kube.controlplane import free_ports
from tests.kube.fixtures import OperatorRun, running_operator
from tests.kube.nodes import PROCESS_TAINT
from tests.kube.process_kubelet import ProcessKubelet
from tests.kube.semantics import FINETUNEJOBS
from tests.manifests import minimal_manifest
from tests.s3server import REGION, s3_server
from tests.trainer_runs import s3_client, seed_store

pytestmark = [pytest.mark.asyncio, pytest.mark.system]

BUCKET = "system"  # moto's state is process-wide: a bucket of its own
GRACE_SECONDS = 30  # the pods' terminationGracePeriodSeconds: ample for a tiny checkpoint
RUN_TIMEOUT = 300.0  # a bound, not a measurement: ample when the other core is busy


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A loopback S3 endpoint with the tiny model and chat data; the local copy of the base model."""
    workdir = tmp_path_factory.mktemp("store")
    with s3_server() as server:
        seed_store(server.endpoint, workdir, BUCKET)
        yield server.endpoint, workdir / "tiny-model"


def manifest(name: str, endpoint: str, max_steps: int, every: int) -> dict[str, Any]:
    """A 2-node LoRA job on CPU: fp32, short sequences, evaluation and checkpoints every ``every`` steps."""
    return minimal_manifest(
        name,
        None,
        model={"uri": f"s3://{BUCKET}/models/tiny/"},
        dataset={"train": f"s3://{BUCKET}/data/chat.jsonl", "evalSplit": 0.25, "maxSeqLength": 64},
        method={"type": "lora"},
        hyperparameters={
            "maxSteps": max_steps,
            "batchSizePerDevice": 4,
            "learningRate": 3e-3,
            "precision": "fp32",
        },
        evaluation={"everySteps": every},
        resources={
            "nodes": 2,
            "gpusPerNode": 0,
            "nodeSelector": {"finetune.dev/test-kubelet": "process"},
            "tolerations": [{**PROCESS_TAINT, "operator": "Equal"}],
        },
        storage={"endpoint": endpoint, "region": REGION, "credentialsSecret": "s3-creds"},
        output={"uri": f"s3://{BUCKET}/out/{name}/", "checkpointEverySteps": every},
    )


class System(NamedTuple):
    kube: KubeClient
    kubelet: ProcessKubelet
    operator: OperatorRun
    namespace: str
    settings: WorkerSettings


Running = Callable[[], contextlib.AbstractAsyncContextManager[System]]


@pytest.fixture
def system(
    control_plane: RealCluster, operator_identity: Identity, namespace: str, tmp_path: Path
) -> Running:
    """API, operator and kubelet; on the way out, every process the pods started must be gone."""

    @contextlib.asynccontextmanager
    async def running() -> AsyncIterator[System]:
        kube = control_plane.admin
        secret = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        kube.create_object("v1/secrets", {"metadata": {"name": "s3-creds"}, "stringData": secret}, namespace)
        rendezvous, progress = free_ports(2)
        settings = WorkerSettings(
            default_image="trainer:test",
            termination_grace_seconds=GRACE_SECONDS,
            rendezvous_port=rendezvous,
            progress_port=progress,
        )
        poller = ProgressPoller(interval=1.0, port=settings.progress_port)  # worker 0's, at 127.0.0.1
        api = KubeApi(operator_identity.api_client())
        memo = operator_memo(api, settings, OperatorMetrics(), poller, resync_seconds=0.5)
        connection = operator_identity.connection(control_plane.url, control_plane.ca_path)
        async with running_operator(connection, registry, namespaces=[namespace], memo=memo) as operator:
            async with ProcessKubelet(kube, tmp_path / "pods", namespace, node=PROCESS_NODE) as kubelet:
                yield System(kube, kubelet, operator, namespace, settings)
            assert kubelet.alive() == [], "processes survived the kubelet"

    return running


def status(system: System, name: str) -> dict[str, Any]:
    return (system.kube.get_object(FINETUNEJOBS, system.namespace, name) or {}).get("status") or {}


async def phase(system: System, name: str, expected: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    try:
        await system.kube.wait_for(
            lambda: status(system, name).get("phase") == expected, timeout, f"{name} {expected}"
        )
    except AssertionError as error:
        raise AssertionError(f"{error}; status {status(system, name)}\n{logs(system.kubelet)}") from None
    return status(system, name)


def logs(kubelet: ProcessKubelet) -> str:
    """The tail of every pod's log, for failure messages."""
    return "\n".join(f"--- {p.directory.name}\n{p.log()[-2500:]}" for p in kubelet.pods.values())


def event_reasons(system: System, name: str) -> list[str]:
    return [e.get("reason") for e in system.kube.events_for(name, system.namespace)]


@contextlib.asynccontextmanager
async def recorded(system: System, name: str) -> AsyncIterator[list[dict[str, Any]]]:
    """The job's status each time its phase or progress changed, sampled far faster than they change."""
    samples: list[dict[str, Any]] = []

    def sample() -> None:
        now = status(system, name)
        if not samples or (samples[-1].get("phase"), samples[-1].get("progress")) != (
            now.get("phase"),
            now.get("progress"),
        ):
            samples.append(now)

    async def keep_sampling() -> None:
        while True:
            sample()
            await asyncio.sleep(0.01)

    task = asyncio.create_task(keep_sampling())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sample()  # the status the block ended on


def keys(endpoint: str, prefix: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def complete_checkpoints(endpoint: str, output: str) -> list[int]:
    """Steps of the checkpoints under ``output`` whose manifest (written last) exists."""
    manifests = [k for k in keys(endpoint, f"{output}checkpoints/") if k.endswith("/manifest.json")]
    return sorted(int(k.split("/")[-2].removeprefix("step-")) for k in manifests)


async def first_checkpoint(endpoint: str, output: str, kubelet: ProcessKubelet) -> int:
    """Waits (without blocking the event loop the API and the kubelet run in) for a complete checkpoint."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        if done := await asyncio.to_thread(complete_checkpoints, endpoint, output):
            return done[-1]
        await asyncio.sleep(0.3)
    raise AssertionError(f"no complete checkpoint under {output}\n{logs(kubelet)}")


def dedupe(values: list[str]) -> list[str]:
    """The values without repeats and blanks (the status before the operator's first pass)."""
    return [v for i, v in enumerate(values) if v and (i == 0 or values[i - 1] != v)]


async def test_two_node_lora_job_runs_to_a_loadable_adapter(
    store: tuple[str, Path], system: Running, tmp_path: Path
) -> None:
    endpoint, base_model = store
    async with system() as cluster, recorded(cluster, "lora") as samples:
        cluster.kube.create_object(
            FINETUNEJOBS, manifest("lora", endpoint, max_steps=400, every=100), cluster.namespace
        )
        done = await phase(cluster, "lora", "Succeeded")
        workers = [cluster.kubelet.instances(f"lora-worker-{rank}") for rank in (0, 1)]
        worker_zero = cluster.kube.get_object("v1/pods", cluster.namespace, "lora-worker-0") or {}
    phases = dedupe([s.get("phase", "") for s in samples])
    assert phases == ["Pending", "Initializing", "Running", "Succeeded"], phases
    assert event_reasons(cluster, "lora") == ["Pending", "Initializing", "Running", "Succeeded"]
    assert [[p.exit_code for p in w] for w in workers] == [[0], [0]]
    # The run's own ports, not the fixed defaults: another run on this machine cannot meet this one.
    [container] = worker_zero["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = (int(env["MASTER_PORT"]), container["readinessProbe"]["httpGet"]["port"])
    assert ports == (cluster.settings.rendezvous_port, cluster.settings.progress_port) != (29500, 29600)

    # While it runs, the operator copies worker 0's /progress into the status.
    running = [s for s in samples if s.get("phase") == "Running" and s.get("progress")]
    steps = [s["progress"]["step"] for s in running]
    assert len(set(steps)) >= 2 and steps == sorted(steps), f"progress while Running: {steps}"
    assert {s["progress"]["totalSteps"] for s in running} == {400}
    assert any(0 < s["progress"]["percent"] < 100 and "trainLoss" in s["metrics"] for s in running)
    assert done["progress"]["step"] == 400 and done["progress"]["percent"] == 100
    assert done["outputModel"] == f"s3://{BUCKET}/out/lora/model/"
    assert done["metrics"]["evalLoss"] > 0 and "trainLoss" in done["metrics"]

    client, adapter = s3_client(endpoint), tmp_path / "adapter"
    for key in keys(endpoint, "out/lora/model/"):
        target = adapter / key.removeprefix("out/lora/model/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter)
    inputs = tokenizer("What is the capital of France?", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


async def test_killed_worker_restarts_the_gang_from_the_newest_checkpoint(
    store: tuple[str, Path], system: Running
) -> None:
    endpoint, _ = store
    output = f"s3://{BUCKET}/out/killed/"
    async with system() as cluster:
        kube, kubelet = cluster.kube, cluster.kubelet
        kube.create_object(
            FINETUNEJOBS, manifest("killed", endpoint, max_steps=300, every=50), cluster.namespace
        )
        saved = await first_checkpoint(endpoint, "out/killed/", kubelet)
        kubelet.kill_worker("killed-worker-1")
        await kube.wait_for(
            lambda: len(kubelet.instances("killed-worker-0")) == 2, RUN_TIMEOUT, "the second attempt"
        )
        # The first attempt is gone (its pods are deleted only once their processes are): nothing
        # else can complete a checkpoint before the second attempt resumes.
        newest = (await asyncio.to_thread(complete_checkpoints, endpoint, "out/killed/"))[-1]
        done = await phase(cluster, "killed", "Succeeded")
        first, second = kubelet.instances("killed-worker-0")
        killed = kubelet.instances("killed-worker-1")[0]
    assert killed.exit_code == 137 and newest >= saved
    assert done["restarts"] == 1 and event_reasons(cluster, "killed").count("GangRestart") == 1
    assert f"resumed from {output}checkpoints/step-{newest}/" in second.log(), second.log()[-3000:]
    assert "resumed from" not in first.log()


async def test_suspend_stops_the_workers_after_a_checkpoint_and_resume_continues(
    store: tuple[str, Path], system: Running
) -> None:
    endpoint, _ = store
    output = f"s3://{BUCKET}/out/paused/"
    async with system() as cluster:
        kube, kubelet, ns = cluster.kube, cluster.kubelet, cluster.namespace
        kube.create_object(FINETUNEJOBS, manifest("paused", endpoint, max_steps=300, every=50), ns)
        await first_checkpoint(endpoint, "out/paused/", kubelet)
        kube.patch_object(FINETUNEJOBS, ns, "paused", {"spec": {"runPolicy": {"suspend": True}}})
        await phase(cluster, "paused", "Suspended", timeout=10)
        # Resume at once, while the suspended workers are still saving their checkpoint: the operator
        # must wait for them to stop rather than take them for failures of the resumed job.
        kube.patch_object(FINETUNEJOBS, ns, "paused", {"spec": {"runPolicy": {"suspend": False}}})
        done = await phase(cluster, "paused", "Succeeded")
        stopped = [kubelet.instances(f"paused-worker-{rank}")[0] for rank in (0, 1)]
        assert [p.exit_code for p in stopped] == [STOPPED_EXIT_CODE] * 2, logs(kubelet)
        summary = parse_termination_message(stopped[0].message)
        assert summary is not None and summary.outcome == "stopped" and summary.step
        resumed = kubelet.instances("paused-worker-0")[-1]
    assert done["restarts"] == 0, [(e["reason"], e["message"]) for e in kube.events_for("paused", ns)]
    assert {"Suspended", "Resumed"} <= set(event_reasons(cluster, "paused"))
    assert f"resumed from {output}checkpoints/step-{summary.step}/" in resumed.log(), resumed.log()[-3000:]

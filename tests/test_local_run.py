"""`finetune run` and `finetune demo`: the same FinetuneJob on this machine, with a folder as the store."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.controller.manifests import WorkerSettings, build_worker_pod
from finetune_operator.local.demo import demo_manifest, prepare
from finetune_operator.local.run import (
    AttemptOutcome,
    LocalRunError,
    local_environment,
    plan_local_run,
    progress_line,
    supervise,
)
from finetune_trainer import worker_env
from finetune_trainer.config import FolderStorageConfig, S3StorageConfig
from finetune_trainer.launch import torchrun_argv
from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, STOPPED_EXIT_CODE

from tests.manifests import minimal_manifest

FINETUNE = str(Path(sys.executable).parent / "finetune")


def _status_block(output: str) -> dict[str, Any]:
    block = output[output.rindex("\nstatus:\n") :].strip().split("\n\n")[0]
    return yaml.safe_load(block)["status"]


@pytest.mark.system
def test_demo_fine_tunes_a_tiny_model_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [FINETUNE, "demo", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    outputs = tmp_path / "s3" / "outputs" / "capitals-lora"
    for name in (
        "model/adapter_model.safetensors",
        "model/adapter_config.json",
        "metrics.json",
        "loss.png",
        "README.md",
        "config.json",
    ):
        assert (outputs / name).is_file(), name
    assert (outputs / "loss.png").read_bytes().startswith(b"\x89PNG")
    status = _status_block(result.stdout)
    assert status["phase"] == "Succeeded"
    assert status["outputModel"] == "s3://outputs/capitals-lora/model/"
    assert {"evalLoss", "trainLoss"} <= status["metrics"].keys()
    assert status["progress"]["percent"] == 100
    history = json.loads((outputs / "metrics.json").read_text())["history"]
    losses = [e["trainLoss"] for e in history if "trainLoss" in e]
    assert losses[-1] < losses[0]
    assert "step " in result.stdout  # plain progress lines when not on a terminal
    assert f"loss curve:           {outputs / 'loss.png'}" in result.stdout
    assert "> What is the capital of France?" in result.stdout


@pytest.mark.system
def test_run_reports_a_non_retryable_failure_as_the_operator_would(tmp_path: Path) -> None:
    prepare(tmp_path)
    (tmp_path / "s3" / "datasets" / "capitals" / "train.jsonl").write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" for _ in range(20))
    )
    manifest = tmp_path / "finetunejob.yaml"
    result = subprocess.run(
        [FINETUNE, "run", str(manifest), "--store", str(tmp_path / "s3")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == NON_RETRYABLE_EXIT_CODE
    status = _status_block(result.stdout)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NonRetryableError" and "no assistant turn" in failed["message"]


def test_run_refuses_an_invalid_manifest_with_the_validation_errors(tmp_path: Path) -> None:
    manifest = demo_manifest()
    manifest["spec"]["resources"]["nodes"] = 0
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = subprocess.run([FINETUNE, "run", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "spec.resources.nodes: got 0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("resources", "method", "gpus_here", "expected"),
    [
        pytest.param({"nodes": 2, "gpusPerNode": 0}, "lora", 0, (2, False, "fp32"), id="cpu-job"),
        pytest.param({"nodes": 2, "gpusPerNode": 4}, "lora", 0, (8, False, "fp32"), id="gpu-job-on-cpu"),
        pytest.param({"nodes": 1, "gpusPerNode": 2}, "full", 2, (2, True, "bf16"), id="gpu-job-on-gpus"),
        pytest.param({"nodes": 2, "gpusPerNode": 2}, "lora", 2, "needs 4 GPUs", id="too-few-gpus"),
        pytest.param({"nodes": 1, "gpusPerNode": 1}, "qlora", 0, "qlora needs GPUs", id="qlora-on-cpu"),
    ],
)
def test_local_plan(resources: dict[str, int], method: str, gpus_here: int, expected: Any) -> None:
    job = parse_finetune_job(minimal_manifest(resources=resources, method={"type": method}))
    if isinstance(expected, str):
        with pytest.raises(LocalRunError, match=expected):
            plan_local_run(job, gpus_here, None, 1234)
        return
    plan = plan_local_run(job, gpus_here, Path("store"), 1234)
    assert (plan.ranks, plan.config.distributed.uses_gpus, plan.config.hyperparameters.precision) == expected
    assert plan.config.storage == FolderStorageConfig(kind="folder", root=str(Path("store").resolve()))
    assert plan.config.reporting.progress_port == 1234
    assert bool(plan.notes) is (gpus_here == 0)  # says it runs on CPU, in fp32


def test_without_a_store_folder_the_specs_own_s3_is_used() -> None:
    job = parse_finetune_job(minimal_manifest(storage={"endpoint": "http://minio:9000", "region": "eu-1"}))
    plan = plan_local_run(job, 0, None, 1234)
    assert plan.config.storage == S3StorageConfig(endpoint="http://minio:9000", region="eu-1")


def test_run_names_a_missing_store_folder_and_the_old_flag_still_works(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(demo_manifest()))
    missing = tmp_path / "no-store"
    for flag in ("--store", "--embedded-s3"):
        result = subprocess.run(
            [FINETUNE, "run", str(path), flag, str(missing)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1, result.stderr
        assert f"finetune run: --store {missing}: no such folder" in result.stderr
        assert "Traceback" not in result.stderr
        deprecated = "finetune run: --embedded-s3 is deprecated" in result.stderr
        assert deprecated is (flag == "--embedded-s3")


def test_progress_line() -> None:
    line = progress_line(
        {"step": 12, "totalSteps": 48, "trainLoss": 2.3456, "tokensPerSecond": 3400.4, "etaSeconds": 95}
    )
    assert line == "step 12/48 [######..................] loss 2.3456 tok/s 3,400 ETA 1:35"


def test_the_pods_and_the_local_ranks_get_the_same_worker_environment(tmp_path: Path) -> None:
    manifest = minimal_manifest(resources={"nodes": 2, "gpusPerNode": 0}, storage={"credentialsSecret": "s3"})
    job = parse_finetune_job(manifest)
    pod = build_worker_pod(job, "uid", 1, 0, WorkerSettings(default_image="trainer:1"))
    in_pod = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    pod_only = {worker_env.POD_NAME, *worker_env.CREDENTIALS, *worker_env.OPTIONAL_CREDENTIALS}
    pod_only |= worker_env.SCRATCH_DIRS.keys()
    local = local_environment(plan_local_run(job, 0, None, 1234), tmp_path, 4321)
    assert len(in_pod) == len(set(in_pod))
    assert set(in_pod) - pod_only == local.keys()
    assert set(worker_env.REQUIRED) <= local.keys()
    assert torchrun_argv(local)[-1] == str(tmp_path / "config.json")


def _failure(code: int, interrupted: bool = False) -> AttemptOutcome:
    return AttemptOutcome(code, json.dumps({"outcome": "failed", "error": "boom"}), interrupted=interrupted)


# Attempt outcomes in order, backoffLimit -> (phase, restarts, Failed reason); every outcome is used.
SUPERVISION_CASES = [
    pytest.param([AttemptOutcome(0)], 3, ("Succeeded", 0, None), id="first-attempt-succeeds"),
    pytest.param([_failure(1), AttemptOutcome(0)], 3, ("Succeeded", 1, None), id="restart-then-succeed"),
    pytest.param([_failure(1)] * 3, 2, ("Failed", 2, "BackoffLimitExceeded"), id="backoff-limit-spent"),
    pytest.param([_failure(1)], 0, ("Failed", 0, "BackoffLimitExceeded"), id="no-restarts-allowed"),
    pytest.param(
        [_failure(1), _failure(NON_RETRYABLE_EXIT_CODE)],
        3,
        ("Failed", 1, "NonRetryableError"),
        id="non-retryable",
    ),
    pytest.param(
        [_failure(STOPPED_EXIT_CODE), AttemptOutcome(0)], 3, ("Succeeded", 1, None), id="stopped-resumes"
    ),
    pytest.param(
        [_failure(STOPPED_EXIT_CODE, interrupted=True)], 3, ("Failed", 1, None), id="stopped-by-the-user"
    ),
]


@pytest.mark.parametrize(("outcomes", "backoff_limit", "expected"), SUPERVISION_CASES)
def test_restarts_follow_the_operators_state_machine(
    outcomes: list[AttemptOutcome], backoff_limit: int, expected: tuple[str, int, str | None]
) -> None:
    job = parse_finetune_job(minimal_manifest(runPolicy={"backoffLimit": backoff_limit}))
    remaining: Iterator[AttemptOutcome] = iter(outcomes)
    out = io.StringIO()
    now = datetime(2025, 1, 1, tzinfo=UTC)
    last, status = supervise(job, lambda: next(remaining), out, clock=lambda: now)
    assert next(remaining, None) is None and last is outcomes[-1]
    failed = next((c["reason"] for c in status.get("conditions", []) if c["type"] == "Failed"), None)
    assert (status["phase"], status.get("restarts", 0), failed) == expected
    assert out.getvalue().count("restarting from the newest checkpoint") == len(outcomes) - 1

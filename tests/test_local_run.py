"""`finetune run`: the same FinetuneJob on this machine, with a folder as the store (the tiny model; `finetune
demo` on the real model is in test_real_model.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.controller.manifests import WorkerSettings, build_worker_pod
from finetune_operator.local.run import (
    AttemptOutcome,
    LocalRunError,
    ProcessTree,
    StopRequest,
    failure_report,
    local_environment,
    log_tail,
    plan_local_run,
    progress_line,
    supervise,
    without_torchrun,
)
from finetune_trainer import deepspeed_config, worker_env
from finetune_trainer.config import FolderStorageConfig, S3StorageConfig
from finetune_trainer.launch import torchrun_argv
from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, STOPPED_EXIT_CODE

from tests.manifests import minimal_manifest
from tests.tiny_job import prepare_tiny, tiny_manifest

FINETUNE = str(Path(sys.executable).parent / "finetune")


def _status_block(output: str) -> dict[str, Any]:
    block = output[output.rindex("\nstatus:\n") :].strip().split("\n\n")[0]
    return yaml.safe_load(block)["status"]


@pytest.mark.system
def test_run_fine_tunes_a_tiny_model_end_to_end(tmp_path: Path) -> None:
    manifest = prepare_tiny(tmp_path)
    result = subprocess.run(
        [FINETUNE, "run", str(manifest), "--store", str(tmp_path / "s3")],
        capture_output=True,
        text=True,
        timeout=600,
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


def _no_assistant_turns(train: Path) -> None:
    train.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" for _ in range(20))
    )


@pytest.mark.system
@pytest.mark.parametrize(
    ("spoil", "said"),
    [
        pytest.param(_no_assistant_turns, "no assistant turn", id="unusable-rows"),
        pytest.param(Path.unlink, "s3://datasets/capitals/train.jsonl", id="missing-training-file"),
    ],
)
def test_run_reports_a_non_retryable_failure_in_the_trainers_words(
    spoil: Callable[[Path], None], said: str, tmp_path: Path
) -> None:
    prepare_tiny(tmp_path)
    spoil(tmp_path / "s3" / "datasets" / "capitals" / "train.jsonl")
    manifest = tmp_path / "finetunejob.yaml"
    result = subprocess.run(
        [FINETUNE, "run", str(manifest), "--store", str(tmp_path / "s3")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == NON_RETRYABLE_EXIT_CODE, output[-3000:]
    status = _status_block(result.stdout)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NonRetryableError" and said in failed["message"]
    # The trainer's own message and where the whole log is; torchrun's report stays in the log.
    error = next(line for line in result.stdout.splitlines() if line.startswith("the trainer's error"))
    assert said in error
    log = Path(next(line for line in result.stdout.splitlines() if line.startswith("full log: "))[10:])
    assert said in log.read_text()
    assert "ChildFailedError" not in output and "Traceback" not in output and "restarting" not in output


def test_run_refuses_an_invalid_manifest_with_the_validation_errors(tmp_path: Path) -> None:
    manifest = tiny_manifest()
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
def test_local_plan(
    resources: dict[str, int], method: str, gpus_here: int, expected: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deepspeed_config, "cpu_has_fast_bf16", lambda: False)
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


@pytest.mark.parametrize(
    ("fast", "asked", "expected", "note"),
    [
        pytest.param(True, "bf16", "bf16", "precision bf16 on CPU: it multiplies", id="bf16-fast"),
        pytest.param(False, "bf16", "fp32", "precision bf16 -> fp32: this CPU has no", id="bf16-slow"),
        pytest.param(True, "fp16", "bf16", "precision fp16 -> bf16: fp16 is slow on CPUs", id="fp16-fast"),
        pytest.param(False, "fp16", "fp32", "precision fp16 -> fp32: this CPU has no", id="fp16-slow"),
        pytest.param(True, "fp32", "fp32", None, id="fp32"),
    ],
)
def test_cpu_precision_follows_the_cpu(
    fast: bool, asked: str, expected: str, note: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deepspeed_config, "cpu_has_fast_bf16", lambda: fast)
    resources = {"nodes": 1, "gpusPerNode": 0}
    manifest = minimal_manifest(resources=resources, hyperparameters={"precision": asked})
    plan = plan_local_run(parse_finetune_job(manifest), 0, None, 1234)
    assert plan.config.hyperparameters.precision == expected
    said = [n for n in plan.notes if n.startswith("precision")]
    assert len(said) == (note is not None) and all(n.startswith(note or "") for n in said), plan.notes


def test_without_a_store_folder_the_specs_own_s3_is_used() -> None:
    job = parse_finetune_job(minimal_manifest(storage={"endpoint": "http://minio:9000", "region": "eu-1"}))
    plan = plan_local_run(job, 0, None, 1234)
    assert plan.config.storage == S3StorageConfig(endpoint="http://minio:9000", region="eu-1")


def test_run_names_a_missing_store_folder_and_the_old_flag_still_works(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_manifest()))
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


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        pytest.param(
            {
                "evalMetrics": {"evalLoss": 1.1, "answerAccuracy": 0.625},
                "baseMetrics": {"answerAccuracy": 0.05},
            },
            "loss 2.3456 answer acc 0.050 -> 0.625 tok/s",
            id="base-and-now",
        ),
        pytest.param(
            {"evalMetrics": {"answerAccuracy": 0.625}}, "loss 2.3456 answer acc 0.625 tok/s", id="now"
        ),
        pytest.param({"evalMetrics": {"answerAccuracy": "high"}}, "loss 2.3456 tok/s", id="not-a-number"),
        pytest.param({"baseMetrics": {"answerAccuracy": 0.05}}, "loss 2.3456 tok/s", id="base-only"),
    ],
)
def test_progress_line_shows_answer_accuracy_when_reported(metrics: dict[str, Any], expected: str) -> None:
    document = {"step": 12, "totalSteps": 48, "trainLoss": 2.3456, "tokensPerSecond": 3400.4, **metrics}
    assert expected in progress_line(document)


BASE_METRICS = {"evalLoss": 2.75, "answerAccuracy": 0.05}
TRAINING = {
    "state": "training",
    "step": 40,
    "totalSteps": 40,
    "trainLoss": 0.9,
    "evalMetrics": {"evalLoss": 1.1, "answerAccuracy": 0.625},
    "baseMetrics": BASE_METRICS,
}


def test_the_status_block_shows_the_base_metrics_beside_the_final_ones() -> None:
    job = parse_finetune_job(minimal_manifest(name="qa"))
    summary = {
        "outcome": "succeeded",
        "outputModel": "s3://out/qa/model/",
        "metrics": {"answerAccuracy": 0.75},
    }
    outcome = AttemptOutcome(0, json.dumps(summary), TRAINING)
    now = datetime(2025, 1, 1, tzinfo=UTC)
    _, status = supervise(job, lambda: outcome, io.StringIO(), clock=lambda: now)
    assert status["phase"] == "Succeeded" and status["outputModel"] == "s3://out/qa/model/"
    assert status["baseMetrics"] == BASE_METRICS
    assert status["metrics"] == {"evalLoss": 1.1, "answerAccuracy": 0.75, "trainLoss": 0.9}


def test_a_run_the_eval_gate_rejected_fails_without_an_output_model() -> None:
    job = parse_finetune_job(minimal_manifest(name="qa"))
    summary = {
        "outcome": "failed",
        "retryable": False,
        "reason": "EvalGateNotMet",
        "error": "eval gate not met: answerAccuracy 0.625 < 0.8 (spec.evaluation.gate.min)",
        "metrics": {"answerAccuracy": 0.625},
        "outputModel": "s3://out/qa/rejected/",
    }
    outcome = AttemptOutcome(NON_RETRYABLE_EXIT_CODE, json.dumps(summary), TRAINING)
    now = datetime(2025, 1, 1, tzinfo=UTC)
    out = io.StringIO()
    _, status = supervise(job, lambda: outcome, out, clock=lambda: now)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["phase"], failed["reason"], status.get("restarts", 0)) == ("Failed", "EvalGateNotMet", 0)
    assert "answerAccuracy 0.625 < 0.8" in failed["message"]
    assert "the rejected model is at s3://out/qa/rejected/" in status["message"]
    assert "outputModel" not in status
    assert status["baseMetrics"] == BASE_METRICS and status["metrics"]["answerAccuracy"] == 0.625
    assert "restarting" not in out.getvalue()


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


def _failure(code: int, stopped_by: str | None = None) -> AttemptOutcome:
    return AttemptOutcome(code, json.dumps({"outcome": "failed", "error": "boom"}), stopped_by=stopped_by)


def _stopped(stopped_by: str, code: int = STOPPED_EXIT_CODE) -> AttemptOutcome:
    return AttemptOutcome(code, json.dumps({"outcome": "stopped", "step": 12}), stopped_by=stopped_by)


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
    # A stop by the user is never restarted and never a failure (the state machine is not asked) ...
    pytest.param([_stopped("SIGINT")], 3, ("Suspended", 0, None), id="stopped-by-the-user"),
    pytest.param([_failure(1), _stopped("SIGTERM")], 3, ("Suspended", 1, None), id="stopped-after-a-restart"),
    pytest.param([_failure(-9, "SIGINT")], 3, ("Suspended", 0, None), id="killed-by-a-second-ctrl-c"),
    # ... unless the run ended by itself meanwhile: finished, or failed so that no restart could help.
    pytest.param(
        [AttemptOutcome(0, stopped_by="SIGINT")], 3, ("Succeeded", 0, None), id="stop-after-the-end"
    ),
    pytest.param(
        [_failure(NON_RETRYABLE_EXIT_CODE, "SIGTERM")],
        3,
        ("Failed", 0, "NonRetryableError"),
        id="stop-and-error",
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


def test_a_stopped_run_is_suspended_with_how_to_resume() -> None:
    job = parse_finetune_job(minimal_manifest())
    progress = {"state": "training", "step": 10, "totalSteps": 40, "etaSeconds": 30, "trainLoss": 1.5}
    outcome = AttemptOutcome(
        STOPPED_EXIT_CODE, json.dumps({"outcome": "stopped", "step": 12}), progress, "SIGINT"
    )
    now = datetime(2025, 1, 1, tzinfo=UTC)
    _, status = supervise(job, lambda: outcome, io.StringIO(), clock=lambda: now, resume_hint="run it again")
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "StoppedByUser")
    assert suspended["message"] == status["message"]
    assert (
        status["message"] == "stopped by the user (SIGINT) after saving a checkpoint at step 12; run it again"
    )
    assert status["progress"] == {"step": 12, "totalSteps": 40, "epoch": 0, "percent": 30}  # no ETA
    killed = AttemptOutcome(-9, "", progress, "SIGTERM")
    _, status = supervise(job, lambda: killed, io.StringIO(), clock=lambda: now, resume_hint="run it again")
    assert (
        status["message"] == "stopped by the user (SIGTERM) before a checkpoint could be saved; run it again"
    )
    early = json.dumps(
        {"outcome": "stopped", "error": "stopped before training began: nothing to checkpoint"}
    )
    before = AttemptOutcome(STOPPED_EXIT_CODE, early, None, "SIGINT")
    _, status = supervise(job, lambda: before, io.StringIO(), clock=lambda: now, resume_hint="run it again")
    assert status["message"] == (
        "stopped by the user (SIGINT) without a checkpoint (stopped before training began: nothing to "
        "checkpoint); run it again"
    )


# A failed 2-rank attempt's log as torchrun leaves it: the ranks' lines, then torchrun's own records,
# its traceback and its ChildFailedError report, which say only that a rank failed.
TRAINER_LOG = """\
2026-12-02 05:57:36,907 rank 1 INFO finetune_trainer.recipe: training data: 20 rows, 0 usable
2026-12-02 05:57:37,011 rank 1 ERROR finetune_trainer: training failed:
Traceback (most recent call last):
  File "/work/main/trainer/src/finetune_trainer/__main__.py", line 63, in main
    result = run(config, gang)
             ^^^^^^^^^^^^^^^^^
ValueError: the rank's own error

2026-12-02 05:57:37,382 rank 0 ERROR finetune_trainer: no usable rows
W1202 05:57:38.675000 6725 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending \
process 6744 closing signal SIGTERM
E1202 05:57:38.791000 6725 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 78) \
local_rank: 1 (pid: 6745) of binary: /work/main/.venv/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
finetune_trainer FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 6744)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : 78 (pid: 6745)
============================================================
finetune launch: a line after torchrun's report
"""


def test_the_log_tail_leaves_out_torchruns_traceback_and_report(tmp_path: Path) -> None:
    kept = without_torchrun(TRAINER_LOG.splitlines())
    assert not [line for line in kept if "torch/distributed" in line or "ChildFailedError" in line]
    assert not [line for line in kept if "FAILED" in line or "=====" in line or "exitcode" in line]
    assert (
        "ValueError: the rank's own error" in kept and kept.count("Traceback (most recent call last):") == 1
    )
    assert kept[-2:] == [
        "2026-12-02 05:57:37,382 rank 0 ERROR finetune_trainer: no usable rows",
        "finetune launch: a line after torchrun's report",
    ]
    log = tmp_path / "trainer.log"
    log.write_text(TRAINER_LOG)
    assert log_tail(log, 2) == kept[-2:]


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        pytest.param(
            {"outcome": "failed", "error": "no usable rows"}, "the trainer's error: no usable rows", id="own"
        ),
        pytest.param(
            {"outcome": "failed", "error": "no optimizer step for 60s", "reason": "Stalled", "rank": 1},
            "the trainer's error (rank 1, Stalled): no optimizer step for 60s",
            id="with-reason",
        ),
        pytest.param(None, "the trainer left no message (exit 1); the end of its log:", id="no-summary"),
    ],
)
def test_a_failure_is_reported_in_the_trainers_words(
    summary: dict[str, Any] | None, expected: str, tmp_path: Path
) -> None:
    log = tmp_path / "trainer.log"
    log.write_text(TRAINER_LOG)
    report = failure_report(AttemptOutcome(1, json.dumps(summary) if summary else ""), log)
    assert report.splitlines()[0] == expected
    assert report.splitlines()[-1] == f"full log: {log}"
    assert "ChildFailedError" not in report and "FAILED" not in report
    # The log's end, without torchrun's lines, only when the trainer left no message.
    assert ("  finetune launch: a line after torchrun's report" in report) is (summary is None)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_nothing_outlives_the_run_not_even_a_process_its_parent_left() -> None:
    # A launcher whose child runs in a session of its own (as torchrun starts the ranks); the launcher
    # is killed, so the child is no longer below it: the tree still knows it and ends it.
    script = (
        "import subprocess, sys, time\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "child = subprocess.Popen(sleeper, start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    child = int(launcher.stdout.readline())
    try:
        tree = ProcessTree(launcher)
        assert tree.refresh() == 1 and tree.survivors() == [child]
        launcher.kill()
        launcher.wait()
        assert not _gone(child) and tree.survivors() == [child]
        tree.end()
        assert _gone(child) and tree.survivors() == []
    finally:
        launcher.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_the_first_stop_terminates_the_run_and_the_second_kills_it() -> None:
    calls: list[str] = []

    class Tree:
        def terminate(self) -> None:
            calls.append("terminate")

        def kill(self) -> None:
            calls.append("kill")

    stop = StopRequest()
    stop.handle(signal.SIGINT, None)  # between attempts: only noted, the next attempt does not start
    assert (stop.name, calls) == ("SIGINT", [])
    stop.tree = Tree()
    stop.handle(signal.SIGTERM, None)
    stop.handle(signal.SIGINT, None)
    assert (stop.name, calls) == ("SIGINT", ["kill", "kill"])
    stop = StopRequest()
    stop.tree = Tree()
    stop.handle(signal.SIGTERM, None)
    stop.handle(signal.SIGINT, None)
    assert (stop.name, calls[2:]) == ("SIGTERM", ["terminate", "kill"])


# --- stopping a real run ------------------------------------------------------------------------------

STOP_STEPS = 300  # training takes ~20 s here, far longer than a stop takes to reach the ranks


def _stoppable_job(directory: Path) -> Path:
    """The demo's job, training STOP_STEPS steps, where the only checkpoint is the one a stop saves."""
    manifest = prepare_tiny(directory)
    job = yaml.safe_load(manifest.read_text())
    job["spec"]["hyperparameters"].pop("epochs")
    job["spec"]["hyperparameters"]["maxSteps"] = STOP_STEPS
    job["spec"]["output"]["checkpointEverySteps"] = 100_000
    job["spec"]["evaluation"]["everySteps"] = 100_000
    manifest.write_text(yaml.safe_dump(job))
    return manifest


def _processes_naming(*texts: str) -> list[str]:
    """The processes whose command line or environment names one of ``texts``: what a run left behind."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            named = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
            if any(text.encode() in named for text in texts):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name}: {command}")
    return found


class _Terminal:
    """``finetune run`` as a terminal's foreground job: in a process group of its own, which a Ctrl-C
    signals as a whole; its output read as it comes."""

    def __init__(self, manifest: Path, store: Path) -> None:
        self.process = subprocess.Popen(
            [FINETUNE, "run", str(manifest), "--store", str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(
            target=lambda: self.lines.extend(self.process.stdout or []), daemon=True
        )
        self.reader.start()

    def wait_for(self, prefix: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            line = next((line for line in list(self.lines) if line.startswith(prefix)), None)
            if line is not None:
                return line
            time.sleep(0.1)
        raise AssertionError(f"no line starting {prefix!r}:\n{''.join(self.lines)[-3000:]}")

    def work_folder(self) -> Path:
        line = self.wait_for("running ")
        return Path(line.rsplit("trainer log: ", 1)[1].strip()).parent

    def finish(self, timeout: float = 200) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code, "".join(self.lines)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def terminals() -> Iterator[list[tuple[_Terminal, Path]]]:
    """Runs a test started, each with its work folder; whatever of them a failed test left is killed."""
    started: list[tuple[_Terminal, Path]] = []
    yield started
    for terminal, work in started:
        if terminal.process.poll() is None:
            terminal.kill()
        for process in _processes_naming(str(work)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(process.split(":")[0]), signal.SIGKILL)


def _stop_mid_training(
    tmp_path: Path, terminals: list[tuple[_Terminal, Path]], send: Callable[[subprocess.Popen[str]], None]
) -> tuple[int, str, int]:
    """Starts the stoppable job, sends the stop once it trains; the exit code, the output and the step
    of the checkpoint the stop saved, after checking what every stop must leave (and not leave)."""
    manifest = _stoppable_job(tmp_path)
    store = tmp_path / "s3"
    terminal = _Terminal(manifest, store)
    work = terminal.work_folder()
    terminals.append((terminal, work))
    terminal.wait_for("step ")
    send(terminal.process)
    code, output = terminal.finish()
    assert "restarting" not in output and "Traceback" not in output, output[-3000:]
    status = _status_block(output)
    assert status["phase"] == "Suspended", output[-3000:]
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "True" and suspended["reason"] == "StoppedByUser"
    checkpoints = sorted((store / "outputs" / "capitals-lora" / "checkpoints").glob("step-*/manifest.json"))
    assert len(checkpoints) == 1, checkpoints
    step = int(checkpoints[0].parent.name.removeprefix("step-"))
    assert 0 < step < STOP_STEPS
    assert f"after saving a checkpoint at step {step}; " in suspended["message"]
    assert f"running the same command again with the same --store {store} resumes" in suspended["message"]
    assert status["progress"]["step"] == step
    assert _processes_naming(str(work), str(manifest)) == []
    return code, status["message"], step


@pytest.mark.system
def test_ctrl_c_in_a_terminal_stops_the_run_after_a_checkpoint(
    tmp_path: Path, terminals: list[tuple[_Terminal, Path]]
) -> None:
    # What a terminal does: SIGINT to the whole foreground process group.
    code, message, _ = _stop_mid_training(
        tmp_path, terminals, lambda process: os.killpg(process.pid, signal.SIGINT)
    )
    assert code == 130 and "(SIGINT)" in message


@pytest.mark.system
def test_sigterm_stops_the_run_after_a_checkpoint_and_the_same_command_resumes_it(
    tmp_path: Path, terminals: list[tuple[_Terminal, Path]]
) -> None:
    code, message, step = _stop_mid_training(
        tmp_path, terminals, lambda process: process.send_signal(signal.SIGTERM)
    )
    assert code == STOPPED_EXIT_CODE and "(SIGTERM)" in message
    again = _Terminal(tmp_path / "finetunejob.yaml", tmp_path / "s3")
    work = again.work_folder()
    terminals.append((again, work))
    first_step = int(again.wait_for("step ").split()[1].split("/")[0])
    code, output = again.finish(timeout=400)
    assert code == 0, output[-3000:]
    assert first_step >= step  # the step continues from the checkpoint, not from 0
    assert (
        f"resumed from s3://outputs/capitals-lora/checkpoints/step-{step}/"
        in (work / "trainer.log").read_text()
    )
    status = _status_block(output)
    assert status["phase"] == "Succeeded" and status["progress"]["step"] == STOP_STEPS
    assert "restarting" not in output

"""``finetune run``: the same FinetuneJob on this machine, without a cluster.

It resolves the manifest with the operator's own code into the trainer's configuration, starts the
worker entry point (``python -m finetune_trainer.launch``) with ``nodes x max(gpusPerNode, 1)``
local ranks (GPUs when there are enough, otherwise CPU processes with gloo), shows progress from
rank 0's /progress, and after each attempt asks the operator's own state machine, fed with the
workers' exit codes and termination messages, whether to restart; it ends with the status block the
operator would write. With a store folder (``--store DIR``) every rank reads and writes
``s3://bucket/key`` as the file ``DIR/bucket/key`` (no server, no ports); without one, the spec's
own S3 storage is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from finetune_trainer import worker_env
from finetune_trainer.config import FolderStorageConfig, TrainerConfig

from finetune_operator.api.resolve import resolve_trainer_config
from finetune_operator.api.spec import FinetuneJob, FinetuneJobStatus
from finetune_operator.controller.observation import PodObservation, progress_status
from finetune_operator.controller.state import JobObservation, decide


class LocalRunError(Exception):
    """The run cannot start here (too few GPUs, QLoRA on CPU): says why, no traceback."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _local_gpus() -> int:
    try:
        import torch
    except ImportError as error:
        raise LocalRunError(
            f"finetune run needs the trainer installed (pip install 'finetune-operator[trainer]'): {error}"
        ) from error
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class LocalPlan:
    config: TrainerConfig
    ranks: int
    notes: tuple[str, ...]


def plan_local_run(job: FinetuneJob, gpus_here: int, store: Path | None, progress_port: int) -> LocalPlan:
    """The trainer configuration for this machine: the job's, adapted only where the machine differs."""
    config = resolve_trainer_config(job)
    ranks = config.distributed.world_size
    notes: list[str] = []
    updates: dict[str, Any] = {}
    if config.distributed.uses_gpus and gpus_here < ranks:
        if gpus_here:
            raise LocalRunError(
                f"the job needs {ranks} GPUs ({job.spec.resources.nodes} nodes x "
                f"{job.spec.resources.gpus_per_node}); this machine has {gpus_here}"
            )
        if config.method.type == "qlora":
            raise LocalRunError(
                "method qlora needs GPUs (4-bit bitsandbytes kernels), and this machine has none"
            )
        notes.append(f"no GPU here: {ranks} CPU processes with gloo")
        updates["distributed"] = config.distributed.model_copy(update={"uses_gpus": False})
    on_cpu = not updates.get("distributed", config.distributed).uses_gpus
    if on_cpu and config.hyperparameters.precision != "fp32":
        notes.append(f"precision {config.hyperparameters.precision} -> fp32 on CPU")
        updates["hyperparameters"] = config.hyperparameters.model_copy(update={"precision": "fp32"})
    if store is not None:
        updates["storage"] = FolderStorageConfig(kind="folder", root=str(store.resolve()))
    updates["reporting"] = config.reporting.model_copy(update={"progress_port": progress_port})
    return LocalPlan(config.model_copy(update=updates), ranks, tuple(notes))


def _progress(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=1) as answer:
            return json.loads(answer.read())
    except OSError as error:
        body = getattr(error, "read", None)
        if body is not None:  # 503 while the run initializes still carries the document
            with contextlib.suppress(ValueError, OSError):
                return json.loads(body())
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes:d}:{secs:02d}"


def progress_line(document: dict[str, Any], width: int = 24) -> str:
    """step / total, a bar, loss, tokens/s and ETA, in one line."""
    step, total = document.get("step", 0), document.get("totalSteps") or 0
    done = min(width, int(width * step / total)) if total else 0
    parts = [f"step {step}/{total}", f"[{'#' * done}{'.' * (width - done)}]"]
    if document.get("trainLoss") is not None:
        parts.append(f"loss {document['trainLoss']:.4f}")
    if document.get("tokensPerSecond"):
        parts.append(f"tok/s {document['tokensPerSecond']:,.0f}")
    parts.append(f"ETA {_duration(document.get('etaSeconds'))}")
    return " ".join(parts)


class _Display:
    """A live bar on a terminal, plain log lines otherwise (one per change, at most every 5 s)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self.last_line = ""
        self.last_time = 0.0

    def show(self, document: dict[str, Any] | None) -> None:
        if not document or document.get("state") != "training":
            return
        line = progress_line(document)
        if self.live:
            self.out.write("\r" + line.ljust(len(self.last_line)))
            self.out.flush()
        elif line != self.last_line and time.monotonic() - self.last_time >= 5:
            self.out.write(line + "\n")
            self.out.flush()
            self.last_time = time.monotonic()
        self.last_line = line

    def end(self) -> None:
        if self.live and self.last_line:
            self.out.write("\n")


@dataclass(frozen=True)
class AttemptOutcome:
    """What one local attempt left behind, as the operator would see it in the pods' status."""

    code: int
    termination_message: str = ""
    # Rank 0's last /progress document while training, when it answered.
    progress: dict[str, Any] | None = None
    # The user stopped the run (Ctrl-C): it ends whatever the state machine would do next.
    interrupted: bool = False


def after_attempt(
    job: FinetuneJob, status: FinetuneJobStatus, outcome: AttemptOutcome, now: datetime
) -> FinetuneJobStatus:
    """The operator's own decision on a finished attempt, so that restarts follow the same rules
    (backoffLimit, non-retryable exits, stopped runs) here as on a cluster."""
    assert job.metadata.name is not None
    if outcome.progress is not None:
        reported = progress_status(outcome.progress)
        status = status.model_copy(
            update={
                "progress": reported.progress,
                "metrics": reported.metrics,
                "checkpoints": reported.checkpoints,
            }
        )
    observed = JobObservation(
        job.metadata.name, job.metadata.namespace or "default", 1, now, job, status=status
    )
    workers = [
        PodObservation(
            name=f"{job.metadata.name}-worker-{rank}",
            node_rank=rank,
            attempt=status.restarts,
            phase="Succeeded" if outcome.code == 0 else "Failed",
            started=True,
            exit_code=outcome.code,
            termination_message=outcome.termination_message,
        )
        for rank in range(job.spec.resources.nodes)
    ]
    return decide(observed, workers, now).status


def supervise(
    job: FinetuneJob,
    attempt: Callable[[], AttemptOutcome],
    out: TextIO,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[AttemptOutcome, dict[str, Any]]:
    """Runs attempts while the state machine says Restarting; returns the last outcome and the status
    block the operator would write (Failed when the user stopped a run it would have restarted)."""
    status = FinetuneJobStatus(phase="Running", restarts=0)
    while True:
        outcome = attempt()
        status = after_attempt(job, status, outcome, clock())
        if status.phase != "Restarting" or outcome.interrupted:
            break
        out.write(
            f"the run failed (exit {outcome.code}); restarting from the newest checkpoint "
            f"(restart {status.restarts} of {job.spec.run_policy.backoff_limit})\n"
        )
    api = status.to_api()
    block = {k: v for k, v in api.items() if v not in (None, [], {}) and k != "observedGeneration"}
    if block["phase"] == "Restarting":
        block["phase"] = "Failed"
    return outcome, block


def _launch(plan: LocalPlan, work: Path, env: dict[str, str], out: TextIO) -> AttemptOutcome:
    """One attempt: the worker entry point with every rank on this machine."""
    log_path = work / "trainer.log"
    termination = Path(env[worker_env.TERMINATION_MESSAGE_PATH])
    termination.unlink(missing_ok=True)
    display, last, interrupted = _Display(out), None, False
    with log_path.open("a") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer.launch"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while launcher.poll() is None:
                document = _progress(plan.config.reporting.progress_port)
                if document is not None and document.get("state") == "training":
                    last = document
                display.show(document)
                time.sleep(1)
        except KeyboardInterrupt:
            out.write("\nstopping: the trainer saves a checkpoint first\n")
            launcher.send_signal(signal.SIGTERM)
            launcher.wait()
            interrupted = True
        display.end()
    message = termination.read_text() if termination.exists() else ""
    return AttemptOutcome(launcher.returncode, message, last, interrupted)


def local_environment(plan: LocalPlan, work: Path, master_port: int) -> dict[str, str]:
    """The worker environment of one node holding every rank, the operator's names with local values."""
    return worker_env.worker_environment(
        config_path=str(work / "config.json"),
        nnodes=1,
        node_rank=0,
        nproc_per_node=plan.ranks,
        master_addr="127.0.0.1",
        master_port=master_port,
        termination_message_path=str(work / "termination-log"),
        workspace=str(work / "workspace"),
    )


def run_local(job: FinetuneJob, store: Path | None, out: TextIO = sys.stdout) -> tuple[int, dict[str, Any]]:
    """Runs the job here, restarting from the newest checkpoint when the operator's state machine
    would restart the gang; returns the exit code and the final status."""
    if store is not None and not store.is_dir():
        raise LocalRunError(
            f"--store {store}: no such folder; make it and put each bucket in it as a folder "
            "(s3://bucket/key is DIR/bucket/key)"
        )
    plan = plan_local_run(job, _local_gpus(), store, _free_port())
    work = Path(tempfile.mkdtemp(prefix=f"finetune-{job.metadata.name}-"))
    try:
        for note in plan.notes:
            out.write(f"note: {note}\n")
        (work / "config.json").write_text(plan.config.to_json())
        inherited = dict(os.environ)
        if not plan.config.distributed.uses_gpus:
            inherited.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.ranks)))
        out.write(
            f"running {job.metadata.name}: {plan.ranks} local rank(s); trainer log: {work / 'trainer.log'}\n"
        )

        def attempt() -> AttemptOutcome:
            env = {**inherited, **local_environment(plan, work, _free_port())}
            return _launch(plan, work, env, out)

        outcome, status = supervise(job, attempt, out)
        if outcome.code != 0:
            out.write((work / "trainer.log").read_text()[-3000:] + "\n")
        out.write(yaml.safe_dump({"status": status}, sort_keys=False, width=100))
        return outcome.code, status
    finally:
        shutil.rmtree(work / "workspace", ignore_errors=True)


def local_path(uri: str, store: Path) -> Path:
    """Where an s3://bucket/key of a ``--store DIR`` run lies on disk."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return store / bucket / key

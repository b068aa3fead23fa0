"""``finetune run``: the same FinetuneJob on this machine, without a cluster.

It resolves the manifest with the operator's own code into the trainer's configuration, starts the
worker entry point (``python -m finetune_trainer.launch``) with ``nodes x max(gpusPerNode, 1)``
local ranks (GPUs when there are enough, otherwise CPU processes with gloo), shows progress from
rank 0's /progress, and after each attempt asks the operator's own state machine, fed with the
workers' exit codes and termination messages, whether to restart; it ends with the status block the
operator would write. With a store folder (``--store DIR``) every rank reads and writes
``s3://bucket/key`` as the file ``DIR/bucket/key`` (no server, no ports); without one, the spec's
own S3 storage is used.

A stop is a stop: the launcher runs in a session of its own, so a terminal's Ctrl-C (SIGINT to its
whole foreground process group) reaches only this command, which then stops the run the way the
kubelet stops a pod: SIGTERM to the launcher, which passes it to the ranks; they save a checkpoint and
exit 143. The run is never restarted after a stop, ends 130 (SIGINT), 143 (SIGTERM) or 129 (SIGHUP,
the terminal closed) with status Suspended, and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import yaml
from finetune_trainer import worker_env
from finetune_trainer.config import FolderStorageConfig, TrainerConfig
from finetune_trainer.launch import descendants, process_start_time
from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, TerminationSummary, parse_termination_message

from finetune_operator.api.resolve import resolve_trainer_config
from finetune_operator.api.spec import FinetuneJob, FinetuneJobStatus
from finetune_operator.controller.observation import PodObservation, parse_progress, progress_status
from finetune_operator.controller.state import JobObservation, decide, set_condition

# The seconds a stop gives the ranks to save a checkpoint and exit; a rank still running after them
# ends itself (worker_env.STOP_GRACE_SECONDS). Whatever is left STOP_GRACE_MARGIN_SECONDS later is
# killed, as the kubelet kills a pod after its terminationGracePeriodSeconds.
STOP_GRACE_SECONDS = 60
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The log lines shown when the trainer left no message of its own.
LOG_TAIL_LINES = 20


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
        from finetune_trainer import deepspeed_config  # imports torch, as finetune run does anyway

        asked = config.hyperparameters.precision
        precision, why = deepspeed_config.cpu_precision(asked)
        fast = "on CPU: it multiplies bf16 natively"
        notes.append(f"precision {asked} -> {precision}: {why}" if why else f"precision {asked} {fast}")
        if precision != asked:
            updates["hyperparameters"] = config.hyperparameters.model_copy(update={"precision": precision})
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


def _answer_accuracy(document: dict[str, Any]) -> str:
    """``answer acc 0.050 -> 0.620``: the base model's and the latest evaluation's, "" when not reported."""
    report = parse_progress(document)
    now, base = report.eval_metrics.get("answerAccuracy"), report.base_metrics.get("answerAccuracy")
    if now is None:
        return ""
    return f"answer acc {base:.3f} -> {now:.3f}" if base is not None else f"answer acc {now:.3f}"


def progress_line(document: dict[str, Any], width: int = 24) -> str:
    """step / total, a bar, loss, answer accuracy (evaluation.generation), tokens/s and ETA, in one line."""
    step, total = document.get("step", 0), document.get("totalSteps") or 0
    done = min(width, int(width * step / total)) if total else 0
    parts = [f"step {step}/{total}", f"[{'#' * done}{'.' * (width - done)}]"]
    if document.get("trainLoss") is not None:
        parts.append(f"loss {document['trainLoss']:.4f}")
    if accuracy := _answer_accuracy(document):
        parts.append(accuracy)
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
    # The signal by which the user stopped the run ("SIGINT", "SIGTERM", "SIGHUP"), if they did.
    stopped_by: str | None = None

    @property
    def summary(self) -> TerminationSummary | None:
        return parse_termination_message(self.termination_message)


def _with_progress(status: FinetuneJobStatus, outcome: AttemptOutcome) -> FinetuneJobStatus:
    if outcome.progress is None:
        return status
    reported = progress_status(outcome.progress)
    update: dict[str, Any] = {
        "progress": reported.progress,
        "metrics": reported.metrics,
        "checkpoints": reported.checkpoints,
    }
    if reported.base_metrics:
        update["base_metrics"] = {**status.base_metrics, **reported.base_metrics}
    return status.model_copy(update=update)


def after_attempt(
    job: FinetuneJob, status: FinetuneJobStatus, outcome: AttemptOutcome, now: datetime
) -> FinetuneJobStatus:
    """The operator's own decision on a finished attempt, so that restarts follow the same rules
    (backoffLimit, non-retryable exits, stopped runs) here as on a cluster."""
    assert job.metadata.name is not None
    status = _with_progress(status, outcome)
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


RESUME_HINT = "running the same command again resumes from the newest checkpoint"


def stopped_by_the_user(
    status: FinetuneJobStatus, outcome: AttemptOutcome, now: datetime, resume_hint: str = RESUME_HINT
) -> FinetuneJobStatus:
    """Suspended, with a condition saying who stopped the run, whether a checkpoint was saved, and how
    to go on: a stop is the user's, never a failure, and the operator's state machine (which would
    restart a worker that exited 143) is not asked."""
    status = _with_progress(status, outcome)
    progress, summary = status.progress, outcome.summary
    if summary is not None and summary.outcome == "stopped" and summary.error:
        saved = f"without a checkpoint ({summary.error})"  # e.g. before training began
    elif summary is not None and summary.outcome == "stopped":
        saved = "after saving a checkpoint" + (f" at step {summary.step}" if summary.step is not None else "")
        if summary.step is not None and progress is not None:
            total = progress.total_steps
            percent = min(100, summary.step * 100 // total) if total else 0
            progress = progress.model_copy(update={"step": summary.step, "percent": percent})
    else:
        saved = "before a checkpoint could be saved"
    if progress is not None:  # no time left to go while it waits for the user
        progress = progress.model_copy(update={"eta_seconds": None})
    message = f"stopped by the user ({outcome.stopped_by}) {saved}; {resume_hint}"
    conditions = set_condition(status.conditions, "Suspended", True, "StoppedByUser", message, now, 1)
    update = {"phase": "Suspended", "message": message, "conditions": conditions, "progress": progress}
    return status.model_copy(update=update)


def supervise(
    job: FinetuneJob,
    attempt: Callable[[], AttemptOutcome],
    out: TextIO,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    resume_hint: str = RESUME_HINT,
) -> tuple[AttemptOutcome, dict[str, Any]]:
    """Runs attempts while the state machine says Restarting; returns the last outcome and the status
    block the operator would write. A run the user stopped is Suspended and never restarted, unless
    it ended by itself meanwhile: finished (exit 0) or failed in a way no restart can fix (78)."""
    status = FinetuneJobStatus(phase="Running", restarts=0)
    while True:
        outcome = attempt()
        if outcome.stopped_by is not None and outcome.code not in (0, NON_RETRYABLE_EXIT_CODE):
            status = stopped_by_the_user(status, outcome, clock(), resume_hint)
            break
        status = after_attempt(job, status, outcome, clock())
        if status.phase != "Restarting" or outcome.stopped_by is not None:
            break
        error = outcome.summary.error if outcome.summary is not None else ""
        detail = f": {error[:300]}" if error else ""
        out.write(
            f"the run failed (exit {outcome.code}{detail}); restarting from the newest checkpoint "
            f"(restart {status.restarts} of {job.spec.run_policy.backoff_limit})\n"
        )
    api = status.to_api()
    block = {k: v for k, v in api.items() if v not in (None, [], {}) and k != "observedGeneration"}
    if block["phase"] == "Restarting":
        block["phase"] = "Failed"
    return outcome, block


class ProcessTree:
    """The launcher and every process seen below it, so that none outlives the run: torchrun starts
    each rank in a session of its own, and a rank whose torchrun died is no longer below the launcher.
    Each is remembered with its start time, so a process id used again is never signalled. ``kill``
    and ``terminate`` only read, so a signal handler may call them while ``refresh`` runs."""

    def __init__(self, launcher: subprocess.Popen[bytes]) -> None:
        self.launcher = launcher
        self.seen: dict[int, str] = {}

    def refresh(self) -> int:
        """Remembers the processes below the launcher now; returns how many were ever seen."""
        for pid in descendants(self.launcher.pid):
            if pid not in self.seen and (started := process_start_time(pid)) is not None:
                self.seen[pid] = started
        return len(self.seen)

    def terminate(self) -> None:
        """A stop: SIGTERM to the launcher, which passes it to the ranks (as the kubelet does)."""
        with contextlib.suppress(OSError):
            self.launcher.send_signal(signal.SIGTERM)

    def survivors(self) -> list[int]:
        return [pid for pid, started in dict(self.seen).items() if process_start_time(pid) == started]

    def kill(self) -> None:
        """SIGKILL to the launcher and to every process of the run that still runs."""
        below = descendants(self.launcher.pid)  # before the launcher goes, and its children with it
        with contextlib.suppress(OSError):
            self.launcher.kill()
        for pid in {*self.survivors(), *(pid for pid in below if process_start_time(pid) is not None)}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def end(self) -> None:
        """Kills whatever of the run still runs, and waits until it is gone (a few seconds at most)."""
        if self.launcher.poll() is None:
            self.refresh()
        if self.launcher.poll() is None or self.survivors():
            self.kill()
        self.launcher.wait()  # at once: it ended, or was just killed
        deadline = time.monotonic() + 5
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.05)


class StopRequest:
    """A stop asked by a signal to this command: the first stops the run after a checkpoint (SIGTERM to
    the launcher at once, from the handler), a second kills it at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.since = 0.0
        self.tree: ProcessTree | None = None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def handle(self, signum: int, _frame: object) -> None:
        if self.signum is None:
            self.signum, self.since = signum, time.monotonic()
            if self.tree is not None:
                self.tree.terminate()
        elif self.tree is not None:
            self.tree.kill()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers while the run goes on (only the main thread can have them)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self.handle) for signum in STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _await_stop(tree: ProcessTree, since: float) -> bool:
    """Waits for the launcher to end after a stop, for the grace period and the margin since ``since``,
    then kills the run; True when it had to. Ranks that start after the stop was passed on (it came
    while the run started) are sent it too."""
    deadline = since + STOP_GRACE_SECONDS + worker_env.STOP_GRACE_MARGIN_SECONDS
    known = tree.refresh()
    while tree.launcher.poll() is None:
        if time.monotonic() >= deadline:
            tree.kill()
            tree.launcher.wait()
            return True
        if (now_known := tree.refresh()) > known:
            tree.terminate()
            known = now_known
        time.sleep(0.2)
    return False


def _launch(
    plan: LocalPlan, work: Path, env: dict[str, str], out: TextIO, stop: StopRequest
) -> AttemptOutcome:
    """One attempt: the worker entry point with every rank on this machine."""
    log_path = work / "trainer.log"
    termination = Path(env[worker_env.TERMINATION_MESSAGE_PATH])
    termination.unlink(missing_ok=True)
    display, last = _Display(out), None
    with log_path.open("a") as log:
        # A session of its own: a terminal's SIGINT goes to its foreground process group, and torchrun
        # would pass it to the ranks, which would die without a checkpoint.
        launcher = subprocess.Popen(
            [sys.executable, "-m", "finetune_trainer.launch"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree = ProcessTree(launcher)
    stop.tree = tree
    try:
        if stop.signum is not None:  # it came while the launcher started
            tree.terminate()
        while launcher.poll() is None and stop.signum is None:
            tree.refresh()
            document = _progress(plan.config.reporting.progress_port)
            if document is not None and document.get("state") == "training":
                last = document
            display.show(document)
            time.sleep(1)
        display.end()
        if stop.signum is not None:
            out.write(
                f"\nstopping ({stop.name}): the ranks save a checkpoint and exit (up to "
                f"{STOP_GRACE_SECONDS}s); Ctrl-C again stops them at once\n"
            )
            out.flush()
            if _await_stop(tree, stop.since):
                out.write(f"the ranks did not stop within {STOP_GRACE_SECONDS}s: killed\n")
    finally:
        try:
            if launcher.poll() is None:  # this command failed while the run went on: stop it too
                tree.terminate()
                _await_stop(tree, time.monotonic())
        finally:
            stop.tree = None
            tree.end()
    message = termination.read_text() if termination.exists() else ""
    return AttemptOutcome(launcher.returncode, message, last, stop.name)


# torchrun's own lines: its log records, and the traceback and report of its ChildFailedError.
_TORCHRUN_RECORD = re.compile(r"[DIWEF]\d{4} [\d:.]+\s+\d+ \S*torch/distributed/")
_RULE = re.compile(r"={20,}")


def without_torchrun(lines: list[str]) -> list[str]:
    """The log lines that are not torchrun's (its records, its ChildFailedError traceback and report),
    which only say that a rank failed, not why."""
    kept: list[str] = []
    traceback: list[str] | None = None
    report_rules = 0  # rules of torchrun's report left to skip to
    for line in lines:
        if report_rules:
            report_rules -= bool(_RULE.fullmatch(line.strip()))
        elif traceback is not None:
            traceback.append(line)
            if line[:1] and not line[:1].isspace():  # the exception's line ends a traceback
                if "ChildFailedError" in line:
                    report_rules = 2
                else:
                    kept += traceback
                traceback = None
        elif line.startswith("Traceback (most recent call last):"):
            traceback = [line]
        elif not _TORCHRUN_RECORD.match(line):
            kept.append(line)
    return kept + (traceback or [])


def log_tail(log_path: Path, count: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``count`` non-blank lines of the trainer's log that are not torchrun's."""
    try:
        with log_path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 256 * 1024))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in without_torchrun(text.splitlines()) if line.strip()][-count:]


def failure_report(outcome: AttemptOutcome, log_path: Path) -> str:
    """What went wrong in the trainer's own words (its termination summary), else the end of its log
    without torchrun's traceback; and where the whole log is."""
    summary = outcome.summary
    lines: list[str] = []
    if summary is not None and summary.error:
        where = [f"rank {summary.rank}"] if summary.rank is not None else []
        where += [summary.reason] if summary.reason else []
        context = f" ({', '.join(where)})" if where else ""
        lines.append(f"the trainer's error{context}: {summary.error}")
        if summary.collateral:
            lines.append("the ranks here only echoed another rank's failure; the end of the log:")
            lines += [f"  {line}" for line in log_tail(log_path)]
    else:
        lines.append(f"the trainer left no message (exit {outcome.code}); the end of its log:")
        lines += [f"  {line}" for line in log_tail(log_path)]
    lines.append(f"full log: {log_path}")
    return "\n".join(lines) + "\n"


def _exit_code(outcome: AttemptOutcome, phase: str) -> int:
    """The shell's codes: 128 + the signal for a run stopped by one (the user's, or one that killed the
    launcher), the launcher's own otherwise."""
    if phase == "Suspended" and outcome.stopped_by is not None:
        return 128 + int(signal.Signals[outcome.stopped_by])
    return outcome.code if outcome.code >= 0 else 128 - outcome.code


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
        stop_grace_seconds=STOP_GRACE_SECONDS,
    )


def run_local(job: FinetuneJob, store: Path | None, out: TextIO = sys.stdout) -> tuple[int, dict[str, Any]]:
    """Runs the job here, restarting from the newest checkpoint when the operator's state machine
    would restart the gang; returns the exit code and the final status. Ctrl-C, SIGTERM or SIGHUP
    stops it after a checkpoint (a second one at once): Suspended, exit 128 + the signal."""
    if store is not None and not store.is_dir():
        raise LocalRunError(
            f"--store {store}: no such folder; make it and put each bucket in it as a folder "
            "(s3://bucket/key is DIR/bucket/key)"
        )
    stop = StopRequest()
    with stop.installed():
        plan = plan_local_run(job, _local_gpus(), store, _free_port())
        work = Path(tempfile.mkdtemp(prefix=f"finetune-{job.metadata.name}-"))
        try:
            return _run_plan(job, plan, work, store, stop, out)
        finally:
            shutil.rmtree(work / "workspace", ignore_errors=True)


def _run_plan(
    job: FinetuneJob, plan: LocalPlan, work: Path, store: Path | None, stop: StopRequest, out: TextIO
) -> tuple[int, dict[str, Any]]:
    for note in plan.notes:
        out.write(f"note: {note}\n")
    (work / "config.json").write_text(plan.config.to_json())
    inherited = dict(os.environ)
    if not plan.config.distributed.uses_gpus:
        inherited.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.ranks)))
    log_path = work / "trainer.log"
    out.write(f"running {job.metadata.name}: {plan.ranks} local rank(s); trainer log: {log_path}\n")

    def attempt() -> AttemptOutcome:
        if stop.signum is not None:  # stopped before this attempt began
            return AttemptOutcome(128 + stop.signum, stopped_by=stop.name)
        env = {**inherited, **local_environment(plan, work, _free_port())}
        return _launch(plan, work, env, out, stop)

    same = f" with the same --store {store}" if store is not None else ""
    where = "" if store is not None else f" in {job.spec.output.uri}"
    resume = f"running the same command again{same} resumes from the newest checkpoint{where}"
    outcome, status = supervise(job, attempt, out, resume_hint=resume)
    if status["phase"] == "Failed":
        out.write(failure_report(outcome, log_path))
    out.write(yaml.safe_dump({"status": status}, sort_keys=False, width=100))
    return _exit_code(outcome, status["phase"]), status


def local_path(uri: str, store: Path) -> Path:
    """Where an s3://bucket/key of a ``--store DIR`` run lies on disk."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return store / bucket / key

"""The worker pod's entry point: wait for worker 0's DNS name, then run the trainer under torchrun.

The operator (or ``finetune run``) sets the environment of :mod:`finetune_trainer.worker_env`.
Workers that start before worker 0 has an address would otherwise die on "host not found"; the
headless Service publishes not-ready pods, so the name appears as soon as worker 0 is scheduled.
No ssh and no shell: torchrun's static rendezvous on worker 0, started with an argv list, as a
child so that the reserved non-retryable exit code survives torchrun (which reports 1 for any
failed rank): each rank leaves a summary (see gang.py) and the launcher writes the node's one summary,
the failure's cause rather than its echoes, into the pod's termination message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from finetune_trainer import worker_env as names
from finetune_trainer.config import DEFAULT_TERMINATION_MESSAGE_PATH
from finetune_trainer.summary import (
    NON_RETRYABLE_EXIT_CODE,
    TerminationSummary,
    node_summary,
    read_rank_summaries,
    write_termination_message,
)

# How often a stop is passed on again while torchrun runs (the ranks treat repeats as one stop).
FORWARD_EVERY_SECONDS = 1.0


def _resolvable(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True


def wait_for_host(
    host: str,
    timeout: float,
    resolvable: Callable[[str], bool] = _resolvable,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """True once ``host`` resolves, False when ``timeout`` seconds pass first."""
    deadline = clock() + timeout
    delay = 0.5
    while not resolvable(host):
        if clock() >= deadline:
            return False
        sleep(delay)
        delay = min(delay * 2, 5.0)
    return True


def torchrun_argv(env: Mapping[str, str]) -> list[str]:
    """torchrun's command line for this node, from the environment the operator set."""
    timeout = env.get(names.RENDEZVOUS_TIMEOUT_SECONDS, str(names.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS))
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={env[names.NNODES]}",
        f"--node-rank={env[names.NODE_RANK]}",
        f"--nproc-per-node={env[names.NPROC_PER_NODE]}",
        f"--master-addr={env[names.MASTER_ADDR]}",
        f"--master-port={env[names.MASTER_PORT]}",
        f"--rdzv-conf=timeout={timeout}",
        # SIGTERM is the ranks' own to handle (see run_torchrun), never torchrun's.
        "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        "-m",
        "finetune_trainer",
        "--config",
        env[names.FINETUNE_CONFIG],
    ]


def _fail(message: str, termination_log: str) -> int:
    print(f"finetune launch: {message}", file=sys.stderr)
    write_termination_message(
        termination_log, TerminationSummary(outcome="failed", retryable=True, error=message)
    )
    return 1


def main() -> int:
    env = dict(os.environ)
    termination_log = env.get(names.TERMINATION_MESSAGE_PATH, DEFAULT_TERMINATION_MESSAGE_PATH)
    missing = [k for k in names.REQUIRED if not env.get(k)]
    if missing:
        print(f"finetune launch: missing environment: {', '.join(missing)}", file=sys.stderr)
        return NON_RETRYABLE_EXIT_CODE
    for directory in (env.get(name) for name in names.SCRATCH_DIRS):
        if directory:
            os.makedirs(directory, exist_ok=True)  # on the pod's scratch volume; the root is read-only
    timeout = float(env.get(names.RENDEZVOUS_TIMEOUT_SECONDS, names.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS))
    if env[names.NODE_RANK] != "0" and not wait_for_host(env[names.MASTER_ADDR], timeout):
        # Retryable: the gang restarts and worker 0 gets another chance to be scheduled.
        return _fail(
            f"worker 0 ({env[names.MASTER_ADDR]}) did not resolve within {timeout:.0f}s", termination_log
        )
    summaries = rank_summary_dir(env)
    shutil.rmtree(summaries, ignore_errors=True)  # a local rerun reuses the workspace
    return run_torchrun(torchrun_argv(env), termination_log, summaries, int(env[names.NPROC_PER_NODE]))


def rank_summary_dir(env: Mapping[str, str]) -> Path:
    """Where this node's ranks leave their summaries: the node's workspace."""
    return Path(env.get(names.FINETUNE_WORKSPACE, names.DEFAULT_WORKSPACE)) / "summaries"


def run_torchrun(argv: list[str], termination_log: str, summaries: Path, ranks: int) -> int:
    """Runs torchrun with SIGTERM going straight to the trainer ranks, and returns the pod's exit code.

    torchrun would answer SIGTERM by killing its ranks 30 seconds later; the ranks need the pod's
    whole grace period to finish a checkpoint. So torchrun ignores SIGTERM (an ignored signal stays
    ignored across exec, and ``--signals-to-handle`` keeps it from installing a handler), and the
    launcher passes SIGTERM to torchrun's descendants, where each rank's own handler catches it.
    torchrun also reports any failed rank as exit 1, which would hide the reserved code; the ranks'
    summaries say what happened.
    """
    stopping = threading.Event()
    started: list[subprocess.Popen[bytes]] = []

    def forward(_signum: int = 0, _frame: object = None) -> None:
        stopping.set()
        for child in started:
            for pid in descendants(child.pid):  # the ranks (torchrun starts each in a session of its own)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)  # before torchrun exists, so that no stop is lost
    child = subprocess.Popen(argv, preexec_fn=_ignore_sigterm)
    started.append(child)
    while True:
        try:
            code = child.wait(timeout=FORWARD_EVERY_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if stopping.is_set():  # again: ranks that torchrun started after the first forward
                forward()
    summary = node_summary(read_rank_summaries(summaries), ranks)
    if summary is not None:
        write_termination_message(termination_log, summary)
    return exit_code(code, summary)


def _ignore_sigterm() -> None:
    """In torchrun's process, before exec: SIGTERM is the ranks' own to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def process_start_time(pid: int) -> str | None:
    """When a process started (clock ticks after boot, from /proc), to tell it from a later process that
    got the same pid; None once it is gone or a zombie (exited, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (Linux): torchrun's ranks and whatever they started."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def exit_code(torchrun_code: int, summary: TerminationSummary | None) -> int:
    """The pod's exit code from torchrun's and the node's summary (the summary's verdict wins, except
    that a run whose ranks all succeeded but whose torchrun failed afterwards is not a success)."""
    if summary is not None and not (summary.outcome == "succeeded" and torchrun_code != 0):
        return summary.exit_code()
    return torchrun_code if torchrun_code > 0 else 128 - torchrun_code


if __name__ == "__main__":
    sys.exit(main())

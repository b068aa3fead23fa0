"""The worker pod's entry point: wait for worker 0's DNS name, then run the trainer under torchrun.

The operator sets NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT and FINETUNE_CONFIG.
Workers that start before worker 0 has an address would otherwise die on "host not found"; the
headless Service publishes not-ready pods, so the name appears as soon as worker 0 is scheduled.
No ssh and no shell: torchrun's static rendezvous on worker 0, started with an argv list, as a
child so that the reserved non-retryable exit code survives torchrun (which reports 1 for any
failed rank).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, TerminationSummary, parse_termination_message

DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS = 1800


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
    timeout = env.get("RENDEZVOUS_TIMEOUT_SECONDS", str(DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS))
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={env['NNODES']}",
        f"--node-rank={env['NODE_RANK']}",
        f"--nproc-per-node={env['NPROC_PER_NODE']}",
        f"--master-addr={env['MASTER_ADDR']}",
        f"--master-port={env['MASTER_PORT']}",
        f"--rdzv-conf=timeout={timeout}",
        "-m",
        "finetune_trainer",
        "--config",
        env["FINETUNE_CONFIG"],
    ]


def _fail(message: str, termination_log: str) -> int:
    print(f"finetune launch: {message}", file=sys.stderr)
    try:
        with open(termination_log, "w", encoding="utf-8") as log:
            log.write(TerminationSummary(outcome="failed", retryable=True, error=message).to_message())
    except OSError:
        pass
    return 1


def main() -> int:
    env = dict(os.environ)
    termination_log = env.get("TERMINATION_MESSAGE_PATH", "/dev/termination-log")
    missing = [
        k
        for k in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "FINETUNE_CONFIG")
        if not env.get(k)
    ]
    if missing:
        print(f"finetune launch: missing environment: {', '.join(missing)}", file=sys.stderr)
        return NON_RETRYABLE_EXIT_CODE
    for directory in (env.get("HOME"), env.get("TMPDIR"), env.get("HF_HOME")):
        if directory:
            os.makedirs(directory, exist_ok=True)  # on the pod's scratch volume; the root is read-only
    timeout = float(env.get("RENDEZVOUS_TIMEOUT_SECONDS", DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS))
    if env["NODE_RANK"] != "0" and not wait_for_host(env["MASTER_ADDR"], timeout):
        # Retryable: the gang restarts and worker 0 gets another chance to be scheduled.
        return _fail(
            f"worker 0 ({env['MASTER_ADDR']}) did not resolve within {timeout:.0f}s", termination_log
        )
    return run_torchrun(torchrun_argv(env), termination_log)


def run_torchrun(argv: list[str], termination_log: str) -> int:
    """Runs torchrun, passing SIGTERM on, and returns the pod's exit code.

    torchrun reports any failed rank as exit 1, which would hide the trainer's reserved code; the
    summary local rank 0 wrote says whether the failure can be retried.
    """
    child = subprocess.Popen(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    code = child.wait()
    if code == 0:
        return 0
    try:
        with open(termination_log, encoding="utf-8") as log:
            summary = parse_termination_message(log.read())
    except OSError:
        summary = None
    if summary is not None and not summary.retryable:
        return NON_RETRYABLE_EXIT_CODE
    return code if code > 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())

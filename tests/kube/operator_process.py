"""`finetune-operator` as a user runs it: a process logged in through a kubeconfig, JSON logs to a
file, liveness and metrics on free ports. Used by tests/test_runner.py and benchmarks/operator_scale.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from .controlplane import free_port

OPERATOR = str(Path(sys.executable).parent / "finetune-operator")


class OperatorProcess:
    """One running operator; ``scope`` is ``--namespace=NS`` or ``--all-namespaces``, ``args`` more
    flags and ``env`` more settings (as the chart's Deployment gives them)."""

    def __init__(
        self,
        kubeconfig: Path,
        scope: str,
        log: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.liveness, self.metrics = free_port(), free_port()
        self.log = log
        command = [
            OPERATOR,
            scope,
            f"--liveness-port={self.liveness}",
            f"--metrics-port={self.metrics}",
            "--log-format=json",
            *args,
        ]
        environment = {**os.environ, **(env or {}), "KUBECONFIG": str(kubeconfig)}
        with log.open("a") as output:
            self.process = subprocess.Popen(
                command, env=environment, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )

    def lines(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.lines()[-lines:])

    def healthy(self) -> bool:
        """The liveness endpoint answers 200."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness}/healthz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (unless it has exited already), SIGKILL after ``grace`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()

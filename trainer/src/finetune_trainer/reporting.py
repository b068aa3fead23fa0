"""What the trainer tells the world: /progress and /metrics on global rank 0, the metric history,
and the termination message every rank leaves for the operator.

The operator polls /progress (it needs no Kubernetes permissions for that) and reads the
termination message from the pod's status when a worker exits.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from finetune_trainer.summary import finite_metrics

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """The run's live state, shared between the training loop and the HTTP server."""

    total_steps: int = 0
    step: int = 0
    epoch: float = 0.0
    tokens_per_second: float | None = None
    train_loss: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    latest_checkpoint: dict[str, Any] | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    training: bool = False
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **values: Any) -> None:
        with self.lock:
            for key, value in values.items():
                setattr(self, key, value)

    def snapshot(self) -> dict[str, Any]:
        """The /progress document (camelCase, like the FinetuneJob status it feeds)."""
        with self.lock:
            eta = None
            if self.training and self.step > 0 and self.total_steps > self.step:
                elapsed = time.monotonic() - self.started
                eta = int(elapsed / self.step * (self.total_steps - self.step))
            reported = {"tokensPerSecond": self.tokens_per_second, "trainLoss": self.train_loss}
            numbers, notes = finite_metrics(
                {k: v for k, v in (reported | self.eval_metrics).items() if v is not None}
            )
            return {
                "state": "training" if self.training else "initializing",
                "step": self.step,
                "totalSteps": self.total_steps,
                "epoch": round(self.epoch, 4),
                "tokensPerSecond": numbers.get("tokensPerSecond"),
                "etaSeconds": eta,
                "trainLoss": numbers.get("trainLoss"),
                "evalMetrics": {k: numbers[k] for k in self.eval_metrics if k in numbers},
                **({"notes": notes} if notes else {}),
                "latestCheckpoint": self.latest_checkpoint,
                "checkpoints": list(self.checkpoints),
            }


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        gauge = {
            "step": "Optimizer steps done.",
            "total_steps": "Optimizer steps planned.",
            "train_loss": "Latest training loss.",
            "eval_loss": "Latest evaluation loss.",
            "tokens_per_second": "Training throughput of all ranks.",
        }
        self.gauges = {
            name: Gauge(f"finetune_trainer_{name}", text, registry=self.registry)
            for name, text in gauge.items()
        }

    def refresh(self, progress: dict[str, Any]) -> None:
        values = {
            "step": progress["step"],
            "total_steps": progress["totalSteps"],
            "train_loss": progress["trainLoss"],
            "eval_loss": progress["evalMetrics"].get("evalLoss"),
            "tokens_per_second": progress["tokensPerSecond"],
        }
        for name, value in values.items():
            if value is not None:
                self.gauges[name].set(value)


class ProgressServer:
    """HTTP on global rank 0: /progress answers 503 until training runs (worker 0's readiness)."""

    def __init__(self, progress: Progress, port: int, host: str = "0.0.0.0") -> None:
        metrics = _Metrics()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                document = progress.snapshot()
                if self.path == "/progress":
                    body = json.dumps(document).encode()
                    self._answer(200 if document["state"] == "training" else 503, body, "application/json")
                elif self.path == "/metrics":
                    metrics.refresh(document)
                    self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                else:
                    self._answer(404, b"not found\n", "text/plain")

            def _answer(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Polls every few seconds would flood the log."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="progress", daemon=True)

    def start(self) -> ProgressServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class History:
    """Every logged step and evaluation, with the metric names the FinetuneJob status uses."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def record(self, step: int, **metrics: float | None) -> None:
        """Finite values only (JSON has no NaN); what is left out is noted in the entry."""
        kept, notes = finite_metrics({k: v for k, v in metrics.items() if v is not None})
        self.entries.append({"step": step, **kept, **({"notes": notes} if notes else {})})

    def latest(self, name: str) -> float | None:
        for entry in reversed(self.entries):
            if name in entry:
                return entry[name]
        return None

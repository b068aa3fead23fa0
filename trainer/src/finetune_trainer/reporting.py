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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from finetune_trainer.summary import finite_metrics

logger = logging.getLogger(__name__)


class TrainingTime:
    """Seconds spent training, with evaluations and checkpoint saves left out (``paused()``): what
    tokens/s and the ETA divide by, so that a window with an evaluation in it does not look slow.

    ``sync`` (torch.cuda.synchronize on GPUs) runs before each reading: steps only queue device work, and
    what is still queued when a pause starts is training time."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, sync: Callable[[], None] | None = None
    ) -> None:
        self._clock = clock
        self._sync = sync
        self._lap_start = clock()
        self._paused = 0.0

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._clock()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """What runs inside is not training time."""
        start = self._now()
        try:
            yield
        finally:
            self._paused += self._clock() - start

    def lap(self) -> float:
        """Training seconds since the previous lap (or since this clock was made)."""
        now = self._now()
        seconds = now - self._lap_start - self._paused
        self._lap_start, self._paused = now, 0.0
        return seconds


# How quickly the ETA follows a change of pace: a step's weight halves over this many later steps.
ETA_HALF_LIFE_STEPS = 20.0


@dataclass
class StepRate:
    """Seconds per optimizer step for the ETA, from this attempt's training time only (a resumed run
    starts afresh, evaluation pauses never count): an exponential moving average over steps, with
    Adam's bias correction so that the first windows are averaged instead of the first one (often slow:
    allocation, warm-up) dominating. An average, not the latest window: the ETA should not jump."""

    weighted: float = 0.0
    weight: float = 0.0

    def observe(self, steps: int, seconds: float) -> None:
        """A log window: ``steps`` (at least one) optimizer steps in ``seconds`` of training time."""
        decay = 0.5 ** (steps / ETA_HALF_LIFE_STEPS)
        self.weighted = decay * self.weighted + (1 - decay) * seconds / steps
        self.weight = decay * self.weight + (1 - decay)

    @property
    def seconds_per_step(self) -> float | None:
        return self.weighted / self.weight if self.weight else None


@dataclass
class Progress:
    """The run's live state, shared between the training loop and the HTTP server."""

    total_steps: int = 0
    step: int = 0
    epoch: float = 0.0
    tokens_per_second: float | None = None
    train_loss: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    # The evaluation of the model before its first step (history step 0), when the run has one.
    base_metrics: dict[str, float] = field(default_factory=dict)
    latest_checkpoint: dict[str, Any] | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    training: bool = False
    rate: StepRate = field(default_factory=StepRate)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **values: Any) -> None:
        with self.lock:
            for key, value in values.items():
                setattr(self, key, value)

    def timed_steps(self, steps: int, seconds: float) -> None:
        """``steps`` optimizer steps took ``seconds`` of training time (for the ETA)."""
        with self.lock:
            self.rate.observe(steps, seconds)

    def snapshot(self) -> dict[str, Any]:
        """The /progress document (camelCase, like the FinetuneJob status it feeds). etaSeconds is the
        remaining steps at the average pace (StepRate): training time, evaluations not included."""
        with self.lock:
            eta = None
            seconds_per_step = self.rate.seconds_per_step
            if self.training and seconds_per_step is not None and self.total_steps > self.step:
                eta = round(seconds_per_step * (self.total_steps - self.step))
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
                "baseMetrics": finite_metrics(self.base_metrics)[0],
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

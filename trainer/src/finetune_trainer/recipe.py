"""The fine-tuning recipe: one readable loop over a DeepSpeed engine.

Why the DeepSpeed engine and not the Hugging Face Trainer: with transformers 5 and accelerate 1.15,
the HF Trainer counts one process when there is no CUDA ("train_batch_size 2 != 2*1*2" with two CPU
ranks), so it cannot be tested with several ranks on CPU, and its loop hides what this one needs to
control: collective agreement on stopping, background checkpoint uploads, and no host sync per step.

Every rank runs this function. Steps: fetch inputs (one download per node), prepare data, build the
model for the method, resume from the newest complete checkpoint, train with periodic evaluation,
checkpoints and progress reports, then write the model and its metrics to S3.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from finetune_trainer import data
from finetune_trainer.checkpointing import Checkpointer
from finetune_trainer.collectives import any_rank, largest
from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import Example
from finetune_trainer.deepspeed_config import build_deepspeed_config
from finetune_trainer.errors import NonRetryableError
from finetune_trainer.evaluation import LabelSet, evaluate
from finetune_trainer.modeling import load_model, load_tokenizer
from finetune_trainer.outputs import write_outputs
from finetune_trainer.reporting import History, Progress, ProgressServer
from finetune_trainer.storage import AccessDeniedError, ObjectNotFoundError, ObjectStore, parse_s3_uri

logger = logging.getLogger(__name__)

# What no restart fixes: the trainer exits with the reserved code for these.
NonRetryableFailures = (NonRetryableError, data.DataError, ObjectNotFoundError, AccessDeniedError)
# Ranks agree on failures: 0 none, 1 retryable, 2 non-retryable (the worst wins everywhere).
_FAILURE_NONE, _FAILURE_RETRYABLE, _FAILURE_FINAL = 0, 1, 2


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


@dataclass
class RunResult:
    outcome: str  # succeeded | stopped
    step: int
    metrics: dict[str, float]
    output_model: str


@dataclass
class Plan:
    """How the data maps to optimizer steps."""

    micro_batches_per_epoch: int
    accumulation: int
    total_steps: int

    def epoch_at(self, step: int) -> float:
        return step * self.accumulation / self.micro_batches_per_epoch


@dataclass
class LoopState:
    """What a checkpoint carries besides the engine's own state (the client state)."""

    step: int = 0
    best_eval_loss: float | None = None
    evaluations_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def init_distributed(config: TrainerConfig) -> Ranks:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.distributed.uses_gpus and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    minutes = int(os.environ.get("DEEPSPEED_TIMEOUT", "30"))
    deepspeed.init_distributed(
        dist_backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=minutes)
    )
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), local_rank, dist.get_world_size(), device)


def together(ranks: Ranks, work: Callable[[], Any]) -> Any:
    """Runs ``work`` on every rank; if it fails anywhere, it fails everywhere, with the same kind.

    Otherwise a rank whose download failed would leave the others waiting in a barrier, and a pod
    exiting with a retryable code could restart a gang that must fail.
    """
    result, error, kind = None, None, _FAILURE_NONE
    try:
        result = work()
    except NonRetryableFailures as failure:
        error, kind = failure, _FAILURE_FINAL
    except Exception as failure:
        error, kind = failure, _FAILURE_RETRYABLE
    worst = largest(kind, ranks.device)
    if worst == _FAILURE_NONE:
        return result
    if error is None:
        error = RuntimeError("another rank failed; see its log")
    if worst == _FAILURE_FINAL and not isinstance(error, NonRetryableError):
        raise NonRetryableError(str(error)) from error
    raise error


@dataclass(frozen=True)
class Inputs:
    model_dir: Path
    train_file: Path
    eval_file: Path | None


def fetch_inputs(config: TrainerConfig, store: ObjectStore, workspace: Path, ranks: Ranks) -> Inputs:
    """One download per node (local rank 0); the other local ranks wait for it."""

    def local_path(uri: str, name: str) -> Path:
        return workspace / "inputs" / name / Path(parse_s3_uri(uri)[1]).name

    inputs = Inputs(
        model_dir=workspace / "inputs" / "model",
        train_file=local_path(config.dataset.train, "train"),
        eval_file=local_path(config.dataset.eval, "eval") if config.dataset.eval else None,
    )

    def download() -> None:
        if ranks.local_rank != 0:
            return
        store.download_prefix(config.model.uri, inputs.model_dir)
        store.download_file(config.dataset.train, inputs.train_file)
        if config.dataset.eval and inputs.eval_file:
            store.download_file(config.dataset.eval, inputs.eval_file)

    together(ranks, download)
    return inputs


def _examples(path: Path, config: TrainerConfig, tokenizer: Any, what: str) -> list[Example]:
    rows = data.load_rows(path)
    examples, report = data.prepare(rows, config.dataset, tokenizer)
    logger.info("%s data: %s", what, report.summary())
    data.check_usable(report)
    return examples


def prepare_data(
    config: TrainerConfig, inputs: Inputs, tokenizer: Any
) -> tuple[list[Example], list[Example]]:
    train = _examples(inputs.train_file, config, tokenizer, "training")
    evaluation: list[Example] = []
    if inputs.eval_file is not None:
        evaluation = _examples(inputs.eval_file, config, tokenizer, "evaluation")
    elif config.dataset.eval_split is not None:
        train, evaluation = data.split_eval(train, config.dataset.eval_split, config.hyperparameters.seed)
    if config.dataset.packing:
        assert tokenizer.eos_token_id is not None
        train = data.pack(train, config.dataset.max_seq_length, tokenizer.eos_token_id)
    return train, evaluation


def make_plan(config: TrainerConfig, train_examples: int, world_size: int) -> Plan:
    hp = config.hyperparameters
    micro = (train_examples // world_size) // hp.batch_size_per_device
    if micro == 0:
        raise NonRetryableError(
            f"{train_examples} training sequences are too few for batchSizePerDevice "
            f"{hp.batch_size_per_device} on {world_size} ranks"
        )
    if hp.max_steps is not None:
        total = hp.max_steps
    else:
        assert hp.epochs is not None
        total = max(1, math.ceil(hp.epochs * micro / hp.gradient_accumulation_steps))
    return Plan(micro, hp.gradient_accumulation_steps, total)


def lr_multiplier(config: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine or linear decay to 0, or constant."""
    hp = config.hyperparameters
    warmup = int(hp.warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if hp.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if hp.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return multiplier


def build_engine(config: TrainerConfig, model: torch.nn.Module, plan: Plan, ranks: Ranks) -> Any:
    hp = config.hyperparameters
    trainable = [p for p in model.parameters() if p.requires_grad]
    ds_config = build_deepspeed_config(config, ranks.world_size)
    optimizer = None
    if "optimizer" not in ds_config:  # ZeRO-Offload brings DeepSpeed's CPU Adam instead
        fused = ranks.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=fused
        )
    multiplier = lr_multiplier(config, plan.total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=lambda built: torch.optim.lr_scheduler.LambdaLR(built, multiplier),
        config=ds_config,
    )
    return engine


def micro_batches(
    examples: list[Example], ranks: Ranks, batch_size: int, seed: int, start: int
) -> Iterator[list[Example]]:
    """This rank's micro-batches from ``start`` on, forever: a seeded shuffle per epoch."""
    share = examples[ranks.rank :: ranks.world_size][: len(examples) // ranks.world_size]
    per_epoch = len(share) // batch_size
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        order = torch.randperm(len(share), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        chosen = order[offset * batch_size : (offset + 1) * batch_size]
        yield [share[i] for i in chosen]
        index += 1


def optimizer_step(
    engine: Any,
    batches: Iterator[list[Example]],
    collate: Callable[[list[Example]], dict[str, torch.Tensor]],
    accumulation: int,
    loss_sum: torch.Tensor,
    tokens: torch.Tensor,
) -> None:
    """One optimizer step of ``accumulation`` micro-batches; sums loss and tokens on the device, so
    nothing waits for the GPU here."""
    device = loss_sum.device
    for _ in range(accumulation):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(next(batches)).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().double()
        tokens += batch["attention_mask"].sum()


def _reseed(seed: int, rank: int, step: int) -> None:
    """Seeds that continue across a resume: a function of the seed, the rank and the step."""
    value = (seed * 1_000_003 + rank * 7919 + step) % 2**32
    random.seed(value)
    torch.manual_seed(value)


def train(config: TrainerConfig, stop_requested: Callable[[], bool]) -> RunResult:
    ranks = init_distributed(config)
    hp = config.hyperparameters
    workspace = Path(os.environ.get("FINETUNE_WORKSPACE", "/workspace"))
    store = ObjectStore.from_config(config.storage)
    progress = Progress()
    server = ProgressServer(progress, config.reporting.progress_port).start() if ranks.rank == 0 else None
    try:
        inputs = fetch_inputs(config, store, workspace, ranks)
        tokenizer = together(ranks, lambda: load_tokenizer(inputs.model_dir, config))
        train_examples, eval_examples = together(ranks, lambda: prepare_data(config, inputs, tokenizer))
        plan = together(ranks, lambda: make_plan(config, len(train_examples), ranks.world_size))
        _reseed(hp.seed, ranks.rank, 0)
        model = together(ranks, lambda: load_model(inputs.model_dir, config))
        engine = build_engine(config, model, plan, ranks)
        checkpointer = Checkpointer(
            store,
            config.output.uri,
            workspace / "checkpoints",
            rank=ranks.rank,
            local_rank=ranks.local_rank,
            world_size=ranks.world_size,
            keep=config.output.keep_checkpoints,
            device=ranks.device,
        )
        client_state = together(ranks, lambda: checkpointer.resume(engine)) or {}
        state = LoopState(**{k: v for k, v in client_state.items() if k in LoopState.__dataclass_fields__})
        labels = LabelSet.from_examples(train_examples) if config.dataset.format == "classification" else None
        loop = _Loop(
            config, ranks, engine, checkpointer, progress, plan, state, eval_examples, labels, tokenizer
        )
        outcome = loop.run(train_examples, stop_requested)
        final_metrics = loop.final_metrics()
        output_model = ""
        if outcome == "succeeded":
            output_model = write_outputs(
                config,
                store,
                engine,
                tokenizer,
                workspace / "output",
                ranks.rank,
                final_metrics,
                state.history,
            )
        return RunResult(outcome, state.step, final_metrics, output_model)
    finally:
        if server is not None:
            server.stop()


class _Loop:
    """The training loop and the bookkeeping around it."""

    def __init__(
        self,
        config: TrainerConfig,
        ranks: Ranks,
        engine: Any,
        checkpointer: Checkpointer,
        progress: Progress,
        plan: Plan,
        state: LoopState,
        eval_examples: list[Example],
        labels: LabelSet | None,
        tokenizer: Any,
    ) -> None:
        self.config = config
        self.ranks = ranks
        self.engine = engine
        self.checkpointer = checkpointer
        self.progress = progress
        self.plan = plan
        self.state = state
        self.eval_examples = eval_examples
        self.labels = labels
        self.history = History(state.history)
        pad_id = tokenizer.pad_token_id

        def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
            return data.collate(batch, pad_id)

        self.collate = collate
        self.log_every = max(1, min(10, plan.total_steps // 20))
        self.last_eval: dict[str, float] = {}

    def run(self, examples: list[Example], stop_requested: Callable[[], bool]) -> str:
        config, hp, ranks = self.config, self.config.hyperparameters, self.ranks
        self.progress.update(
            total_steps=self.plan.total_steps,
            step=self.state.step,
            checkpoints=list(self.checkpointer.completed),
            latest_checkpoint=self.checkpointer.completed[-1] if self.checkpointer.completed else None,
            training=True,
            started=time.monotonic(),
        )
        batches = micro_batches(
            examples,
            ranks,
            hp.batch_size_per_device,
            hp.seed,
            self.state.step * hp.gradient_accumulation_steps,
        )
        loss_sum = torch.zeros((), device=ranks.device, dtype=torch.float64)
        tokens = torch.zeros((), device=ranks.device, dtype=torch.float64)
        window_start, window_steps = time.monotonic(), 0
        self.engine.train()
        while self.state.step < self.plan.total_steps:
            optimizer_step(
                self.engine, batches, self.collate, hp.gradient_accumulation_steps, loss_sum, tokens
            )
            self.state.step += 1
            window_steps += 1
            step = self.state.step
            _reseed(hp.seed, ranks.rank, step)
            if step % self.log_every == 0 or step == self.plan.total_steps:
                self._log(loss_sum, tokens, time.monotonic() - window_start, window_steps)
                loss_sum.zero_()
                tokens.zero_()
                window_start, window_steps = time.monotonic(), 0
                self._record_finished_checkpoint(wait=False)
            evaluate_now = (
                self.eval_examples
                and config.evaluation.every_steps
                and step % config.evaluation.every_steps == 0
            )
            if evaluate_now and step < self.plan.total_steps and self._evaluate_and_should_stop():
                break
            if step % config.output.checkpoint_every_steps == 0 and step < self.plan.total_steps:
                self._checkpoint()
            # Ranks agree on stopping at log steps only: no host sync on every step.
            if step % self.log_every == 0 and any_rank(stop_requested(), ranks.device):
                logger.info("stop requested at step %d: saving a checkpoint before exiting", step)
                self._checkpoint()
                self._record_finished_checkpoint(wait=True)
                return "stopped"
        self._record_finished_checkpoint(wait=True)
        if self.eval_examples:
            self._evaluate_and_should_stop()
        return "succeeded"

    def _log(self, loss_sum: torch.Tensor, tokens: torch.Tensor, seconds: float, steps: int) -> None:
        totals = torch.stack([loss_sum, tokens])
        dist.all_reduce(totals)
        micro_steps = steps * self.config.hyperparameters.gradient_accumulation_steps * self.ranks.world_size
        train_loss = totals[0].item() / max(micro_steps, 1)
        tokens_per_second = totals[1].item() / max(seconds, 1e-9)
        learning_rate = self.engine.lr_scheduler.get_last_lr()[0]
        self.history.record(
            self.state.step,
            trainLoss=train_loss,
            learningRate=learning_rate,
            tokensPerSecond=tokens_per_second,
        )
        self.progress.update(
            step=self.state.step,
            epoch=self.plan.epoch_at(self.state.step),
            train_loss=train_loss,
            tokens_per_second=tokens_per_second,
        )
        if self.ranks.rank == 0:
            logger.info(
                "step %d/%d loss %.4f lr %.3g tokens/s %.0f",
                self.state.step, self.plan.total_steps, train_loss, learning_rate, tokens_per_second,
            )  # fmt: skip

    def _evaluate_and_should_stop(self) -> bool:
        """Evaluates; True when early stopping's patience has run out."""
        metrics = evaluate(
            self.engine,
            self.eval_examples,
            self.collate,
            self.config.hyperparameters.batch_size_per_device,
            self.ranks.device,
            self.labels,
        )
        self.last_eval = metrics
        self.history.record(self.state.step, **metrics)
        self.progress.update(eval_metrics=metrics)
        if self.ranks.rank == 0:
            logger.info("step %d evaluation: %s", self.state.step, json.dumps(metrics))
        state = self.state
        if state.best_eval_loss is None or metrics["evalLoss"] < state.best_eval_loss:
            state.best_eval_loss = metrics["evalLoss"]
            state.evaluations_without_improvement = 0
            return False
        state.evaluations_without_improvement += 1
        patience = self.config.hyperparameters.early_stopping_patience
        if patience is not None and state.evaluations_without_improvement >= patience:
            logger.info("early stopping at step %d: no improvement in %d evaluations", state.step, patience)
            return True
        return False

    def _checkpoint(self) -> None:
        client_state = {
            "step": self.state.step,
            "best_eval_loss": self.state.best_eval_loss,
            "evaluations_without_improvement": self.state.evaluations_without_improvement,
            "history": self.history.entries,
        }
        assert client_state.keys() == LoopState.__dataclass_fields__.keys()
        metrics = {"evalLoss": self.last_eval["evalLoss"]} if "evalLoss" in self.last_eval else {}
        waited = self.checkpointer.save(self.engine, self.state.step, client_state, metrics)
        if self.ranks.rank == 0:
            logger.info(
                "checkpoint step-%d saved locally in %.2fs; uploading in the background",
                self.state.step,
                waited,
            )

    def _record_finished_checkpoint(self, wait: bool) -> None:
        entry = self.checkpointer.finish_pending(wait=wait)
        if entry is not None:
            self.progress.update(latest_checkpoint=entry, checkpoints=list(self.checkpointer.completed))

    def final_metrics(self) -> dict[str, float]:
        final: dict[str, float] = {}
        train_loss = self.history.latest("trainLoss")
        if train_loss is not None:
            final["trainLoss"] = train_loss
        return final | self.last_eval

"""The fine-tuning recipe: one readable loop over a DeepSpeed engine.

Why the DeepSpeed engine and not the Hugging Face Trainer: with transformers 5 and accelerate 1.15,
the HF Trainer counts one process when there is no CUDA ("train_batch_size 2 != 2*1*2" with two CPU
ranks), so it cannot be tested with several ranks on CPU, and its loop hides what this one needs to
control: collective agreement on stopping, background checkpoint uploads, and no host sync per step.

Every rank runs ``run()``, which drives ``FinetuneRecipe`` the way a torchtune recipe is driven:
``setup()`` fetches the inputs (one download per node) and checks that the output is writable before
any collective exists, joins the ranks, prepares the data, builds the model for the method and
resumes from the newest complete checkpoint; ``train()`` is the loop, with periodic evaluation,
checkpoints, progress reports and the NaN check; ``save_outputs()`` writes the model and its metrics
to S3; ``cleanup()`` stops the progress server. A failure on any rank ends the gang (gang.py); the
generic parts live in ``training_support.py``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from finetune_trainer import data
from finetune_trainer.checkpointing import Checkpointer
from finetune_trainer.collectives import any_rank, every_rank
from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import Example
from finetune_trainer.deepspeed_config import build_deepspeed_config, check_with_deepspeed
from finetune_trainer.errors import NonRetryableError, RetryableError
from finetune_trainer.evaluation import Generation, LabelSet, evaluate
from finetune_trainer.example_store import ExampleStore, prepare_dataset, wait_for_dataset
from finetune_trainer.fault_injection import fault_point, poison
from finetune_trainer.gang import Gang
from finetune_trainer.host_memory import loop_mmap_threshold, returning_freed_memory, trims_heap_each_pass
from finetune_trainer.modeling import load_model, load_tokenizer, model_hidden_size
from finetune_trainer.outputs import LOG_UPLOAD_SECONDS, gate_failure, upload_log, write_outputs
from finetune_trainer.reporting import History, Progress, ProgressServer, TrainingTime
from finetune_trainer.storage import (
    AccessDeniedError,
    ObjectNotFoundError,
    ObjectStore,
    join_uri,
    parse_s3_uri,
)
from finetune_trainer.summary import EVAL_GATE_NOT_MET, NON_FINITE_LOSS, finite_metrics, rank_log_path
from finetune_trainer.training_support import (
    Plan,
    Ranks,
    build_engine,
    gang_store,
    init_distributed,
    make_plan,
    micro_batches,
    optimizer_step,
    release_optimizer_states,
    reseed,
)
from finetune_trainer.worker_env import DEFAULT_WORKSPACE, FINETUNE_WORKSPACE

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    outcome: str  # succeeded | stopped
    step: int
    metrics: dict[str, float]
    output_model: str


@dataclass
class LoopState:
    """What a checkpoint carries besides the engine's own state (the client state)."""

    step: int = 0
    best_eval_loss: float | None = None
    evaluations_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # The evaluation of the model before its first step (also history step 0): carried so that a resumed
    # run still reports what the fine-tune started from.
    base_metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_client_state(cls, client_state: dict[str, Any]) -> LoopState:
        """The loop state a checkpoint resumes; DeepSpeed's own keys in the client state are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in client_state.items() if k in names})

    def client_state(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Inputs:
    model_dir: Path
    train_file: Path
    eval_file: Path | None
    adapter_dir: Path | None = None  # model.adapter's download: the earlier adapter that training continues


class FinetuneRecipe:
    """One rank of a fine-tuning run: ``setup()``, ``train()``, ``save_outputs()``, ``cleanup()``."""

    # Built by setup() from the validated configuration.
    ranks: Ranks
    store: ObjectStore
    tokenizer: Any
    train_examples: ExampleStore  # memory-mapped from the node's disk (example_store.py)
    eval_examples: Sequence[Example]
    labels: LabelSet | None
    plan: Plan
    engine: Any
    loop_mmap_threshold: int  # glibc's, for the training loop and what follows (host_memory.py)
    trims_heap: bool  # the training loop trims the heap at each pass (host_memory.py)
    checkpointer: Checkpointer
    log_every: int

    def __init__(self, config: TrainerConfig, gang: Gang) -> None:
        self.config = config
        self.hp = config.hyperparameters
        self.gang = gang
        self.workspace = Path(os.environ.get(FINETUNE_WORKSPACE, DEFAULT_WORKSPACE))
        self.progress = Progress()
        self.server: ProgressServer | None = None
        self.state = LoopState()
        self.last_eval: dict[str, float] = {}

    @property
    def history(self) -> History:
        """The metric history lives in the loop state, so that checkpoints carry it."""
        return History(self.state.history)

    # --- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Fetches the inputs, joins the ranks, prepares the data, builds the engine and resumes."""
        config = self.config
        self.gang.attach_store(gang_store())
        self.store = ObjectStore.from_config(config.storage)
        if int(os.environ.get("RANK", "0")) == 0:
            self.server = ProgressServer(self.progress, config.reporting.progress_port).start()
        inputs = self._fetch_inputs()
        # The rendezvous waits for every rank, so it also waits for each node's download.
        self.ranks = ranks = init_distributed(config)
        self.tokenizer = load_tokenizer(inputs.model_dir, config)
        self.train_examples, self.eval_examples = self._prepare_data(inputs)
        # Before the engine: a one-label classification run learns nothing (from_examples says so).
        is_classification = config.dataset.format == "classification"
        self.labels = (
            LabelSet.from_examples(self.train_examples.label_examples(), source=config.dataset.train)
            if is_classification
            else None
        )
        self.plan = make_plan(config, len(self.train_examples), ranks.world_size)
        reseed(self.hp.seed, ranks.rank, 0)
        # One DeepSpeed configuration for both: ZeRO-3 creates the parameters partitioned from it
        # (HfDeepSpeedConfig) and the engine partitions by it. Judged before a large model is loaded.
        ds_config = build_deepspeed_config(config, ranks.world_size, model_hidden_size(inputs.model_dir))
        check_with_deepspeed(ds_config, ranks.world_size)
        zero_stage = ds_config["zero_optimization"].get("stage", 0)
        self.loop_mmap_threshold = loop_mmap_threshold(zero_stage)
        self.trims_heap = trims_heap_each_pass(zero_stage, ranks.device.type)
        with returning_freed_memory(self.loop_mmap_threshold):
            model = load_model(inputs.model_dir, config, inputs.adapter_dir, ds_config)
            fault_point("engine")
            self.engine = build_engine(config, model, self.plan, ranks, ds_config)
        self.checkpointer = Checkpointer(
            self.store,
            config.output.uri,
            self.workspace / "checkpoints",
            rank=ranks.rank,
            local_rank=ranks.local_rank,
            world_size=ranks.world_size,
            keep=config.output.keep_checkpoints,
            device=ranks.device,
        )
        fault_point("resume")
        client_state = self.checkpointer.resume(self.engine) or {}
        self.state = LoopState.from_client_state(client_state)
        self.log_every = max(1, min(10, self.plan.total_steps // 20))

    def _fetch_inputs(self) -> Inputs:
        """One download per node (local rank 0), then a write to the output location, both before the
        first collective: a missing input or a refused output fails this rank with the URI in its
        message, and no other rank is left waiting in a collective for it."""
        dataset = self.config.dataset

        def local_path(uri: str, name: str) -> Path:
            return self.workspace / "inputs" / name / Path(parse_s3_uri(uri)[1]).name

        adapter = self.config.model.adapter
        inputs = Inputs(
            model_dir=self.workspace / "inputs" / "model",
            train_file=local_path(dataset.train, "train"),
            eval_file=local_path(dataset.eval, "eval") if dataset.eval else None,
            adapter_dir=self.workspace / "inputs" / "adapter" if adapter else None,
        )

        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            # An earlier attempt's prepared data goes before the rendezvous, so that no rank of this node
            # can mistake it for this attempt's (the others wait for it in _prepare_data).
            shutil.rmtree(self._data_dir, ignore_errors=True)
            fault_point("fetch")
            self.store.download_prefix(self.config.model.uri, inputs.model_dir)
            if adapter and inputs.adapter_dir:
                self._fetch_adapter(adapter, inputs.adapter_dir)
            self.store.download_file(dataset.train, inputs.train_file)
            if dataset.eval and inputs.eval_file:
                self.store.download_file(dataset.eval, inputs.eval_file)
            self._check_output_writable()
        fault_point("before-rendezvous")
        return inputs

    def _fetch_adapter(self, uri: str, directory: Path) -> None:
        """The adapter's own files, not its subfolders: ``merged/`` (saveMerged) is a whole model. Also when
        a checkpoint resumes, whose weights then replace the adapter's (the checks still apply)."""
        files = [f.relative_path for f in self.store.list_files(uri) if "/" not in f.relative_path]
        if not files:
            raise NonRetryableError(f"model.adapter {uri} does not exist (no objects under it)")
        for name in files:
            self.store.download_file(join_uri(uri, name), directory / name)

    def _check_output_writable(self) -> None:
        """Writes and removes a small object under the output URI, as checkpoints will."""
        output = self.config.output.uri
        probe = join_uri(output, ".write-check", f"node-{os.environ.get('GROUP_RANK', '0')}")
        try:
            self.store.put_bytes(join_uri(probe, "probe"), b"finetune write check\n")
            self.store.delete_prefix(probe)
        except (ObjectNotFoundError, AccessDeniedError) as error:
            raise NonRetryableError(
                f"output.uri {output}: cannot write there ({error}); check the bucket exists and the "
                "job's credentials may write to it"
            ) from error

    @property
    def _data_dir(self) -> Path:
        return self.workspace / "data"

    def _prepare_data(self, inputs: Inputs) -> tuple[ExampleStore, Sequence[Example]]:
        """Local rank 0 streams the data into memory-mapped stores on the node's disk (tokenized, split,
        packed); the node's other ranks wait for them and read the same files."""
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            prepared = prepare_dataset(
                self.config.dataset,
                self.tokenizer,
                inputs.train_file,
                inputs.eval_file,
                self.hp.seed,
                self._data_dir,
            )
            train, evaluation = prepared.train, prepared.eval
        else:
            train, evaluation = wait_for_dataset(self._data_dir)
        return train, evaluation if evaluation is not None else []

    def _collate(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        return data.collate(batch, self.tokenizer.pad_token_id)

    # --- training ---------------------------------------------------------------------------------

    def train(self) -> str:
        """Trains to the planned step: "succeeded", or "stopped" after a checkpoint when asked to stop."""
        config, hp, ranks, plan, state = self.config, self.hp, self.ranks, self.plan, self.state
        self.progress.update(
            total_steps=plan.total_steps,
            step=state.step,
            base_metrics=state.base_metrics,
            checkpoints=list(self.checkpointer.completed),
            latest_checkpoint=self.checkpointer.completed[-1] if self.checkpointer.completed else None,
            training=True,
        )
        batches = micro_batches(
            self.train_examples,
            ranks,
            hp.batch_size_per_device,
            hp.seed,
            state.step * hp.gradient_accumulation_steps,
        )
        loss_sum = torch.zeros((), device=ranks.device, dtype=torch.float64)
        tokens = torch.zeros((), device=ranks.device, dtype=torch.float64)
        self.engine.train()
        self.gang.training_started()
        if self.eval_examples and state.step == 0:  # a fresh start, not a resume
            self._evaluate_base()
        # Throughput and the ETA count training only: evaluations and checkpoint saves are paused time.
        sync = torch.cuda.synchronize if ranks.device.type == "cuda" else None
        clock, window_steps = TrainingTime(sync=sync), 0
        while state.step < plan.total_steps:
            if fault_point("step", state.step):
                poison(self.engine.module)
            optimizer_step(
                self.engine,
                batches,
                self._collate,
                hp.gradient_accumulation_steps,
                loss_sum,
                tokens,
                trim_heap=self.trims_heap,
            )
            state.step += 1
            self.gang.beat()
            window_steps += 1
            step = state.step
            reseed(hp.seed, ranks.rank, step)
            if step % self.log_every == 0 or step == plan.total_steps:
                fault_point("log", step)
                self._log(loss_sum, tokens, clock.lap(), window_steps)
                loss_sum.zero_()
                tokens.zero_()
                window_steps = 0
                self._record_finished_checkpoint(wait=False)
            evaluate_now = (
                self.eval_examples
                and config.evaluation.every_steps
                and step % config.evaluation.every_steps == 0
            )
            if evaluate_now and step < plan.total_steps:
                with clock.paused():
                    stop_early = self._evaluate_and_should_stop()
                if stop_early:
                    break
            if step % config.output.checkpoint_every_steps == 0 and step < plan.total_steps:
                with clock.paused():
                    self._check_finite(loss_sum)
                    self.save_checkpoint()
            # Ranks agree on stopping at log steps only: no host sync on every step.
            if step % self.log_every == 0:
                fault_point("stop-check", step)
                if any_rank(self.gang.stop_requested(), ranks.device):
                    logger.info("stop requested at step %d: saving a checkpoint before exiting", step)
                    self.save_checkpoint()
                    self._record_finished_checkpoint(wait=True)
                    return "stopped"
        self._record_finished_checkpoint(wait=True)
        if self.eval_examples:
            self._evaluate_and_should_stop()
        self.gang.training_finished()
        return "succeeded"

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Before a checkpoint: the loss since the last log is finite on every rank (one host sync per
        checkpoint), so that no checkpoint holds weights a NaN has reached."""
        if not every_rank(bool(torch.isfinite(loss_sum).item()), self.ranks.device):
            self._non_finite_loss(math.nan)

    def _non_finite_loss(self, loss: float) -> NoReturn:
        """Ends the run: a restart from the same checkpoint would diverge the same way, unless the job
        says otherwise (runPolicy.nonFiniteLoss: restart). Every rank sees the same all-reduced loss."""
        self._record_finished_checkpoint(wait=True)  # the pending checkpoint predates the NaN: keep it
        newest = self.checkpointer.completed[-1]["uri"] if self.checkpointer.completed else "none yet"
        message = (
            f"the training loss became {loss} by step {self.state.step}; no checkpoint was saved after "
            f"it (newest good checkpoint: {newest}); lower hyperparameters.learningRate, check the data, "
            "or use precision bf16 instead of fp16"
        )
        if self.config.run_policy.non_finite_loss == "restart":
            raise RetryableError(message, reason=NON_FINITE_LOSS)
        raise NonRetryableError(message, reason=NON_FINITE_LOSS)

    def _log(self, loss_sum: torch.Tensor, tokens: torch.Tensor, seconds: float, steps: int) -> None:
        totals = torch.stack([loss_sum, tokens])
        dist.all_reduce(totals)
        micro_steps = steps * self.hp.gradient_accumulation_steps * self.ranks.world_size
        train_loss = totals[0].item() / max(micro_steps, 1)
        if not math.isfinite(train_loss):
            self._non_finite_loss(train_loss)
        tokens_per_second = totals[1].item() / max(seconds, 1e-9)
        self.progress.timed_steps(steps, seconds)
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

    def _evaluate(self) -> dict[str, float]:
        """The evaluation set's finite metrics, recorded in the history at this step."""
        fault_point("evaluate", self.state.step)
        self.gang.beat()
        settings = self.config.evaluation.generation
        generation = (
            Generation(settings, self.tokenizer, synced=self.config.deepspeed.zero_stage == 3)
            if settings is not None
            else None
        )
        metrics = evaluate(
            self.engine,
            self.eval_examples,
            self._collate,
            self.hp.batch_size_per_device,
            self.ranks.device,
            self.labels,
            generation,
            self.gang.beat,
        )
        self.gang.beat()
        metrics, notes = finite_metrics(metrics)
        for note in notes:
            logger.warning("step %d evaluation: %s", self.state.step, note)
        self.history.record(self.state.step, **metrics)
        if self.ranks.rank == 0:
            logger.info("step %d evaluation: %s", self.state.step, json.dumps(metrics))
        return metrics

    def _evaluate_base(self) -> None:
        """The model before its first step: history step 0 and the base metrics (/progress baseMetrics),
        what the fine-tune's metrics are compared with. Its evalLoss is early stopping's first best, so
        patience counts evaluations that do not beat the base model either; it is no evaluation without
        improvement itself, and not the trained model's evalMetrics or final metrics."""
        metrics = self._evaluate()
        self.state.base_metrics = metrics
        self.state.best_eval_loss = metrics.get("evalLoss")
        self.progress.update(base_metrics=metrics)

    def _evaluate_and_should_stop(self) -> bool:
        """Evaluates the model being trained; True when early stopping's patience has run out."""
        metrics = self._evaluate()
        self.last_eval = metrics
        self.progress.update(eval_metrics=metrics)
        state = self.state
        if "evalLoss" not in metrics:
            return False
        if state.best_eval_loss is None or metrics["evalLoss"] < state.best_eval_loss:
            state.best_eval_loss = metrics["evalLoss"]
            state.evaluations_without_improvement = 0
            return False
        state.evaluations_without_improvement += 1
        patience = self.hp.early_stopping_patience
        if patience is not None and state.evaluations_without_improvement >= patience:
            logger.info("early stopping at step %d: no improvement in %d evaluations", state.step, patience)
            return True
        return False

    # --- checkpoints and outputs ------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Saves the engine with the loop state as its client state; the upload runs in the background."""
        metrics = {"evalLoss": self.last_eval["evalLoss"]} if "evalLoss" in self.last_eval else {}
        fault_point("checkpoint-save", self.state.step)
        waited = self.checkpointer.save(self.engine, self.state.step, self.state.client_state(), metrics)
        self.gang.beat()
        if self.ranks.rank == 0:
            logger.info(
                "checkpoint step-%d saved locally in %.2fs; uploading in the background",
                self.state.step,
                waited,
            )

    def _record_finished_checkpoint(self, wait: bool) -> None:
        fault_point("checkpoint-finish", self.state.step)
        entry = self.checkpointer.finish_pending(wait=wait)
        if entry is not None:
            self.progress.update(latest_checkpoint=entry, checkpoints=list(self.checkpointer.completed))

    def final_metrics(self) -> dict[str, float]:
        final: dict[str, float] = {}
        train_loss = self.history.latest("trainLoss")
        if train_loss is not None:
            final["trainLoss"] = train_loss
        return final | self.last_eval

    def save_outputs(self, final_metrics: dict[str, float]) -> str:
        """Writes the model, its metrics and its card to the output URI; returns the model's URI.

        A model whose final metrics miss evaluation.gate goes to ``rejected/`` and the run fails with
        reason EvalGateNotMet, non-retryable: a restart would train the same model again. Every rank
        decides alike, from the same all-reduced metrics."""
        rejection = gate_failure(self.config.evaluation.gate, final_metrics)
        with returning_freed_memory(self.loop_mmap_threshold):
            release_optimizer_states(self.engine)
            model_uri = write_outputs(
                self.config,
                self.store,
                self.engine,
                self.tokenizer,
                self.workspace / "output",
                self.ranks.rank,
                final_metrics,
                self.state.history,
                rejection,
            )
        if rejection is not None:
            message = f"evaluation gate not met: {rejection} (model written to {model_uri})"
            # Every rank fails alike, and the first to report it ends the others wherever they are: each
            # rank's log goes up first, so that all of them are there, not only the first's.
            logger.warning("%s", message)
            upload_log(
                self.config,
                self.ranks.rank,
                rank_log_path(self.workspace, self.ranks.rank),
                LOG_UPLOAD_SECONDS,
            )
            dist.barrier()
            raise NonRetryableError(message, reason=EVAL_GATE_NOT_MET)
        return model_uri

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.stop()


def run(config: TrainerConfig, gang: Gang) -> RunResult:
    """Every rank runs this: the recipe from setup to outputs; the server stops whatever happens."""
    recipe = FinetuneRecipe(config, gang)
    try:
        recipe.setup()
        outcome = recipe.train()
        final_metrics = recipe.final_metrics()
        output_model = recipe.save_outputs(final_metrics) if outcome == "succeeded" else ""
        return RunResult(outcome, recipe.state.step, final_metrics, output_model)
    finally:
        recipe.cleanup()

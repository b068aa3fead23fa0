"""The run's results in S3: the model (adapter or full weights), metrics, configuration, model card.

Layout under the job's output URI: ``model/`` (loadable with ``from_pretrained``; for LoRA the
adapter, and with ``saveMerged`` the merged weights in ``model/merged/``; its README.md is the model
card), ``metrics.json`` (``final`` and ``history``), ``config.json`` (the resolved configuration,
lineage included: model.uri and model.adapter), ``README.md`` (the model card), ``loss.png`` (train
and eval loss against step) and ``logs/rank-<N>.log`` (each rank's own log).

When the final metrics miss ``evaluation.gate`` the model goes to ``rejected/`` instead and the job
fails (reason EvalGateNotMet). A pipeline that promotes ``model/`` must never find a rejected model
there, whatever an earlier attempt or an earlier job with the same output URI left: a rejected run
deletes ``model/`` before it writes ``rejected/``, and an accepted one deletes ``rejected/``, so the
output holds one model, the one its metrics.json and README.md describe. ``model/`` of a job that
is still running may yet be deleted by its gate: promote it only once the job has Succeeded.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import deepspeed
import torch.distributed as dist

from finetune_trainer.config import ADAPTER_METHODS, GateConfig, TrainerConfig
from finetune_trainer.fault_injection import fault_point
from finetune_trainer.storage import ObjectStore, join_uri
from finetune_trainer.summary import EVAL_GATE_NOT_MET

logger = logging.getLogger(__name__)

MODEL = "model"  # an accepted model: what pipelines promote
# How long a rank's log upload may take (upload_log): at the end of a run, and briefly after a failure
# (it delays the gang's abort mark) or a stop (within the pod's grace period).
LOG_UPLOAD_SECONDS = 60.0
LOG_UPLOAD_BRIEFLY_SECONDS = 5.0
REJECTED = "rejected"  # a model whose final metrics missed evaluation.gate


def gate_failure(gate: GateConfig | None, metrics: dict[str, float]) -> str | None:
    """How the final metrics miss the gate ("answerAccuracy 0.42, needs >= 0.8"); None when it holds or
    there is none. A gate metric absent from the final metrics (never computed, or not finite) misses."""
    if gate is None:
        return None
    needs = gate.words().removeprefix(f"{gate.metric} ")
    value = metrics.get(gate.metric)
    if value is None:
        present = ", ".join(sorted(metrics)) or "none"
        return f"{gate.metric} is not among the final metrics ({present}), needs {needs}"
    return None if gate.holds(value) else f"{gate.metric} {value:.4g}, needs {needs}"


def _save_model(config: TrainerConfig, engine: Any, tokenizer: Any, directory: Path, rank: int) -> None:
    """Every rank takes part (ZeRO-3 gathers the sharded weights); rank 0 writes.

    Under ZeRO-3 no rank gathers more than it writes: a LoRA adapter gathers only the adapter's
    (trainable) parameters, the frozen base stays partitioned; full weights come from DeepSpeed's
    consolidated 16-bit state dict, gathered one module at a time onto rank 0 (the other ranks hold a
    module at a time). Only ``saveMerged`` gathers the whole model on every rank, for peft's merge."""
    module = engine.module
    if config.deepspeed.zero_stage == 3:
        # The last evaluation's forward may leave prefetched parameters in flight, which a gather's
        # re-partitioning refuses ("Cannot partition a param in flight"): settle and release them first.
        engine.empty_partition_cache()
    adapter = config.method.type in ADAPTER_METHODS
    merged = config.output.save_merged and adapter
    if config.deepspeed.zero_stage == 3 and not merged:
        if adapter:
            trainable = [p for p in module.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
                if rank == 0:
                    module.save_pretrained(directory, safe_serialization=True)
        else:
            state = engine._zero3_consolidated_16bit_state_dict()  # rank 0's; None on the others
            if rank == 0:
                module.save_pretrained(directory, state_dict=state, safe_serialization=True)
                del state
        if rank == 0:
            tokenizer.save_pretrained(directory)
        dist.barrier()
        return
    parameters = list(module.parameters())
    gather = config.deepspeed.zero_stage == 3
    context = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if gather else nullcontext()
    with context:
        if rank == 0:
            module.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
            if merged:
                unloaded = module.merge_and_unload()
                unloaded.save_pretrained(directory / "merged", safe_serialization=True)
                tokenizer.save_pretrained(directory / "merged")
    dist.barrier()


def loss_curve_png(history: list[dict[str, Any]], title: str) -> bytes:
    """Train and eval loss against step, as a PNG (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    for metric, label in (("trainLoss", "train loss"), ("evalLoss", "eval loss")):
        points = [(e["step"], e[metric]) for e in history if metric in e]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if metric == "evalLoss" else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    return buffer.getvalue()


def metric_lines(metrics: dict[str, float], history: list[dict[str, Any]]) -> list[str]:
    """One line per final metric, with the base model's value beside it where the history starts with
    an evaluation before training (step 0): what the fine-tune changed."""
    base = history[0] if history and history[0].get("step") == 0 else {}
    lines = []
    for name, value in sorted(metrics.items()):
        before = base.get(name)
        known = isinstance(before, int | float) and not isinstance(before, bool)
        lines.append(f"- {name}: {value:.4f}" + (f" (base model: {before:.4f})" if known else ""))
    return lines


def card_rows(config: TrainerConfig, rejection: str | None) -> list[tuple[str, str]]:
    """The card's table: what was trained, from what (lineage), how, and whether the gate held."""
    hp = config.hyperparameters
    method = config.method.type
    if config.method.lora is not None:
        lora = config.method.lora
        method += (
            f" (r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, modules {lora.target_modules})"
        )
    if config.method.freeze is not None:
        method += f" (top {config.method.freeze.trainable_layers} blocks)"
    length = f"{hp.epochs} epoch(s)" if hp.epochs is not None else f"{hp.max_steps} steps"
    rows = [("Base model", config.model.uri)]
    if config.model.adapter is not None:
        rows.append(("Continued from", config.model.adapter))
    rows += [
        ("Training data", f"{config.dataset.train} ({config.dataset.format})"),
        (
            "Evaluation data",
            config.dataset.eval
            or (
                f"{config.dataset.eval_split:.0%} of the training rows"
                if config.dataset.eval_split
                else "none"
            ),
        ),
        ("Method", method),
        ("Length", length),
        ("Learning rate", f"{hp.learning_rate:g} ({hp.lr_scheduler}, warmup {hp.warmup_ratio:g})"),
        (
            "Batch",
            f"{hp.batch_size_per_device} per device x {hp.gradient_accumulation_steps} accumulation x "
            f"{config.distributed.world_size} ranks",
        ),
        ("Precision", hp.precision),
        ("DeepSpeed", f"ZeRO-{config.deepspeed.zero_stage}, offload {config.deepspeed.offload}"),
        ("Sequence length", f"{config.dataset.max_seq_length}{', packed' if config.dataset.packing else ''}"),
        ("Seed", str(hp.seed)),
    ]
    if config.evaluation.gate is not None:
        rows.append(
            ("Evaluation gate", f"{config.evaluation.gate.words()}: {'not met' if rejection else 'met'}")
        )
    return rows


def loading_lines(config: TrainerConfig, model_uri: str) -> list[str]:
    """How to load the model, as code that runs as written once the placeholders name local copies."""
    model = f'"<local copy of {model_uri}>"'
    if config.method.type not in ADAPTER_METHODS:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({model})",
            f"tokenizer = AutoTokenizer.from_pretrained({model})",
            "```",
        ]
    lines = [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("<local copy of {config.model.uri}>")',
        f"model = PeftModel.from_pretrained(base, {model})",
        f"tokenizer = AutoTokenizer.from_pretrained({model})",
        "```",
        "",
        "`adapter_config.json` names the base model by its S3 URI (`base_model_name_or_path`), which",
        "transformers cannot open: `AutoPeftModelForCausalLM.from_pretrained`, which loads the base from",
        "that field, works only once the field is set to the local copy's path.",
    ]
    if config.output.save_merged:
        lines += [
            "",
            f"The adapter merged into full weights is `{model_uri}merged/`, loaded by",
            f'`AutoModelForCausalLM.from_pretrained("<local copy of {model_uri}merged/>")` alone.',
        ]
    return lines


def model_card(
    config: TrainerConfig,
    metrics: dict[str, float],
    history: list[dict[str, Any]],
    model_uri: str,
    rejection: str | None,
) -> str:
    """The README.md beside the model: lineage, training settings, final metrics, how to load it, and,
    for a rejected model, that it is rejected and why."""
    lines = [
        f"# {config.job.name}",
        "",
        f"Fine-tuned by finetune-operator (FinetuneJob `{config.job.namespace}/{config.job.name}`) on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
    ]
    if rejection is not None:
        lines += [
            f"**Rejected: evaluation gate not met: {rejection}.** The model is in `{REJECTED}/`, not "
            f"`{MODEL}/`, and the job failed (reason {EVAL_GATE_NOT_MET}): do not deploy it.",
            "",
        ]
    lines += [
        "| | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in card_rows(config, rejection)),
        "",
        "## Final metrics",
        "",
        *metric_lines(metrics, history),
        "",
        "## Loading",
        "",
        f"Copy the model (`{model_uri}`)"
        + (f" and its base model (`{config.model.uri}`)" if config.method.type in ADAPTER_METHODS else "")
        + " to local folders (e.g. `aws s3 cp --recursive`) and put their paths in place of the",
        "`<local copy of ...>` placeholders:",
        "",
        *loading_lines(config, model_uri),
        "",
    ]
    return "\n".join(lines)


def write_outputs(
    config: TrainerConfig,
    store: ObjectStore,
    engine: Any,
    tokenizer: Any,
    directory: Path,
    rank: int,
    final_metrics: dict[str, float],
    history: list[dict[str, Any]],
    rejection: str | None,
) -> str:
    """Writes everything to the store (rank 0) and returns the model's URI: ``model/``, or ``rejected/``
    when the final metrics missed the gate (``rejection`` says how; every rank passes the same)."""
    folder = REJECTED if rejection is not None else MODEL
    model_uri = join_uri(config.output.uri, folder) + "/"
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    _save_model(config, engine, tokenizer, directory / folder, rank)
    if rank == 0:
        card = model_card(config, final_metrics, history, model_uri, rejection).encode()
        # In the model's own folder too, in place of peft's template (which names the trainer's deleted copy).
        (directory / folder / "README.md").write_bytes(card)
        # The other folder may hold an earlier attempt's or an earlier job's model (see the module's doc).
        store.delete_prefix(join_uri(config.output.uri, REJECTED if rejection is None else MODEL) + "/")
        store.upload_directory(directory / folder, model_uri)
        fault_point("outputs")
        documents = {
            "metrics.json": (
                json.dumps({"final": final_metrics, "history": history}, indent=2, allow_nan=False).encode(),
                "application/json",
            ),
            "config.json": (config.to_json().encode(), "application/json"),
            "README.md": (card, "text/markdown"),
            "loss.png": (loss_curve_png(history, config.job.name), "image/png"),
        }
        for name, (content, content_type) in documents.items():
            store.put_bytes(join_uri(config.output.uri, name), content, content_type)
    dist.barrier()
    return model_uri


def upload_log(config: TrainerConfig, rank: int, log: Path, timeout: float) -> None:
    """Best effort, within ``timeout`` seconds: this rank's log file to ``<output>/logs/rank-<N>.log``.
    A store that does not answer must neither fail nor hold up a run (or a failure's report), so the
    upload runs in a daemon thread that the process's exit abandons, and any error is a warning."""
    uri = join_uri(config.output.uri, "logs", f"rank-{rank}.log")

    def put() -> None:
        try:
            ObjectStore.from_config(config.storage).put_bytes(uri, log.read_bytes(), "text/plain")
        except Exception as error:  # whatever it is, the run's own outcome stands
            logger.warning("cannot upload this rank's log to %s: %s", uri, error)

    upload = threading.Thread(target=put, name="log-upload", daemon=True)
    upload.start()
    upload.join(timeout)
    if upload.is_alive():
        logger.warning("uploading this rank's log to %s took over %.0fs: left unfinished", uri, timeout)

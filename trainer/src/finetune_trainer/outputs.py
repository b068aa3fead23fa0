"""The run's results in S3: the model (adapter or full weights), metrics, configuration, model card.

Layout under the job's output URI: ``model/`` (loadable with ``from_pretrained``; for LoRA the
adapter, and with ``saveMerged`` the merged weights in ``model/merged/``), ``metrics.json``
(``final`` and ``history``), ``config.json`` (the resolved configuration), ``README.md`` and
``loss.png`` (train and eval loss against step).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import deepspeed
import torch.distributed as dist

from finetune_trainer.config import ADAPTER_METHODS, TrainerConfig
from finetune_trainer.fault_injection import fault_point
from finetune_trainer.storage import ObjectStore, join_uri


def _save_model(config: TrainerConfig, engine: Any, tokenizer: Any, directory: Path, rank: int) -> None:
    """Every rank takes part (ZeRO-3 gathers the sharded weights); rank 0 writes."""
    module = engine.module
    parameters = list(module.parameters())
    gather = config.deepspeed.zero_stage == 3
    context = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if gather else nullcontext()
    with context:
        if rank == 0:
            module.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
            if config.output.save_merged and config.method.type in ADAPTER_METHODS:
                merged = module.merge_and_unload()
                merged.save_pretrained(directory / "merged", safe_serialization=True)
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


def model_card(config: TrainerConfig, metrics: dict[str, float]) -> str:
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
    rows = [
        ("Base model", config.model.uri),
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
    lines = [
        f"# {config.job.name}",
        "",
        f"Fine-tuned by finetune-operator (FinetuneJob `{config.job.namespace}/{config.job.name}`) on "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "## Final metrics",
        "",
        *(f"- {name}: {value:.4f}" for name, value in sorted(metrics.items())),
        "",
    ]
    if config.method.type in ADAPTER_METHODS:
        lines += [
            "## Loading",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")',
            "```",
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
) -> str:
    """Writes everything to S3 (rank 0) and returns the model's URI."""
    model_uri = join_uri(config.output.uri, "model") + "/"
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    _save_model(config, engine, tokenizer, directory / "model", rank)
    if rank == 0:
        store.upload_directory(directory / "model", model_uri)
        fault_point("outputs")
        documents = {
            "metrics.json": (
                json.dumps({"final": final_metrics, "history": history}, indent=2, allow_nan=False).encode(),
                "application/json",
            ),
            "config.json": (config.to_json().encode(), "application/json"),
            "README.md": (model_card(config, final_metrics).encode(), "text/markdown"),
            "loss.png": (loss_curve_png(history, config.job.name), "image/png"),
        }
        for name, (content, content_type) in documents.items():
            store.put_bytes(join_uri(config.output.uri, name), content, content_type)
    dist.barrier()
    return model_uri

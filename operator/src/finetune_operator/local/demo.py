"""``finetune demo``: the whole product on a tiny model, on this machine, in a few minutes.

It builds a tiny Llama model and a small chat dataset (offline), writes a FinetuneJob for a 2-rank
LoRA fine-tune, runs it with ``finetune run --store`` (a local folder as the store, no server), then
reloads the fine-tuned adapter and asks it one question.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.local.run import local_path, run_local

DEMO_QUESTION = "What is the capital of France?"


def demo_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "capitals-lora", "namespace": "demo"},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama/"},
            "dataset": {"train": "s3://datasets/capitals/train.jsonl", "evalSplit": 0.1, "maxSeqLength": 64},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
            "hyperparameters": {
                "epochs": 12,
                "learningRate": 5.0e-3,
                "batchSizePerDevice": 8,
                "precision": "fp32",
                "warmupRatio": 0.05,
            },
            "deepspeed": {"zeroStage": 2},
            "resources": {"nodes": 2, "gpusPerNode": 0},
            "output": {"uri": "s3://outputs/capitals-lora/", "checkpointEverySteps": 40},
            "evaluation": {"everySteps": 20},
        },
    }


def prepare(directory: Path) -> Path:
    """The demo's store folder (buckets models/, datasets/, outputs/) and manifest; returns the manifest."""
    from finetune_trainer.tiny import build_tiny_model, demo_rows

    store = directory / "s3"
    build_tiny_model(store / "models" / "tiny-llama")
    data = store / "datasets" / "capitals" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(240)))
    # A fresh start each time: an earlier demo's checkpoints would otherwise be resumed.
    shutil.rmtree(store / "outputs", ignore_errors=True)
    (store / "outputs").mkdir()
    manifest = directory / "finetunejob.yaml"
    manifest.write_text(yaml.safe_dump(demo_manifest(), sort_keys=False))
    return manifest


def answer(base_model: Path, adapter: Path, question: str) -> str:
    """The fine-tuned model's greedy answer to one chat question."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_demo(directory: Path, out: TextIO = sys.stdout) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    out.write(f"building a tiny model and a chat dataset in {directory}\n")
    manifest_path = prepare(directory)
    out.write(f"the FinetuneJob: {manifest_path}\n")
    job = parse_finetune_job(yaml.safe_load(manifest_path.read_text()))
    store = directory / "s3"
    code, _ = run_local(job, store=store, out=out)
    if code != 0:
        return code
    output = local_path(job.spec.output.uri, store)
    out.write(
        f"\nmodel (LoRA adapter): {output / 'model'}\n"
        f"metrics:              {output / 'metrics.json'}\n"
        f"loss curve:           {output / 'loss.png'}\n"
        f"model card:           {output / 'README.md'}\n"
    )
    reply = answer(local_path(job.spec.model.uri, store), output / "model", DEMO_QUESTION)
    out.write(f"\n> {DEMO_QUESTION}\n{reply}\n")
    return 0

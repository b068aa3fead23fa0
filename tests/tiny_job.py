"""The tiny-model FinetuneJob that `finetune run`'s tests train: a 2-rank LoRA fine-tune of a random
tiny Llama on capital-city chats, seconds on a CPU (the demo trains the real model; these tests check
the runner, not quality)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml


def tiny_manifest() -> dict[str, Any]:
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


def prepare_tiny(directory: Path) -> Path:
    """The store folder (buckets models/, datasets/, outputs/) and the manifest; returns the manifest."""
    from finetune_trainer.tiny import build_tiny_model, demo_rows

    store = directory / "s3"
    build_tiny_model(store / "models" / "tiny-llama")
    data = store / "datasets" / "capitals" / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(240)))
    shutil.rmtree(store / "outputs", ignore_errors=True)
    (store / "outputs").mkdir()
    manifest = directory / "finetunejob.yaml"
    manifest.write_text(yaml.safe_dump(tiny_manifest(), sort_keys=False))
    return manifest

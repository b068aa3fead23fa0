"""Evaluation: loss, perplexity and token accuracy; for classification, label accuracy, precision,
recall and macro F1.

Every rank evaluates its share and the sums are all-reduced. Ranks run the same number of forward
passes (short shares are padded with batches that carry no loss), because under ZeRO-3 every
forward is a collective.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from finetune_trainer.collectives import largest
from finetune_trainer.data import IGNORE_INDEX, Example, check_labels

Collate = Callable[[list[Example]], dict[str, torch.Tensor]]

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: "The CEO is Tobias Renk." -> "the ceo is
    tobias renk"."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def answer_matches(reply: str, reference: str, match: str) -> bool:
    """Whether a generated reply holds the reference answer (``contains``) or is it (``exact``), both
    normalised; an empty reference never matches."""
    wanted, got = normalise_answer(reference), normalise_answer(reply)
    if not wanted:
        return False
    if match == "exact":
        return got == wanted
    return f" {wanted} " in f" {got} "


@dataclass(frozen=True)
class LabelSet:
    """Classification labels and the token sequence of each, as it follows the prompt."""

    names: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]

    @classmethod
    def from_examples(cls, examples: list[Example], source: str = "the training data") -> LabelSet:
        """The labels of the training examples; a DataError (non-retryable) when there is only one,
        naming ``source`` (the dataset file)."""
        check_labels(examples, source)
        found: dict[str, tuple[int, ...]] = {}
        for example in examples:
            if example.label is not None and example.label not in found:
                start = _label_start(example)
                found[example.label] = tuple(example.input_ids[start:])
        names = tuple(sorted(found))
        return cls(names, tuple(found[name] for name in names))


def _label_start(example: Example) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def _batches(
    share: list[Example], filler: Example, batch_size: int, device: torch.device
) -> list[list[Example]]:
    """This rank's batches, padded to the longest share among ranks with loss-free copies of ``filler``."""
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    blank = Example(filler.input_ids, [IGNORE_INDEX] * len(filler.input_ids))
    return batches + [[blank]] * (largest(len(batches), device) - len(batches))


@torch.no_grad()
def _language_model_sums(
    engine: Any, batches: list[list[Example]], collate: Collate, device: torch.device
) -> torch.Tensor:
    """[sum of token losses, loss tokens, correctly predicted tokens] on this rank."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        inputs = {k: v.to(device) for k, v in collate(batch).items()}
        logits = engine(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = inputs["labels"][:, 1:]
        mask = shift_labels != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
        sums += torch.stack([losses.double(), mask.sum().double(), correct.double()])
    return sums


@torch.no_grad()
def _label_scores(
    engine: Any, example: Example, labels: LabelSet, collate: Collate, device: torch.device
) -> int:
    """The index of the label the model finds most likely after the example's prompt."""
    prompt = example.input_ids[: _label_start(example)]
    candidates = [
        Example(prompt + list(tokens), [IGNORE_INDEX] * len(prompt) + list(tokens))
        for tokens in labels.tokens
    ]
    inputs = {k: v.to(device) for k, v in collate(candidates).items()}
    logits = engine(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = inputs["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return int((picked * mask).sum(-1).argmax().item())


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 from a confusion matrix (rows gold, columns predicted)."""
    confusion = confusion.double()
    total = confusion.sum().item()
    true_positive = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    precision = torch.where(
        predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted)
    )
    recall = torch.where(actual > 0, true_positive / actual.clamp(min=1), torch.zeros_like(actual))
    denominator = precision + recall
    f1 = torch.where(
        denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), torch.zeros_like(denominator)
    )
    present = actual > 0
    return {
        "accuracy": true_positive.sum().item() / total if total else 0.0,
        "precision": precision[present].mean().item() if present.any() else 0.0,
        "recall": recall[present].mean().item() if present.any() else 0.0,
        "f1": f1[present].mean().item() if present.any() else 0.0,
    }


def evaluate(
    engine: Any,
    examples: list[Example],
    collate: Collate,
    batch_size: int,
    device: torch.device,
    labels: LabelSet | None = None,
) -> dict[str, float]:
    """Metrics over the whole evaluation set, each rank taking every world-size-th example; the same
    numbers on every rank."""
    share = examples[dist.get_rank() :: dist.get_world_size()]
    engine.eval()
    try:
        sums = _language_model_sums(engine, _batches(share, examples[0], batch_size, device), collate, device)
        dist.all_reduce(sums)
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        metrics = {
            "evalLoss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "tokenAccuracy": (sums[2] / sums[1].clamp(min=1)).item(),
        }
        if labels is not None and labels.names:
            metrics |= _classify(engine, share, examples, labels, collate, device)
    finally:
        engine.train()
    return metrics


def _classify(
    engine: Any,
    share: list[Example],
    examples: list[Example],
    labels: LabelSet,
    collate: Collate,
    device: torch.device,
) -> dict[str, float]:
    size = len(labels.names)
    confusion = torch.zeros(size, size, dtype=torch.float64, device=device)
    scored = [e for e in share if e.label in labels.names]
    filler = next(e for e in examples if e.label in labels.names)
    for index in range(largest(len(scored), device)):
        if index < len(scored):
            example = scored[index]
            predicted = _label_scores(engine, example, labels, collate, device)
            assert example.label is not None
            confusion[labels.names.index(example.label), predicted] += 1
        else:
            _label_scores(engine, filler, labels, collate, device)  # keeps ZeRO-3's collectives in step
    dist.all_reduce(confusion)
    return classification_metrics(confusion)

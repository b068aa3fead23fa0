"""Evaluation: loss, perplexity and token accuracy; for classification, label accuracy, precision,
recall and macro F1; with evaluation.generation, answerAccuracy (greedy replies against references).

Every rank evaluates its share and the sums are all-reduced. Ranks run the same number of forward
passes (short shares are padded with batches that carry no loss), because under ZeRO-3 every
forward is a collective; for the same reason generation decodes in lockstep there (synced_gpus).
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
from finetune_trainer.config import GenerationConfig
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
class Generation:
    """What answerAccuracy needs besides the engine: the settings, the tokenizer that pads prompts and
    decodes replies, and whether ranks decode in lockstep (ZeRO-3: every forward gathers parameters
    from all ranks, so a rank whose replies ended early must keep stepping with the others)."""

    settings: GenerationConfig
    tokenizer: Any
    synced: bool


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
    generation: Generation | None = None,
    beat: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Metrics over the whole evaluation set, each rank taking every world-size-th example; the same
    numbers on every rank. ``beat`` is called after each generated batch: generation can take longer
    than the stall timeout."""
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
        if generation is not None:
            metrics |= _answer_accuracy(engine, share, examples, generation, batch_size, device, beat)
    finally:
        engine.train()
    return metrics


def left_padded(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask with the padding on the left, so that every row's reply starts at
    the same column."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and the model's own end tokens (an instruct model often ends a turn with
    another token than its EOS, listed in generation_config.json)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(token for token in listed if isinstance(token, int))})


@torch.no_grad()
def _replies(engine: Any, batch: list[Example], generation: Generation, device: torch.device) -> list[str]:
    """Greedy replies to the batch's prompts, up to max_new_tokens each, each ending at its stop token.

    use_cache is asked for here, per call: gradient checkpointing turns it off in the model's
    configuration, which training needs as it is."""
    tokenizer = generation.tokenizer
    model = engine.module
    prompts = [example.input_ids[: example.prompt_length] for example in batch]
    inputs = {k: v.to(device) for k, v in left_padded(prompts, tokenizer.pad_token_id).items()}
    output = model.generate(
        **inputs,
        max_new_tokens=generation.settings.max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=_stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=generation.synced,
    )
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _answer_accuracy(
    engine: Any,
    share: list[Example],
    examples: list[Example],
    generation: Generation,
    batch_size: int,
    device: torch.device,
    beat: Callable[[], None],
) -> dict[str, float]:
    """answerAccuracy: the share of evaluation rows with a prompt whose reply matches their reference.

    Rows whose prompt did not fit in maxSeqLength are not asked. Ranks make the same number of generate
    calls: a short share is padded with batches of one filler row, whose replies are not counted."""
    asked = [example for example in share if example.prompt_length is not None]
    filler = next((example for example in examples if example.prompt_length is not None), None)
    if filler is None:  # every rank holds the same examples, so every rank skips alike
        return {}
    batches = [asked[i : i + batch_size] for i in range(0, len(asked), batch_size)]
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # [matched, asked]
    for index in range(largest(len(batches), device)):
        batch = batches[index] if index < len(batches) else [filler]
        replies = _replies(engine, batch, generation, device)
        beat()
        if index < len(batches):
            matched = sum(
                answer_matches(reply, example.reference or "", generation.settings.match)
                for reply, example in zip(replies, batch, strict=True)
            )
            counts += torch.tensor([matched, len(batch)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return {"answerAccuracy": (counts[0] / counts[1]).item()}


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

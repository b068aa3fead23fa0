"""A tiny Llama-architecture model and tokenizer, built in-process, for tests and demos.

No PyPI package ships a causal LM and tests must run offline, so this trains a byte-level BPE tokenizer
on a small built-in corpus and saves a randomly initialised 2-layer Llama next to it. The directory
loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` under ``HF_HUB_OFFLINE=1`` like any real model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
# Ends every chat turn and every sequence, as <|im_end|> does for Qwen and <|eot_id|> for Llama 3.
EOS_TOKEN = "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is "<|role|>\n{content}<|end|>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CAPITALS = (
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"),
    ("Hungary", "Budapest"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Australia", "Canberra"),
)
QUESTIONS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital of {country}.",
)
ANSWER = "The capital of {country} is {capital}."

_PROSE = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction:
### Input:
### Response:
### System:
### User:
### Assistant:
Label: positive negative neutral billing support sales
The quick brown fox jumps over the lazy dog. A small model learns to answer short questions.
You are a helpful assistant. Answer the question in one sentence, and say so when you do not know.
Summarise the text. Translate the sentence. Classify the ticket. The answer is yes. The answer is no.
Hello, how are you? I am fine, thank you. What time is it? It is ten o'clock in the morning.
"""


def default_corpus() -> list[str]:
    """Prose, the prompt scaffolding data.py writes, and the demo questions, so they tokenize compactly."""
    lines = _PROSE.splitlines()
    for country, capital in CAPITALS:
        lines += [question.format(country=country) for question in QUESTIONS]
        lines.append(ANSWER.format(country=country, capital=capital))
    return lines


def build_tiny_model(
    directory: Path,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """Saves a random-weight Llama and its tokenizer into ``directory`` (created) and returns it.

    The tokenizer adds BOS like Llama's does; without ``chat_template`` it has no template, which is how
    the trainer's fallback chat rendering gets exercised.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        default_corpus() if corpus is None else corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG stream: the same seed gives the same weights without touching the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def demo_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` chat rows asking for capitals: short and repetitive enough for a tiny model to memorise."""
    pairs = [(question, country, capital) for country, capital in CAPITALS for question in QUESTIONS]
    random.Random(seed).shuffle(pairs)
    rows = []
    for index in range(n):
        question, country, capital = pairs[index % len(pairs)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question.format(country=country)},
                    {"role": "assistant", "content": ANSWER.format(country=country, capital=capital)},
                ]
            }
        )
    return rows

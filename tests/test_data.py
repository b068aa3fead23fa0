"""Rows -> token sequences and loss masks for every dataset format, the row problems the report names,
and the tiny offline model those sequences train.

Masks are checked exactly: ``loss_runs`` decodes each contiguous run of loss-carrying tokens, so a
case states both the whole rendered sequence and precisely which parts of it the model learns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub.constants
import pytest
from finetune_trainer import data
from finetune_trainer.config import DatasetConfig
from finetune_trainer.data import (
    IGNORE_INDEX,
    MAX_ROW_BYTES,
    OVERSIZED_ROW,
    DataError,
    DataReport,
    Example,
    UnreadableRow,
    check_labels,
    check_usable,
    classification_labels,
    collate,
    eval_flags,
    load_rows,
    pack,
    prepare,
    split_eval,
)
from finetune_trainer.tiny import CHAT_TEMPLATE, build_tiny_model, demo_rows


def dataset(fmt: str, columns: dict[str, str] | None = None, max_seq_length: int = 512) -> DatasetConfig:
    return DatasetConfig(
        train="s3://data/train.jsonl",
        eval=None,
        eval_split=None,
        format=fmt,
        columns=columns or {},
        max_seq_length=max_seq_length,
        packing=False,
    )


def loss_runs(example: Example, tokenizer: Any) -> list[str]:
    """The decoded runs of consecutive tokens that carry loss (whose label is their own id)."""
    runs: list[list[int]] = [[]]
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            runs.append([])
        else:
            assert label == token
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs if run]


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


HELLO = chat(
    ("system", "Be brief."),
    ("user", "Hi"),
    ("assistant", "Hello."),
    ("user", "Bye"),
    ("assistant", "Bye now."),
)
ALPACA_INTRO = "Below is an instruction that describes a task"
REQUEST = "Write a response that appropriately completes the request.\n\n"

# (id, tokenizer, format, columns, row, the whole decoded sequence, its loss runs, Example.label)
FORMAT_CASES: list[tuple[str, str, str, dict[str, str], dict[str, Any], str, list[str], str | None]] = [
    (
        "chat-template",
        "template",
        "chat",
        {},
        {"messages": HELLO},
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\nBye now.<|end|>",
        ["Hello.<|end|>\n", "Bye now.<|end|>"],
        None,
    ),
    (
        "chat-template-ends-with-user",
        "template",
        "chat",
        {},
        {"messages": HELLO[:4]},
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\nBye<|end|>",
        ["Hello.<|end|>\n"],
        None,
    ),
    (
        "chat-renamed-column",
        "template",
        "chat",
        {"messages": "conversations"},
        {"conversations": chat(("user", "Hi"), ("assistant", "Hello."))},
        "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>",
        ["Hello.<|end|>"],
        None,
    ),
    (
        "chat-fallback",
        "fallback",
        "chat",
        {},
        {"messages": HELLO},
        "<|bos|>### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.<|end|>\n\n"
        "### User:\nBye\n\n### Assistant:\nBye now.<|end|>",
        ["Hello.<|end|>", "Bye now.<|end|>"],
        None,
    ),
    (
        "chat-fallback-ends-with-user",
        "fallback",
        "chat",
        {},
        {"messages": HELLO[1:4]},
        "<|bos|>### User:\nHi\n\n### Assistant:\nHello.<|end|>\n\n### User:\nBye<|end|>",
        ["Hello.<|end|>"],
        None,
    ),
    (
        "chat-not-prefix-stable",
        "last-differs",
        "chat",
        {},
        {"messages": HELLO},
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\nBye<|end|>\n<|assistant|>\n<think></think>Bye now.<|end|>",
        ["Hello.<|end|>", "Bye now.<|end|>"],
        None,
    ),
    (
        "chat-assistant-first",
        "template",
        "chat",
        {},
        {"messages": chat(("assistant", "Welcome!"), ("user", "Thanks"), ("assistant", "Bye."))},
        "<|bos|><|assistant|>\nWelcome!<|end|>\n<|user|>\nThanks<|end|>\n<|assistant|>\nBye.<|end|>",
        ["Welcome!<|end|>", "Bye.<|end|>"],
        None,
    ),
    (
        "instruction-with-input",
        "template",
        "instruction",
        {},
        {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
        f"<|bos|>{ALPACA_INTRO}, paired with an input that provides further context. {REQUEST}"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n5<|end|>",
        ["5<|end|>"],
        None,
    ),
    (
        "instruction-null-input",
        "template",
        "instruction",
        {},
        {"instruction": "Say hi.", "input": None, "output": "Hi!"},
        f"<|bos|>{ALPACA_INTRO}. {REQUEST}### Instruction:\nSay hi.\n\n### Response:\nHi!<|end|>",
        ["Hi!<|end|>"],
        None,
    ),
    (
        "instruction-renamed-no-input",
        "template",
        "instruction",
        {"instruction": "prompt", "output": "answer"},
        {"prompt": "Say hi.", "answer": "Hi!"},
        f"<|bos|>{ALPACA_INTRO}. {REQUEST}### Instruction:\nSay hi.\n\n### Response:\nHi!<|end|>",
        ["Hi!<|end|>"],
        None,
    ),
    (
        "completion",
        "template",
        "completion",
        {},
        {"text": "The quick brown fox."},
        "<|bos|>The quick brown fox.<|end|>",
        ["The quick brown fox.<|end|>"],
        None,
    ),
    (
        "completion-renamed",
        "template",
        "completion",
        {"text": "body"},
        {"body": "Hello there."},
        "<|bos|>Hello there.<|end|>",
        ["Hello there.<|end|>"],
        None,
    ),
    (
        "classification",
        "template",
        "classification",
        {},
        {"text": "I was charged twice.", "label": "billing"},
        "<|bos|>I was charged twice.\n\nLabel: billing<|end|>",
        [" billing<|end|>"],
        "billing",
    ),
    (
        "classification-int-label-renamed",
        "template",
        "classification",
        {"text": "body", "label": "queue"},
        {"body": "It works now.", "queue": 3},
        "<|bos|>It works now.\n\nLabel: 3<|end|>",
        [" 3<|end|>"],
        "3",
    ),
]


@pytest.mark.parametrize(
    ("name", "flavour", "fmt", "columns", "row", "text", "runs", "label"),
    FORMAT_CASES,
    ids=[case[0] for case in FORMAT_CASES],
)
def test_format_masks(
    tokenizers: dict[str, Any],
    name: str,
    flavour: str,
    fmt: str,
    columns: dict[str, str],
    row: dict[str, Any],
    text: str,
    runs: list[str],
    label: str | None,
) -> None:
    tokenizer = tokenizers[flavour]
    examples, report = prepare([row], dataset(fmt, columns), tokenizer)
    assert report == DataReport(total_rows=1, usable_rows=1, problems={}, truncated_rows=0)
    (example,) = examples
    assert tokenizer.decode(example.input_ids) == text
    assert loss_runs(example, tokenizer) == runs
    assert example.label == label


def test_chat_template_output_matches_tokenizer(tokenizer: Any) -> None:
    """The chat tokens are the tokenizer's own chat templating, less the newline after the final EOS."""
    (example,), _ = prepare([{"messages": HELLO}], dataset("chat"), tokenizer)
    *expected, newline = tokenizer.apply_chat_template(HELLO)["input_ids"]
    assert tokenizer.decode([newline]) == "\n"
    assert example.input_ids == expected


def test_tiny_tokenizer_without_template(tmp_path: Path, offline: None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path, chat_template=False))
    assert tokenizer.chat_template is None
    (example,), _ = prepare([{"messages": HELLO[1:3]}], dataset("chat"), tokenizer)
    assert tokenizer.decode(example.input_ids).startswith("<|bos|>### User:\nHi\n\n### Assistant:\n")


# (format, columns, rows, reason -> row numbers); each row but the first has one problem.
PROBLEM_CASES: list[tuple[str, dict[str, str], list[Any], dict[str, list[int]]]] = [
    (
        "chat",
        {},
        [
            {"messages": chat(("user", "Hi"), ("assistant", "Hello."))},
            {"text": "Hi"},
            {"messages": "Hi"},
            {"messages": [{"role": "user"}]},
            {"messages": [{"role": "user", "content": ["parts"]}]},
            {"messages": chat(("tool", "{}"), ("assistant", "Done."))},
            {"messages": chat(("system", "Be brief."), ("user", "Hi"))},
            {"messages": chat(("user", "Hi"), ("assistant", "  "))},
            UnreadableRow("invalid JSON"),
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep"}]},
        ],
        {
            "missing column 'messages'": [2],
            "'messages' is not a list of {role: str, content: str}": [3, 4, 5],
            "unknown role 'tool'": [6],
            "no assistant turn": [7],
            "empty assistant message": [8],
            "invalid JSON": [9],
            "unknown role 'robot'": [10],
        },
    ),
    (
        "instruction",
        {"output": "answer"},
        [
            {"instruction": "Say hi.", "answer": "Hi!"},
            {"instruction": "Say hi.", "output": "Hi!"},
            {"instruction": "Say hi.", "answer": " "},
            {"instruction": 7, "answer": "Hi!"},
            {"instruction": "", "answer": "Hi!"},
            {"instruction": "Say hi.", "input": ["x"], "answer": "Hi!"},
            {"answer": "Hi!"},
        ],
        {
            "missing column 'answer'": [2],
            "empty 'answer'": [3],
            "'instruction' is not a string": [4],
            "empty 'instruction'": [5],
            "'input' is not a string": [6],
            "missing column 'instruction'": [7],
        },
    ),
    (
        "completion",
        {},
        [{"text": "Hello."}, {"body": "Hello."}, {"text": "   "}, {"text": None}, {"text": 5}],
        {"missing column 'text'": [2], "empty 'text'": [3, 4], "'text' is not a string": [5]},
    ),
    (
        "classification",
        {"label": "queue"},
        [
            {"text": "Refund please.", "queue": "billing"},
            {"text": "Refund please."},
            {"text": "Refund please.", "queue": None},
            {"text": "Refund please.", "queue": " "},
            {"text": "Refund please.", "queue": True},
            {"text": "Refund please.", "queue": 1.5},
            {"text": "Refund please.", "queue": 2.0},
            {"queue": "billing"},
        ],
        {
            "missing column 'queue'": [2],
            "empty 'queue'": [3, 4],
            "'queue' is not a string or integer": [5, 6],
            "missing column 'text'": [8],
        },
    ),
]


@pytest.mark.parametrize(
    ("fmt", "columns", "rows", "problems"), PROBLEM_CASES, ids=[case[0] for case in PROBLEM_CASES]
)
def test_problem_rows(
    tokenizer: Any, fmt: str, columns: dict[str, str], rows: list[Any], problems: dict[str, list[int]]
) -> None:
    examples, report = prepare(rows, dataset(fmt, columns), tokenizer)
    assert report.problems == problems
    assert report.total_rows == len(rows)
    assert (
        report.usable_rows == len(examples) == len(rows) - sum(len(numbers) for numbers in problems.values())
    )


@pytest.mark.parametrize(
    ("tokenizer_like", "message"),
    [
        (SimpleNamespace(eos_token_id=None, eos_token=None, is_fast=True), "no EOS token"),
        (SimpleNamespace(eos_token_id=2, eos_token="</s>", is_fast=False), "needs a tokenizer.json"),
    ],
)
def test_unusable_tokenizers(tokenizer_like: SimpleNamespace, message: str) -> None:
    with pytest.raises(DataError, match=message):
        prepare([{"text": "Hello."}], dataset("completion"), tokenizer_like)


def test_float_label_that_is_an_integer_is_stored_as_integer_text(tokenizer: Any) -> None:
    examples, _ = prepare([{"text": "Refund please.", "label": 2.0}], dataset("classification"), tokenizer)
    assert examples[0].label == "2"


def test_chat_template_errors_are_row_problems(tokenizer: Any, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tiny_dir)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('system messages are not supported') }}"
        "{% endif %}" + CHAT_TEMPLATE
    )
    rows = [{"messages": HELLO}, {"messages": HELLO[1:]}]
    examples, report = prepare(rows, dataset("chat"), strict)
    assert report.problems == {"chat template failed: system messages are not supported": [1]}
    assert len(examples) == 1

    shouting = AutoTokenizer.from_pretrained(tiny_dir)
    shouting.chat_template = CHAT_TEMPLATE.replace("message['content']", "message['content'] | upper")
    rows = [{"messages": HELLO}, {"messages": chat(("assistant", "Welcome!"), ("user", "Thanks"))}]
    examples, report = prepare(rows, dataset("chat"), shouting)
    # Prefix rendering still finds the turns; an assistant-first conversation has to search and cannot.
    assert report.problems == {"the chat template does not render the messages verbatim": [2]}
    assert loss_runs(examples[0], shouting) == ["HELLO.<|end|>\n", "BYE NOW.<|end|>"]


@pytest.mark.parametrize(
    ("fmt", "row"),
    [
        ("chat", {"messages": chat(("user", "Tell me a story. " * 20), ("assistant", "No."))}),
        ("instruction", {"instruction": "Tell me a story. " * 20, "output": "No."}),
    ],
)
def test_response_truncated_away(tokenizer: Any, fmt: str, row: dict[str, Any]) -> None:
    rows = [row, row]
    examples, report = prepare(rows, dataset(fmt, max_seq_length=16), tokenizer)
    assert examples == []
    assert report.problems == {"response truncated away at maxSeqLength 16": [1, 2]}


def test_truncation_keeps_the_start_and_partial_responses(tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 5
    (example,), report = prepare([{"text": text}], dataset("completion", max_seq_length=16), tokenizer)
    assert report.truncated_rows == 1
    assert len(example.input_ids) == 16
    assert example.input_ids[-1] != tokenizer.eos_token_id
    assert text.startswith(tokenizer.decode(example.input_ids[1:]))


def test_classification_cuts_the_text_not_the_label(tokenizer: Any) -> None:
    rows = [{"text": "I was charged twice for one order. " * 10, "label": "billing"}]
    (example,), report = prepare(rows, dataset("classification", max_seq_length=24), tokenizer)
    assert report.truncated_rows == 1
    assert len(example.input_ids) <= 24
    assert loss_runs(example, tokenizer) == [" billing<|end|>"]
    decoded = tokenizer.decode(example.input_ids)
    assert decoded.startswith("<|bos|>I was charged") and decoded.endswith("\n\nLabel: billing<|end|>")


def test_summary_and_check_usable() -> None:
    report = DataReport(
        total_rows=20,
        usable_rows=10,
        problems={"missing column 'messages'": [3, 7], "no assistant turn": [1, 2, 4, 5, 6, 8, 9, 10]},
        truncated_rows=2,
    )
    assert report.summary(limit=3) == (
        "20 rows, 10 usable (2 truncated); 10 unusable: no assistant turn (rows 1, 2, 4 and 5 more); "
        "missing column 'messages' (rows 3, 7)"
    )
    assert report.summary(limit=1) == (
        "20 rows, 10 usable (2 truncated); 10 unusable: no assistant turn (rows 1 and 7 more); 1 more reason"
    )
    check_usable(report)  # exactly half unusable is allowed
    with pytest.raises(DataError, match=r"more than 40% of the rows are unusable: 20 rows.*\(rows 3, 7\)"):
        check_usable(report, max_unusable_fraction=0.4)
    assert DataReport(5, 5, {}, 0).summary() == "5 rows, 5 usable"


def test_check_usable_without_usable_rows() -> None:
    with pytest.raises(
        DataError, match=r"^no usable rows: 2 rows, 0 usable; 2 unusable: invalid JSON \(rows 1, 2\)$"
    ):
        check_usable(DataReport(2, 0, {"invalid JSON": [1, 2]}, 0), max_unusable_fraction=1.0)
    with pytest.raises(DataError, match="the dataset has no rows"):
        check_usable(DataReport(0, 0, {}, 0))


def numbered(count: int) -> list[Example]:
    return [Example([index], [index]) for index in range(count)]


def test_split_eval() -> None:
    examples = numbered(20)
    train, evaluation = split_eval(examples, 0.2, seed=7)
    assert (train, evaluation) == split_eval(examples, 0.2, seed=7)
    assert len(evaluation) == 4 and len(train) == 16
    assert len(split_eval(numbered(10_001), 0.2, seed=7)[1]) == 2_000
    assert sorted(train + evaluation, key=lambda example: example.input_ids) == examples
    assert train == sorted(train, key=lambda example: example.input_ids)  # input order kept
    assert split_eval(examples, 0.2, seed=8)[1] != evaluation
    assert len(split_eval(numbered(3), 0.01, seed=0)[1]) == 1
    assert [len(part) for part in split_eval(numbered(2), 0.5, seed=0)] == [1, 1]
    with pytest.raises(DataError, match="at least 2"):
        split_eval(numbered(1), 0.1, seed=0)


def test_the_eval_split_draws_every_position_alike() -> None:
    """Selection sampling is uniform: over many seeds each of 10 positions is held out about 30 % of the
    time (3,000 draws: 4 standard deviations are 3.3 points), every draw exactly 3 of them."""
    draws = [list(eval_flags(10, 0.3, seed)) for seed in range(3_000)]
    assert {sum(flags) for flags in draws} == {3}
    shares = [sum(flags[position] for flags in draws) / len(draws) for position in range(10)]
    assert all(abs(share - 0.3) < 0.034 for share in shares), shares


def test_pack(tokenizer: Any) -> None:
    examples, _ = prepare(demo_rows(12), dataset("chat"), tokenizer)
    packed = pack(examples, 64, tokenizer.eos_token_id)
    assert len(packed) < len(examples)
    assert all(len(sequence.input_ids) <= 64 for sequence in packed)
    for field in ("input_ids", "labels"):
        flat = [value for sequence in packed for value in getattr(sequence, field)]
        assert flat == [value for example in examples for value in getattr(example, field)]


def test_pack_separates_an_example_without_eos() -> None:
    eos, x = 2, IGNORE_INDEX
    examples = [
        Example([1, 5, 2], [x, 5, 2]),
        Example([1, 6, 6, 2], [x, x, 6, 2]),
        Example([1, 7, 7], [x, 7, 7]),  # truncated: no EOS
        Example([1, 8, 2], [x, 8, 2]),
        Example([1, 9, 9, 9, 9, 2], [x, x, x, 9, 9, 2]),
    ]
    assert pack(examples, 8, eos) == [
        Example([1, 5, 2, 1, 6, 6, 2], [x, 5, 2, x, x, 6, 2]),
        Example([1, 7, 7, 2, 1, 8, 2], [x, 7, 7, x, x, 8, 2]),
        Example([1, 9, 9, 9, 9, 2], [x, x, x, 9, 9, 2]),
    ]


def test_collate() -> None:
    import torch

    batch = collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8], "x")], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_classification_labels(tokenizer: Any) -> None:
    rows = [{"text": "a", "label": label} for label in ("sales", "billing", 2, "sales")]
    examples, _ = prepare(rows, dataset("classification"), tokenizer)
    assert classification_labels(examples) == ["2", "billing", "sales"]


def test_load_jsonl(tmp_path: Path, tokenizer: Any) -> None:
    good = json.dumps({"text": "Hello."})
    path = tmp_path / "train.jsonl"
    lines = [good, good, '{"text": "broken', "[1, 2]", "", good]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n" + good.encode() + b"\n\n\n")
    rows = load_rows(path)
    assert len(rows) == 8  # the blank lines at the end are not rows
    examples, report = prepare(rows, dataset("completion"), tokenizer)
    assert report.problems == {"invalid JSON": [3, 7], "line is not a JSON object": [4], "blank line": [5]}
    assert len(examples) == report.usable_rows == 4


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\.csv: unknown file type '\.csv'"):
        load_rows(tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"cannot read missing\.jsonl"):
        load_rows(tmp_path / "missing.jsonl")


def test_load_parquet(tmp_path: Path, tokenizer: Any) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi", "name": "ann"},
                {"role": "assistant", "content": "Yo."},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}]},
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_rows(path)
    assert loaded[1]["messages"] == [{"role": "user", "content": "Hi", "name": None}]
    examples, report = prepare(loaded, dataset("chat"), tokenizer)
    assert report.problems == {"no assistant turn": [2]}
    assert loss_runs(examples[0], tokenizer) == ["Yo.<|end|>"]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"cannot read broken\.parquet"):
        load_rows(broken)


def test_a_huge_jsonl_row_is_rejected_unread_before_tokenizing(tmp_path: Path, tokenizer: Any) -> None:
    """One 50 MB row among good rows: counted as over the limit with its row number, never parsed.

    It used to take 13.7 GB and 169 s to tokenize before being reported as truncated. The peak RSS of
    this process is printed (pytest -s) and bounded loosely; times are not asserted.
    """
    import resource

    good = json.dumps({"text": "Hello there."}) + "\n"
    path = tmp_path / "train.jsonl"
    with path.open("w") as file:
        file.write(good * 2)
        file.write('{"text": "')
        for _ in range(50):  # 50 MB, written without ever holding it whole
            file.write("x" * 1_000_000)
        file.write('"}\n')
        file.write(good * 3)
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak so far, in KiB on Linux
    rows = load_rows(path)
    examples, report = prepare(rows, dataset("completion"), tokenizer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"RSS {resident} MiB before loading; peak RSS {before // 1024} MiB before, {peak // 1024} after")
    assert report.problems == {OVERSIZED_ROW: [3]}
    assert report.total_rows == 6 and report.usable_rows == len(examples) == 5
    assert "row over the 1 MiB size limit (row 3)" in report.summary()
    assert peak - before < 512 * 1024  # the old path took gigabytes: the row never became a string


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_the_row_size_limit_is_on_the_line_without_its_ending(tmp_path: Path, ending: bytes) -> None:
    def line(size: int) -> bytes:
        prefix = b'{"text": "'
        return prefix + b"a" * (size - len(prefix) - 2) + b'"}' + ending

    path = tmp_path / "train.jsonl"
    path.write_bytes(line(MAX_ROW_BYTES) + line(MAX_ROW_BYTES + 1) + line(100) + line(3 * MAX_ROW_BYTES))
    rows = load_rows(path)
    assert [type(row).__name__ for row in rows] == ["dict", "UnreadableRow", "dict", "UnreadableRow"]
    assert rows[1] == rows[3] == UnreadableRow(OVERSIZED_ROW)
    assert len(rows[0]["text"]) == MAX_ROW_BYTES - 12
    last = tmp_path / "last.jsonl"  # the last line without a newline, over the limit
    last.write_bytes(line(100) + line(MAX_ROW_BYTES + 5).rstrip(b"\r\n"))
    assert load_rows(last)[1:] == [UnreadableRow(OVERSIZED_ROW)]


def test_huge_parquet_rows_are_rejected_before_conversion(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sizes come from pyarrow's columnar data, nested chat messages included, batch by batch."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 2)  # rows 2 and 5 fall in different batches
    big = "y" * (MAX_ROW_BYTES + 1)

    def chat(answer: str, extra: str | None = None) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}],
            "note": extra,
        }

    rows = [chat("Yo."), chat(big), chat("Hey."), chat("Ho."), chat("Hm.", big), chat("Ok.")]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    loaded = load_rows(path)
    assert [isinstance(row, UnreadableRow) for row in loaded] == [False, True, False, False, True, False]
    examples, report = prepare(loaded, dataset("chat"), tokenizer)
    assert report.problems == {OVERSIZED_ROW: [2, 5]}
    assert [loss_runs(example, tokenizer) for example in examples] == [
        [f"{answer}<|end|>"] for answer in ("Yo.", "Hey.", "Ho.", "Ok.")
    ]


def test_row_bytes_of_nested_and_sliced_arrays() -> None:
    pa = pytest.importorskip("pyarrow")
    batch = pa.RecordBatch.from_pylist(
        [
            {"t": "ab", "l": [["x", "yz"], None], "s": {"a": "123", "n": 5}, "m": [("k", "vv")], "b": b"\0"},
            {"t": None, "l": None, "s": None, "m": None, "b": None},
            {"t": "é", "l": [[], ["abcd"]], "s": {"a": None, "n": None}, "m": [], "b": b"1234"},
        ],
        schema=pa.schema(
            [
                ("t", pa.string()),
                ("l", pa.list_(pa.list_(pa.large_string()))),
                ("s", pa.struct([("a", pa.string()), ("n", pa.int64())])),
                ("m", pa.map_(pa.string(), pa.string())),
                ("b", pa.binary()),
            ]
        ),
    )
    assert data._row_bytes(batch) == [2 + 3 + 3 + 3 + 1, 0, 2 + 4 + 4]
    assert data._row_bytes(batch.slice(1)) == [0, 2 + 4 + 4]
    dictionary = pa.RecordBatch.from_pydict({"d": pa.array(["aaa", "b", "aaa"]).dictionary_encode()})
    assert data._row_bytes(dictionary) == [3, 1, 3]


def test_classification_with_one_label_is_a_data_error(tokenizer: Any) -> None:
    """It would train and score 1.0 on every metric: non-retryable, naming the label and the file."""
    from finetune_trainer.evaluation import LabelSet

    rows = [{"text": f"ticket {i}", "label": "billing"} for i in range(4)] + [{"text": "x", "label": None}]
    examples, _ = prepare(rows, dataset("classification"), tokenizer)
    message = "classification needs at least 2 distinct labels; train.jsonl has only 'billing'"
    with pytest.raises(DataError) as caught:
        check_labels(examples, "train.jsonl")
    assert str(caught.value) == message
    with pytest.raises(DataError) as caught:
        LabelSet.from_examples(examples, source="train.jsonl")
    assert str(caught.value) == message
    with pytest.raises(DataError) as caught:
        LabelSet.from_examples(examples)
    assert str(caught.value) == message.replace("train.jsonl", "the training data")
    two, _ = prepare([*rows, {"text": "y", "label": "sales"}], dataset("classification"), tokenizer)
    check_labels(two, "train.jsonl")
    assert LabelSet.from_examples(two).names == ("billing", "sales")
    check_labels([], "train.jsonl")  # no usable rows at all is check_usable's to report


def test_importing_data_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, finetune_trainer.data; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_tiny_model_trains_on_collated_chat(tiny_dir: Path, offline: None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert huggingface_hub.constants.is_offline_mode()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|bos|>",
        "<|end|>",
        "<|pad|>",
    )
    assert tokenizer.apply_chat_template(HELLO[1:2], tokenize=False, add_generation_prompt=True) == (
        "<|bos|><|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    examples, report = prepare(demo_rows(8), dataset("chat"), tokenizer)
    assert report.usable_rows == 8
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 1.0  # random weights: about uniform


def test_tiny_model_is_seeded(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_demo_rows() -> None:
    rows = demo_rows(100, seed=3)
    assert len(rows) == 100 and rows == demo_rows(100, seed=3) and rows != demo_rows(100, seed=4)
    assert rows[0]["messages"][1]["content"].startswith("The capital of ")

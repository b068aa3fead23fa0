"""Datasets larger than memory: preparation streams the file into memory-mapped stores on disk.

The memory bounds are measured in a child process (``VmHWM``, its peak resident set, against the same
child's peak before preparing), with files of 100-160 MB whose rows are large but whose text is short,
so that reading is what dominates, not tokenizing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer import data
from finetune_trainer.config import DatasetConfig
from finetune_trainer.data import DataError, Example
from finetune_trainer.example_store import (
    FAILED,
    ExampleStore,
    prepare_dataset,
    wait_for_dataset,
    write_examples,
)
from finetune_trainer.tiny import demo_rows
from finetune_trainer.training_support import Ranks, micro_batches

MB = 1_000_000


def dataset(
    fmt: str = "completion", eval_split: float | None = None, packing: bool = False, max_seq_length: int = 128
) -> DatasetConfig:
    return DatasetConfig(
        train="s3://data/train.jsonl",
        eval=None,
        eval_split=eval_split,
        format=fmt,
        columns={},
        max_seq_length=max_seq_length,
        packing=packing,
    )


def bulky_rows(count: int, padding: int) -> list[dict[str, Any]]:
    """Rows of a short text and an unused column of ``padding`` distinct characters."""
    return [{"text": f"Row {i} says hello.", "meta": f"{i:08d}" * (padding // 8)} for i in range(count)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group: int = 5_000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group, compression="none")
    return path


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from transformers import AutoTokenizer
    from finetune_trainer.config import DatasetConfig
    from finetune_trainer.example_store import prepare_dataset

    def peak():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    config = DatasetConfig(train="s3://data/train.jsonl", eval=None, eval_split=0.05, format="completion",
                           columns={}, max_seq_length=128, packing=True)
    tokenizer("warm up", return_offsets_mapping=True)
    before = peak()
    prepared = prepare_dataset(config, tokenizer, Path(sys.argv[2]), None, 3, Path(sys.argv[3]))
    print(json.dumps({"before": before, "after": peak(), "train": len(prepared.train),
                      "eval": len(prepared.eval)}))
    """
)


def peak_of_preparing(tiny_dir: Path, source: Path, out: Path) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tiny_dir), str(source), str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("kind", "count"), [("jsonl", 100_000), ("parquet", 100_000)])
def test_preparing_a_large_file_holds_far_less_than_the_file(
    tmp_path: Path, tiny_dir: Path, kind: str, count: int
) -> None:
    rows = bulky_rows(count, padding=1_600)
    writer = write_jsonl if kind == "jsonl" else write_parquet
    source = writer(tmp_path / f"train.{kind}", rows)
    del rows
    size = source.stat().st_size
    assert size > 100 * MB
    measured = peak_of_preparing(tiny_dir, source, tmp_path / "data")
    grown = measured["after"] - measured["before"]
    # The old path held every row as Python objects: several times the file. Streaming holds a batch.
    assert grown < size / 2, f"peak grew by {grown / MB:.0f} MB preparing a {size / MB:.0f} MB file"
    assert measured["eval"] + sum(1 for _ in ExampleStore(tmp_path / "data" / "train.arrow")) == count
    assert measured["train"] < count  # packed: several rows to a sequence


def prepared_rows(prepared: Any) -> tuple[list[int], list[int]]:
    return [row for row, _ in prepared.train.numbered()], [row for row, _ in prepared.eval.numbered()]


def test_the_eval_split_is_the_same_across_chunk_sizes_runs_and_formats(
    tmp_path: Path, tokenizer: Any
) -> None:
    rows = bulky_rows(3_000, padding=8)
    rows[10] = {"text": ""}  # an unusable row keeps its number; the rows after it keep theirs
    jsonl = write_jsonl(tmp_path / "train.jsonl", rows)
    parquet = write_parquet(tmp_path / "train.parquet", rows, row_group=333)
    config = dataset(eval_split=0.1)
    splits = [
        prepared_rows(prepare_dataset(config, tokenizer, source, None, 11, tmp_path / name, batch, chunk))
        for name, source, batch, chunk in [
            ("a", jsonl, 1024, 1024),
            ("b", jsonl, 7, 1024),
            ("c", jsonl, 1024, 1024),
            ("d", parquet, 13, 50),
            ("e", parquet, 1024, 1024),
        ]
    ]
    assert all(split == splits[0] for split in splits)
    train, evaluation = splits[0]
    usable = [row for row in range(1, 3_001) if row != 11]
    flags = data.eval_flags(len(usable), 0.1, 11)
    assert evaluation == [row for row, held_out in zip(usable, flags, strict=True) if held_out]
    assert len(evaluation) == 300
    assert sorted(train + evaluation) == [row for row in range(1, 3_001) if row != 11]
    other = prepare_dataset(config, tokenizer, jsonl, None, 12, tmp_path / "f")
    assert prepared_rows(other)[1] != evaluation  # another seed, another split


def test_packing_and_split_match_the_in_memory_path(tmp_path: Path, tokenizer: Any) -> None:
    rows = demo_rows(40)
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    config = dataset("chat", eval_split=0.2, packing=True, max_seq_length=96)
    prepared = prepare_dataset(config, tokenizer, source, None, 5, tmp_path / "data", batch_rows=3)
    examples, _ = data.prepare(data.load_rows(source), config, tokenizer)
    train, evaluation = data.split_eval(examples, 0.2, seed=5)  # every row usable: positions are rows
    packed = data.pack(train, 96, tokenizer.eos_token_id)
    assert len(packed) < len(train)
    assert list(prepared.train) == packed
    assert prepared.eval is not None and list(prepared.eval) == evaluation
    assert wait_for_dataset(tmp_path / "data") == (packed, evaluation)  # what the other ranks read


def test_a_tiny_split_keeps_a_row_on_each_side(tmp_path: Path, tokenizer: Any) -> None:
    source = write_jsonl(tmp_path / "train.jsonl", bulky_rows(3, padding=8))
    for seed in range(6):
        prepared = prepare_dataset(
            dataset(eval_split=0.01), tokenizer, source, None, seed, tmp_path / str(seed)
        )
        examples, _ = data.prepare(data.load_rows(source), dataset(), tokenizer)
        assert prepared.eval is not None and len(prepared.eval) == 1
        assert (list(prepared.train), list(prepared.eval)) == data.split_eval(examples, 0.01, seed)
    with pytest.raises(DataError, match="at least 2 usable rows"):
        one = write_jsonl(tmp_path / "one.jsonl", bulky_rows(1, 8))
        prepare_dataset(dataset(eval_split=0.5), tokenizer, one, None, 0, tmp_path / "one")


def test_bad_rows_are_reported_with_their_line_numbers(
    tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    good = json.dumps({"text": "Hello."})
    lines = [good, '{"text": "broken', "[1]", "", good, json.dumps({"text": 5}), good, good, good, "", ""]
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.INFO, logger="finetune_trainer.example_store"):
        prepared = prepare_dataset(dataset(), tokenizer, source, None, 0, tmp_path / "ok")
    assert len(prepared.train) == 5
    assert "9 rows, 5 usable; 4 unusable" in caplog.text
    assert "invalid JSON (row 2)" in caplog.text and "blank line (row 4)" in caplog.text
    assert "'text' is not a string (row 6)" in caplog.text

    source.write_text("\n".join([good, "nope", "nope", json.dumps({"other": 1})]) + "\n")
    with pytest.raises(DataError, match=r"invalid JSON \(rows 2, 3\); missing column 'text' \(row 4\)"):
        prepare_dataset(dataset(), tokenizer, source, None, 0, tmp_path / "bad")
    assert (tmp_path / "bad" / FAILED).exists()
    with pytest.raises(DataError, match=r"invalid JSON \(rows 2, 3\)"):  # the node's other ranks
        wait_for_dataset(tmp_path / "bad")


def test_a_huge_row_is_still_skipped_unread(tmp_path: Path, tokenizer: Any) -> None:
    source = tmp_path / "train.jsonl"
    huge = json.dumps({"text": "x" * (data.MAX_ROW_BYTES + 10)})
    source.write_text("\n".join([json.dumps({"text": "a"}), huge, json.dumps({"text": "b"})]) + "\n")
    assert list(data.iter_rows(source))[1] == data.UnreadableRow(data.OVERSIZED_ROW)
    with pytest.raises(DataError, match=r"cannot read missing\.jsonl"):
        list(data.iter_rows(tmp_path / "missing.jsonl"))


def test_the_store_is_a_sequence_of_examples(tmp_path: Path) -> None:
    examples = [
        Example([i, i + 1], [data.IGNORE_INDEX, i + 1], f"l{i % 3}", 1 if i % 2 else None, f"r{i}")
        for i in range(50)
    ]
    store = write_examples(examples, tmp_path / "s.arrow", batch_rows=7)
    assert len(store) == 50 and store[0] == examples[0] and store[-1] == examples[-1]
    assert list(store[3::4]) == examples[3::4] and list(store[3::4][2:5]) == examples[3::4][2:5]
    assert len(store[1::2][:10]) == 10
    assert [e.label for e in store.label_examples()] == ["l0", "l1", "l2"]
    assert store.label_examples() == examples[:3]
    with pytest.raises(IndexError):
        store[50]
    # micro_batches reads the same batches from the store as from the list
    for rank in (0, 1):
        ranks = Ranks(rank, rank, 2, torch.device("cpu"))
        from_list, from_store = micro_batches(examples, ranks, 4, 9, 3), micro_batches(store, ranks, 4, 9, 3)
        assert [next(from_list) for _ in range(12)] == [next(from_store) for _ in range(12)]

"""Tokenized examples on the node's disk, memory-mapped: a dataset larger than host memory trains.

:func:`prepare_dataset` streams the source file (``data.iter_rows``: a .jsonl line or a parquet batch at
a time), tokenizes each row and writes the examples to Arrow IPC files; the seeded evaluation split
(``data.eval_flags``) and packing each stream one file into others. An
:class:`ExampleStore` reads such a file through ``pyarrow.memory_map``: it is a ``Sequence[Example]``
(length, indexing, slicing, iteration) for the loop, the evaluation and ``micro_batches``, and host
memory is bounded by a record batch, not by the file. Arrow IPC is pyarrow's own format; only the
mapping from a row of list columns to an :class:`Example` is written here.

Local rank 0 of each node prepares; the node's other ranks wait for ``prepared.json`` (written last)
and open the same files. A data error there is written to ``failed.json`` so that they fail with the
same message; any other failure ends them through the gang.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pyarrow as pa

from finetune_trainer import data
from finetune_trainer.config import DatasetConfig
from finetune_trainer.data import DataError, DataReport, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BATCH_ROWS = 1024  # examples per Arrow record batch: what one read holds
PREPARED = "prepared.json"
FAILED = "failed.json"
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("label", pa.string()),
        ("prompt_length", pa.int32()),
        ("reference", pa.string()),
        ("row", pa.int64()),  # the source file's 1-based row number; 0 for packed sequences
    ]
)


class ExampleWriter:
    """Appends examples to an Arrow IPC file, one record batch per ``batch_rows`` examples."""

    def __init__(self, path: Path, batch_rows: int = BATCH_ROWS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.batch_rows = batch_rows
        self.count = 0
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._pending: list[tuple[int, Example]] = []

    def append(self, example: Example, row: int = 0) -> None:
        self._pending.append((row, example))
        self.count += 1
        if len(self._pending) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, examples = zip(*self._pending, strict=True)
        columns = {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            "label": [e.label for e in examples],
            "prompt_length": [e.prompt_length for e in examples],
            "reference": [e.reference for e in examples],
            "row": list(rows),
        }
        self._writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=SCHEMA))
        self._pending = []

    def close(self) -> ExampleStore:
        self._flush()
        self._writer.close()
        self._sink.close()
        return ExampleStore(self.path)

    def __enter__(self) -> ExampleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._sink.closed:
            self._flush()
            self._writer.close()
            self._sink.close()


class _File:
    """One memory-mapped IPC file: its record batches, the first example of each, numpy views on a few."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        sizes = [self.reader.get_batch(i).num_rows for i in range(self.reader.num_record_batches)]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.batch = lru_cache(maxsize=4)(self._batch)

    def _batch(self, index: int) -> dict[str, Any]:
        """Zero-copy numpy views of the batch's token lists (offsets and values), Python lists of the rest."""
        batch = self.reader.get_batch(index)
        found: dict[str, Any] = {}
        for name in ("input_ids", "labels"):
            column = batch.column(name)
            found[name] = (
                column.offsets.to_numpy(zero_copy_only=False),
                column.values.to_numpy(zero_copy_only=False),
            )
        for name in ("label", "prompt_length", "reference", "row"):
            found[name] = batch.column(name).to_pylist()
        return found

    def locate(self, position: int) -> tuple[dict[str, Any], int]:
        """The record batch holding the example at ``position``, and its index in that batch."""
        index = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.batch(index), position - int(self.starts[index])

    def example(self, position: int) -> Example:
        batch, local = self.locate(position)

        def tokens(name: str) -> list[int]:
            offsets, values = batch[name]
            return values[offsets[local] : offsets[local + 1]].tolist()

        return Example(
            tokens("input_ids"),
            tokens("labels"),
            batch["label"][local],
            batch["prompt_length"][local],
            batch["reference"][local],
        )


class ExampleStore(Sequence[Example]):
    """The examples of an IPC file written by :class:`ExampleWriter`, or a range of them (a slice is a
    view: ``examples[rank::world]`` holds no list)."""

    def __init__(self, path: Path, _file: _File | None = None, _rows: range | None = None) -> None:
        self._file = _file or _File(path)
        self._rows = range(int(self._file.starts[-1])) if _rows is None else _rows

    @property
    def path(self) -> Path:
        return self._file.path

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> ExampleStore: ...
    def __getitem__(self, index: int | slice) -> Example | ExampleStore:
        if isinstance(index, slice):
            return ExampleStore(self.path, self._file, self._rows[index])
        return self._file.example(self._rows[index])

    def __iter__(self) -> Iterator[Example]:
        for position in self._rows:
            yield self._file.example(position)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def numbered(self) -> Iterator[tuple[int, Example]]:
        """(the source file's 1-based row number, example) of each example; 0 for packed sequences."""
        for position in self._rows:
            batch, local = self._file.locate(position)
            yield batch["row"][local], self._file.example(position)

    def label_examples(self) -> list[Example]:
        """The first example of each distinct classification label, in order: what ``LabelSet`` and
        ``check_labels`` need, found from the label column without building every example."""
        seen: set[str] = set()
        found: list[Example] = []
        for position in self._rows:
            batch, local = self._file.locate(position)
            label = batch["label"][local]
            if label is not None and label not in seen:
                seen.add(label)
                found.append(self._file.example(position))
        return found


def read_examples(path: Path) -> Iterator[tuple[int, Example]]:
    """(source row number, example) of every example in an IPC file, in order, read a record batch at a
    time into memory that is freed after it: for the passes that stream one file into another (the
    split, packing). A memory map would leave every page read resident in the process for as long as the
    file stays mapped."""
    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index).to_pydict()
            for values in zip(*(batch[name] for name in SCHEMA.names), strict=True):
                record = dict(zip(SCHEMA.names, values, strict=True))
                yield (
                    record["row"],
                    Example(
                        record["input_ids"],
                        record["labels"],
                        record["label"],
                        record["prompt_length"],
                        record["reference"],
                    ),
                )


def write_examples(examples: Iterable[Example], path: Path, batch_rows: int = BATCH_ROWS) -> ExampleStore:
    with ExampleWriter(path, batch_rows) as writer:
        for example in examples:
            writer.append(example)
        return writer.close()


@dataclass
class Prepared:
    train: ExampleStore
    eval: ExampleStore | None
    reports: dict[str, DataReport]  # "training" (and "evaluation" for dataset.eval) -> its report


def _encode_to(
    source: Path,
    dataset: DatasetConfig,
    tokenizer: PreTrainedTokenizerBase,
    directory: Path,
    name: str,
    split: tuple[float, int] | None,
    batch_rows: int,
    parquet_batch_rows: int,
) -> tuple[ExampleStore, ExampleStore | None, DataReport]:
    """Streams ``source`` into ``name``.arrow; with a (fraction, seed) split, all of it into
    ``name``-all.arrow first (the split needs the count of usable rows), then from there into
    ``name``.arrow and ``name``-eval.arrow (``data.eval_flags``)."""
    tally = data.Tally()
    rows = data.iter_rows(source, parquet_batch_rows)
    target = directory / (f"{name}-all.arrow" if split else f"{name}.arrow")
    with ExampleWriter(target, batch_rows) as writer:
        for row, example in data.encode_rows(rows, dataset, tokenizer, tally):
            writer.append(example, row)
        report = tally.report()
        logger.info("%s data: %s", "evaluation" if name == "eval" else "training", report.summary())
        data.check_usable(report)
        everything = writer.close()
    if split is None:
        return everything, None, report
    fraction, seed = split
    with (
        ExampleWriter(directory / f"{name}.arrow", batch_rows) as train,
        ExampleWriter(directory / f"{name}-eval.arrow", batch_rows) as evaluation,
    ):
        flags = data.eval_flags(len(everything), fraction, seed)
        for (row, example), held_out in zip(read_examples(target), flags, strict=True):
            (evaluation if held_out else train).append(example, row)
        stores = train.close(), evaluation.close()
    target.unlink()
    return stores[0], stores[1], report


def prepare_dataset(
    dataset: DatasetConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_file: Path,
    eval_file: Path | None,
    seed: int,
    directory: Path,
    batch_rows: int = BATCH_ROWS,
    parquet_batch_rows: int = data._PARQUET_BATCH_ROWS,
) -> Prepared:
    """The training (packed with ``dataset.packing``) and evaluation examples in ``directory``, streamed
    from the source files; ``prepared.json`` last, for the node's other ranks (:func:`wait_for_dataset`)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        split = (dataset.eval_split, seed) if eval_file is None and dataset.eval_split is not None else None
        train, evaluation, report = _encode_to(
            train_file, dataset, tokenizer, directory, "train", split, batch_rows, parquet_batch_rows
        )
        reports = {"training": report}
        if eval_file is not None:
            evaluation, _, reports["evaluation"] = _encode_to(
                eval_file, dataset, tokenizer, directory, "eval", None, batch_rows, parquet_batch_rows
            )
        if dataset.packing:
            assert tokenizer.eos_token_id is not None
            examples = (example for _, example in read_examples(train.path))
            packed = data.iter_pack(examples, dataset.max_seq_length, tokenizer.eos_token_id)
            train = write_examples(packed, directory / "train-packed.arrow", batch_rows)
    except DataError as error:
        (directory / FAILED).write_text(json.dumps({"message": str(error)}))
        raise
    marker = {"train": train.path.name, "eval": evaluation.path.name if evaluation is not None else None}
    temporary = directory / f"{PREPARED}.tmp"
    temporary.write_text(json.dumps(marker))
    os.replace(temporary, directory / PREPARED)
    return Prepared(train, evaluation, reports)


def wait_for_dataset(
    directory: Path, poll_seconds: float = 0.2, beat: Callable[[], None] = lambda: None
) -> tuple[ExampleStore, ExampleStore | None]:
    """The stores local rank 0 prepares in ``directory``, once ``prepared.json`` is there; its DataError
    when it failed on the data. Polls the disk, no collective: preparing a large file may take longer
    than the process group's timeout. Another failure of local rank 0 ends this rank through the gang."""
    while not (directory / PREPARED).exists():
        if (directory / FAILED).exists():
            raise DataError(json.loads((directory / FAILED).read_text())["message"])
        beat()
        time.sleep(poll_seconds)
    marker = json.loads((directory / PREPARED).read_text())
    evaluation = ExampleStore(directory / marker["eval"]) if marker["eval"] else None
    return ExampleStore(directory / marker["train"]), evaluation

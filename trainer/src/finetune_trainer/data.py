"""Dataset rows -> token sequences with loss masks, and a report naming every row that cannot be used.

A bad row never stops a run on its own: it is counted under a reason with its 1-based row number
(the line number in a .jsonl file), and :func:`check_usable` decides whether enough rows are left.
A row over :data:`MAX_ROW_BYTES` is one such row, rejected as it is read: the loader never parses
it, so one huge row costs neither the memory nor the time of tokenizing it.
Loss masks come from character spans of the rendered text mapped through the tokenizer's offsets,
so they stay exact whatever the tokenizer merges at a boundary. torch is imported only by
:func:`collate`, so that this module stays cheap to import.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from jinja2 import TemplateError

from finetune_trainer.config import DatasetConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

MIB = 1024 * 1024
# The largest usable row: a .jsonl line's bytes (newline excluded), or the UTF-8 bytes of a .parquet
# row's text and binary values. Larger rows are unusable, counted under OVERSIZED_ROW, never parsed.
# 1 MiB is far beyond any maxSeqLength (about 250,000 tokens of English) and bounds what one row can
# cost: tokenizing with offsets takes some hundred times a row's size in memory.
MAX_ROW_BYTES = MIB
OVERSIZED_ROW = f"row over the {MAX_ROW_BYTES // MIB} MiB size limit"
_SKIP_CHUNK_BYTES = MIB  # an oversized line is skipped this much at a time
_PARQUET_BATCH_ROWS = 1024

# The Alpaca prompts (tatsu-lab/stanford_alpaca), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Chat rendering for tokenizers without a chat template: "### User:\n{content}" turns separated by a
# blank line, each assistant turn closed by the EOS token so that the model learns where to stop.
FALLBACK_TURN_HEADER = "### {role}:\n"
FALLBACK_TURN_SEPARATOR = "\n\n"
# Classification: the text, then "Label:"; the loss is on " {label}" and EOS.
CLASSIFICATION_PROMPT = "{text}\n\nLabel:"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    label: str | None = None  # classification: the gold label text
    # Chat and instruction rows, for generation-based evaluation: input_ids[:prompt_length] is the prompt
    # of the last reply (the turns before it and the generation prompt; the Alpaca prompt), ``reference``
    # the answer a generated reply is compared with. None when the prompt does not fit in maxSeqLength.
    prompt_length: int | None = None
    reference: str | None = None


@dataclass
class DataReport:
    total_rows: int
    usable_rows: int
    problems: dict[str, list[int]]  # reason -> every 1-based row number with that problem
    truncated_rows: int  # usable rows that lost tokens at maxSeqLength

    def summary(self, limit: int = 5) -> str:
        """One line for logs and the termination message: at most ``limit`` reasons, ``limit`` rows each."""
        text = f"{self.total_rows} rows, {self.usable_rows} usable"
        if self.truncated_rows:
            text += f" ({self.truncated_rows} truncated)"
        unusable = self.total_rows - self.usable_rows
        if not unusable:
            return text
        reasons = sorted(self.problems.items(), key=lambda item: (-len(item[1]), item[0]))
        parts = []
        for reason, rows in reasons[:limit]:
            listed = ", ".join(str(row) for row in rows[:limit])
            more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
            parts.append(f"{reason} (row{'s' if len(rows) > 1 else ''} {listed}{more})")
        if len(reasons) > limit:
            hidden = len(reasons) - limit
            parts.append(f"{hidden} more reason{'s' if hidden > 1 else ''}")
        return f"{text}; {unusable} unusable: " + "; ".join(parts)


class DataError(Exception):
    """Non-retryable: the data cannot be used; the message says which rows and why."""


@dataclass(frozen=True)
class UnreadableRow:
    """A row that could not be read (not a JSON object, too large): kept in place so that row numbers
    stay line numbers."""

    reason: str


class _Unusable(Exception):
    """One row's problem; ``prepare`` records it under its reason."""


def load_rows(path: Path) -> list[dict[str, Any] | UnreadableRow]:
    """Every row of a .jsonl or .parquet file, in memory: :func:`iter_rows` as a list (small files, tests)."""
    return list(iter_rows(path))


def iter_rows(
    path: Path, parquet_batch_rows: int = _PARQUET_BATCH_ROWS
) -> Iterator[dict[str, Any] | UnreadableRow]:
    """The rows of a .jsonl or .parquet file, one at a time: memory is bounded by a line or a parquet batch.

    A broken .jsonl line becomes an :class:`UnreadableRow` that :func:`prepare` reports; blank lines at
    the end of the file are ignored, blank lines elsewhere are unreadable rows. A row over
    :data:`MAX_ROW_BYTES` is an unreadable row too, found before it is parsed.
    """
    if path.suffix == ".jsonl":
        return _iter_jsonl(path)
    if path.suffix == ".parquet":
        return _iter_parquet(path, parquet_batch_rows)
    raise DataError(f"{path.name}: unknown file type {path.suffix!r} (expected .jsonl or .parquet)")


def _lines(file: BinaryIO) -> Iterator[bytes | None]:
    """The file's lines; None for a line over MAX_ROW_BYTES, which is skipped without being held."""
    while line := file.readline(MAX_ROW_BYTES + 3):  # the limit, then room for "\r\n" and one more
        if len(line.rstrip(b"\r\n")) <= MAX_ROW_BYTES:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = file.readline(_SKIP_CHUNK_BYTES)
        yield None


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any] | UnreadableRow]:
    blank = UnreadableRow("blank line")
    pending_blanks = 0  # held back until a row follows them: blank lines at the end are no rows
    try:
        with path.open("rb") as file:
            for line in _lines(file):
                if line is not None and not line.strip():
                    pending_blanks += 1
                    continue
                yield from [blank] * pending_blanks
                pending_blanks = 0
                if line is None:
                    yield UnreadableRow(OVERSIZED_ROW)
                    continue
                try:
                    value = json.loads(line)
                except ValueError:  # also bad UTF-8
                    yield UnreadableRow("invalid JSON")
                    continue
                yield value if isinstance(value, dict) else UnreadableRow("line is not a JSON object")
    except OSError as error:
        raise DataError(f"cannot read {path.name}: {error}") from error


def _iter_parquet(path: Path, batch_rows: int) -> Iterator[dict[str, Any] | UnreadableRow]:
    """Batch by batch; a row whose values are over MAX_ROW_BYTES is never converted to Python."""
    import pyarrow.parquet as pq

    try:
        # pre_buffer (pyarrow's default) reads ahead the whole file's column chunks: 99 MB held for a 100 MB
        # file. Without it, and with one reader thread, a row group's pages are read as they are decoded.
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=MIB)
        for batch in parquet.iter_batches(batch_size=batch_rows, use_threads=False):
            sizes = _row_bytes(batch)
            oversized = [index for index, size in enumerate(sizes) if size > MAX_ROW_BYTES]
            start = 0
            for index in [*oversized, len(sizes)]:
                yield from batch.slice(start, index - start).to_pylist()
                if index < len(sizes):
                    yield UnreadableRow(OVERSIZED_ROW)
                start = index + 1
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read {path.name}: {error}") from error


def _row_bytes(batch: Any) -> list[int]:
    """Per row of a pyarrow RecordBatch: the bytes of its string and binary values, nested ones included."""
    import numpy as np

    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        total += _value_bytes(column)
    return [int(size) for size in total]


def _value_bytes(array: Any) -> Any:
    """Per element of a pyarrow Array, as a numpy int64 array: its string and binary bytes, computed by
    pyarrow on the columnar data, so that no Python string is built."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    count = len(array)
    if pa.types.is_dictionary(kind):
        return _value_bytes(array.dictionary_decode())
    if pa.types.is_string_view(kind) or pa.types.is_binary_view(kind):
        return _value_bytes(array.cast(pa.large_binary()))
    if any(
        check(kind)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_fixed_size_binary,
        )
    ):
        lengths = pc.binary_length(array).fill_null(0)
        return lengths.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_struct(kind):
        total = np.zeros(count, dtype=np.int64)
        for field in array.flatten():
            total += _value_bytes(field)
        return total
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        # The offsets are absolute in the unsliced child; a null slot spans no values.
        offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        child = array.values.slice(offsets[0], offsets[-1] - offsets[0])
        parents = np.repeat(np.arange(count), np.diff(offsets))
        return np.bincount(parents, weights=_value_bytes(child), minlength=count).astype(np.int64)
    if pa.types.is_fixed_size_list(kind):
        width = kind.list_size
        child = array.values.slice(array.offset * width, count * width)
        return _value_bytes(child).reshape(count, width).sum(axis=1) if width else np.zeros(count, np.int64)
    if pa.types.is_primitive(kind) or pa.types.is_null(kind) or pa.types.is_decimal(kind):
        return np.zeros(count, dtype=np.int64)
    # Anything rarer (unions, list views, extension types): measured as JSON, one value at a time.
    return np.array([len(json.dumps(value.as_py(), default=str)) for value in array], dtype=np.int64)


class Tally:
    """The running report of :func:`encode_rows`: what a :class:`DataReport` says, counted as rows pass."""

    def __init__(self) -> None:
        self.total = 0
        self.usable = 0
        self.truncated = 0
        self.problems: defaultdict[str, list[int]] = defaultdict(list)

    def report(self) -> DataReport:
        return DataReport(self.total, self.usable, dict(self.problems), self.truncated)


def encode_rows(
    rows: Iterable[Mapping[str, Any] | UnreadableRow],
    dataset: DatasetConfig,
    tokenizer: PreTrainedTokenizerBase,
    tally: Tally,
) -> Iterator[tuple[int, Example]]:
    """(1-based row number, Example) of each usable row, one at a time; the others go to ``tally``."""
    encoder = _Encoder(dataset, tokenizer)
    for number, row in enumerate(rows, start=1):
        tally.total = number
        try:
            if isinstance(row, UnreadableRow):
                raise _Unusable(row.reason)
            example, was_truncated = encoder.encode(row)
        except _Unusable as problem:
            tally.problems[str(problem)].append(number)
            continue
        tally.usable += 1
        tally.truncated += was_truncated
        yield number, example


def prepare(
    rows: Sequence[Mapping[str, Any] | UnreadableRow],
    dataset: DatasetConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[list[Example], DataReport]:
    """Tokenizes the usable rows (truncated to ``dataset.max_seq_length``) and reports the others."""
    tally = Tally()
    examples = [example for _, example in encode_rows(rows, dataset, tokenizer, tally)]
    return examples, tally.report()


def check_usable(report: DataReport, max_unusable_fraction: float = 0.5) -> None:
    """Raises DataError when no row is usable or more than ``max_unusable_fraction`` of them are not."""
    if report.total_rows == 0:
        raise DataError("the dataset has no rows")
    unusable = report.total_rows - report.usable_rows
    if report.usable_rows == 0:
        raise DataError(f"no usable rows: {report.summary()}")
    if unusable / report.total_rows > max_unusable_fraction:
        raise DataError(f"more than {max_unusable_fraction:.0%} of the rows are unusable: {report.summary()}")


def eval_flags(count: int, fraction: float, seed: int) -> Iterator[bool]:
    """For each of ``count`` examples in order, whether it goes to the evaluation split: exactly
    round(count x fraction) of them, at least one and at most count - 1, chosen uniformly and seeded by
    selection sampling (Knuth, TAOCP vol. 2, 3.4.2, Algorithm S). One pass holding nothing per example,
    so the split of a file larger than memory is streamed, and the same however the file is read."""
    if count < 2:
        raise DataError(f"evalSplit needs at least 2 usable rows, there are {count}")
    wanted = min(max(1, round(count * fraction)), count - 1)
    generator = random.Random(seed)
    for position in range(count):
        chosen = generator.random() * (count - position) < wanted
        wanted -= chosen
        yield chosen


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random ``fraction`` for evaluation (:func:`eval_flags`), in input order."""
    flags = list(eval_flags(len(examples), fraction, seed))
    train = [example for example, held_out in zip(examples, flags, strict=True) if not held_out]
    evaluation = [example for example, held_out in zip(examples, flags, strict=True) if held_out]
    return train, evaluation


def pack(examples: Iterable[Example], max_seq_length: int, eos_token_id: int) -> list[Example]:
    """Concatenates consecutive examples into sequences of at most ``max_seq_length`` tokens.

    Greedy and order-preserving; each example keeps its own loss mask. Prepared examples end in EOS
    unless truncated; an example that does not is followed by an EOS without loss when another example
    follows it in the same sequence. Attention still crosses example boundaries (plain packing).
    """
    return list(iter_pack(examples, max_seq_length, eos_token_id))


def iter_pack(examples: Iterable[Example], max_seq_length: int, eos_token_id: int) -> Iterator[Example]:
    """:func:`pack` one sequence at a time, holding only the one being filled (streamed packing)."""
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        separator = [eos_token_id] if ids and ids[-1] != eos_token_id else []
        if ids and len(ids) + len(separator) + len(example.input_ids) > max_seq_length:
            yield Example(ids, labels)
            ids, labels, separator = [], [], []
        ids = ids + separator + example.input_ids
        labels = labels + [IGNORE_INDEX] * len(separator) + example.labels
    if ids:
        yield Example(ids, labels)


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX in the padding)."""
    import torch

    width = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def classification_labels(examples: Sequence[Example]) -> list[str]:
    """The sorted distinct gold labels: the classes a classification run is evaluated on."""
    return sorted({example.label for example in examples if example.label is not None})


def check_labels(examples: Sequence[Example], source: str) -> None:
    """Raises DataError when classification training data has a single label (``source`` names it).

    A model trained on one label learns nothing to tell apart, and its evaluation scores 1.0 on every
    metric. No labels at all is :func:`check_usable`'s to report (no usable rows).
    """
    labels = classification_labels(examples)
    if len(labels) == 1:
        raise DataError(f"classification needs at least 2 distinct labels; {source} has only {labels[0]!r}")


Span = tuple[int, int]  # [start, end) character offsets that carry loss


def _last_reply_start(labels: list[int]) -> int:
    """The index of the first token of the last run of loss tokens (there is one): where the last reply
    begins."""
    start = max(i for i, value in enumerate(labels) if value != IGNORE_INDEX)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


class _Encoder:
    """Turns one row of the configured format into an Example, or raises _Unusable."""

    def __init__(self, dataset: DatasetConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.eos_token_id is None or tokenizer.eos_token is None:
            raise DataError("the tokenizer has no EOS token, so sequences cannot be ended")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                "loss masks need token offsets: the model needs a tokenizer.json (a fast tokenizer)"
            )
        self.columns = dataset.columns
        self.max_length = dataset.max_seq_length
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        self.eos_text: str = tokenizer.eos_token
        bos_id = tokenizer.bos_token_id
        # Prepend BOS exactly when the tokenizer itself would (Llama does, Qwen does not).
        adds_bos = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
        self.bos: list[int] = [bos_id] if adds_bos else []
        self.template: str | None = getattr(tokenizer, "chat_template", None)
        self.special_texts = sorted(
            (token.content for token in tokenizer.added_tokens_decoder.values() if token.special),
            key=len,
            reverse=True,
        )
        self.encode = {
            "chat": self.chat,
            "instruction": self.instruction,
            "completion": self.completion,
            "classification": self.classification,
        }[dataset.format]

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def string(self, row: Mapping[str, Any], name: str, *, required: bool = True) -> str:
        """The column's text ('' for an absent optional column); _Unusable when it is missing or empty."""
        column = self.column(name)
        if column not in row:
            if required:
                raise _Unusable(f"missing column '{column}'")
            return ""
        value = "" if row[column] is None else row[column]
        if not isinstance(value, str):
            raise _Unusable(f"'{column}' is not a string")
        if required and not value.strip():
            raise _Unusable(f"empty '{column}'")
        return value

    def tokenize(
        self, prefix: list[int], text: str, spans: list[Span]
    ) -> tuple[list[int], list[int], list[int]]:
        """(ids, labels, start offsets) of ``prefix + text``: a token carries loss when it overlaps a span."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [*prefix, *encoding["input_ids"]]
        labels = [IGNORE_INDEX] * len(prefix)
        starts = [0] * len(prefix)
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
            loss = any(start < span_end and end > span_start for span_start, span_end in spans)
            labels.append(token if loss else IGNORE_INDEX)
            starts.append(start)
        return ids, labels, starts

    def finish(
        self,
        ids: list[int],
        labels: list[int],
        eos_label: int | None,
        label: str | None = None,
        reference: str | None = None,
    ) -> tuple[Example, bool]:
        """Appends EOS (unless ``eos_label`` is None), truncates to maxSeqLength, checks loss is left.

        With a ``reference`` the prompt is everything before the last run of loss tokens (the last reply),
        found before truncation so that a cut reply still has its own prompt."""
        if eos_label is not None:
            ids, labels = [*ids, self.eos_id], [*labels, eos_label]
        whole = labels
        truncated = len(ids) > self.max_length
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(value == IGNORE_INDEX for value in labels):
            raise _Unusable(f"response truncated away at maxSeqLength {self.max_length}")
        if reference is None:
            return Example(ids, labels, label), truncated
        prompt_length = _last_reply_start(whole)
        if prompt_length > self.max_length:  # the question itself was cut: nothing to ask
            return Example(ids, labels, label), truncated
        return Example(ids, labels, label, prompt_length, reference), truncated

    def reference(self, row: Mapping[str, Any], reply: str) -> str:
        """The row's own reference answer (the optional ``reference`` column), else the reply it trains on."""
        given = self.string(row, "reference", required=False)
        return given if given.strip() else reply

    def completion(self, row: Mapping[str, Any]) -> tuple[Example, bool]:
        text = self.string(row, "text")
        ids, labels, _ = self.tokenize(self.bos, text, [(0, len(text))])
        return self.finish(ids, labels, self.eos_id)

    def instruction(self, row: Mapping[str, Any]) -> tuple[Example, bool]:
        instruction = self.string(row, "instruction")
        context = self.string(row, "input", required=False)
        output = self.string(row, "output")
        if context.strip():
            prompt = ALPACA_PROMPT.format(instruction=instruction, input=context)
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        ids, labels, _ = self.tokenize(self.bos, prompt + output, [(len(prompt), len(prompt) + len(output))])
        return self.finish(ids, labels, self.eos_id, reference=self.reference(row, output))

    def classification(self, row: Mapping[str, Any]) -> tuple[Example, bool]:
        """Prompt from the text, loss on the label; a long text loses its end so that the label fits."""
        text = self.string(row, "text")
        column = self.column("label")
        if column not in row:
            raise _Unusable(f"missing column '{column}'")
        value = row[column]
        if isinstance(value, float) and value.is_integer():  # an integer column with nulls, via pandas
            value = int(value)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _Unusable(f"empty '{column}'")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _Unusable(f"'{column}' is not a string or integer")
        label = str(value).strip()
        response = f" {label}"
        cut = False
        while True:
            prompt = CLASSIFICATION_PROMPT.format(text=text)
            span = (len(prompt), len(prompt) + len(response))
            ids, labels, starts = self.tokenize(self.bos, prompt + response, [span])
            excess = len(ids) + 1 - self.max_length  # + 1: the EOS
            if excess <= 0 or not text:
                break
            # Keep the text tokens that fit; each pass shortens the text, so this ends.
            text_tokens = sum(1 for start in starts[len(self.bos) :] if start < len(text))
            text = text[: starts[len(self.bos) + max(text_tokens - excess, 0)]]
            cut = True
        example, truncated = self.finish(ids, labels, self.eos_id, label)
        return example, truncated or cut

    def chat(self, row: Mapping[str, Any]) -> tuple[Example, bool]:
        """Loss on the assistant turns only; EOS closes the sequence unless the rendering already does."""
        column = self.column("messages")
        if column not in row:
            raise _Unusable(f"missing column '{column}'")
        messages = row[column]
        if not isinstance(messages, list) or not all(
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
            for message in messages
        ):
            raise _Unusable(f"'{column}' is not a list of {{role: str, content: str}}")
        # Only role and content reach the template: parquet gives every message every key, often None.
        turns = [{"role": message["role"], "content": message["content"]} for message in messages]
        for turn in turns:
            if turn["role"] not in ROLES:
                raise _Unusable(f"unknown role {turn['role']!r}")
            if turn["role"] == "assistant" and not turn["content"].strip():
                raise _Unusable("empty assistant message")
        replies = [turn["content"] for turn in turns if turn["role"] == "assistant"]
        if not replies:
            raise _Unusable("no assistant turn")
        reference = self.reference(row, replies[-1])
        if self.template is None:
            text, spans = self.fallback_render(turns)
            prefix = self.bos
        else:
            text, spans = self.template_render(turns)
            prefix = []  # the template writes BOS itself when the model wants one
        if text.rstrip().endswith(self.eos_text):
            # End at that EOS, as every other example does: whitespace after it is never generated.
            ids, labels, _ = self.tokenize(prefix, text.rstrip(), spans)
            return self.finish(ids, labels, None, reference=reference)
        ids, labels, _ = self.tokenize(prefix, text, spans)
        eos_label = self.eos_id if turns[-1]["role"] == "assistant" else IGNORE_INDEX
        return self.finish(ids, labels, eos_label, reference=reference)

    def fallback_render(self, turns: list[dict[str, str]]) -> tuple[str, list[Span]]:
        """Turns as a "### Role:" line and the content; an assistant turn and its closing EOS carry loss."""
        text = ""
        spans: list[Span] = []
        for turn in turns:
            if text:
                text += FALLBACK_TURN_SEPARATOR
            text += FALLBACK_TURN_HEADER.format(role=turn["role"].capitalize())
            start = len(text)
            text += turn["content"]
            if turn["role"] == "assistant":
                text += self.eos_text
                spans.append((start, len(text)))
        return text, spans

    def render(self, turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    def template_render(self, turns: list[dict[str, str]]) -> tuple[str, list[Span]]:
        """The template's text and each assistant turn's span in it.

        A turn's span is what rendering it adds after the generation prompt, end-of-turn marker included.
        That needs the rendering of a prefix of the conversation to be a prefix of the whole; where it is
        not (Qwen3 renders the last turn differently, Mistral moves the system prompt), the turn's content
        is searched for instead, plus the special token right after it.
        """
        try:
            text = self.render(turns, False)
        except TemplateError as error:
            raise _Unusable(f"chat template failed: {error}") from error
        spans: list[Span] = []
        for index, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            try:
                before = self.render(turns[:index], True)
                through = self.render(turns[: index + 1], False)
            except (TemplateError, ValueError):  # e.g. an assistant turn first: no prefix to render
                return text, self.searched_spans(turns, text)
            if not (through.startswith(before) and text.startswith(through)):
                return text, self.searched_spans(turns, text)
            spans.append((len(before), len(through)))
        return text, spans

    def searched_spans(self, turns: list[dict[str, str]], text: str) -> list[Span]:
        """Assistant spans found by looking for the user and assistant contents in order."""
        spans: list[Span] = []
        position = 0
        for turn in turns:
            if turn["role"] == "system":  # some templates move it into a later turn
                continue
            content = turn["content"].strip()
            start = text.find(content, position)
            if start < 0:
                raise _Unusable("the chat template does not render the messages verbatim")
            position = start + len(content)
            if turn["role"] == "assistant":
                marker = next((m for m in self.special_texts if text.startswith(m, position)), "")
                position += len(marker)
                spans.append((start, position))
        return spans

"""Fuzzes ``finetune validate`` and ``finetune render`` with seeded mutants of examples/*.yaml.

Each case is one mutant file, run in-process through the CLI's ``main``: ``validate``, then ``render``
when validate accepted it. A case is a traceback when an exception escapes ``main`` (SystemExit is an
exit code, not a traceback), a hang when it runs past ``--case-seconds``, and a wrong accept when
validate accepts a mutant that is invalid for certain (NaN, integers beyond int64, nesting past the
limit, an alias bomb, bytes that are not UTF-8, a control character, an unknown field in metadata or
spec, a bad namespace or label key) or when render fails on a manifest validate accepted.

    python benchmarks/fuzz_validate.py --seconds 600            # prints cases/tracebacks/hangs/accepts
    PYTHONPATH=/tmp/wt-before/operator/src:/tmp/wt-before/trainer/src python benchmarks/fuzz_validate.py

tests/test_fuzz_validate.py runs the same mutator for about a minute in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import select
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
_PLACEHOLDER = "FUZZ-PLACEHOLDER-7f3a"


@dataclass
class Case:
    """One mutant: the file's bytes, what was done, and whether validate must reject it."""

    data: bytes
    mutation: str
    must_reject: bool


@dataclass
class Outcome:
    case: Case
    validate_code: int | None = None
    render_code: int | None = None
    error: str | None = None  # a traceback that escaped main
    hang: bool = False
    seconds: float = 0.0

    @property
    def wrong_accept(self) -> bool:
        if self.validate_code != 0:
            return False
        return self.case.must_reject or self.render_code not in (None, 0)


@dataclass
class Summary:
    cases: int = 0
    tracebacks: list[Outcome] = field(default_factory=list)
    hangs: list[Outcome] = field(default_factory=list)
    wrong_accepts: list[Outcome] = field(default_factory=list)
    accepted: int = 0
    slowest: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.cases += 1
        self.slowest = max(self.slowest, outcome.seconds)
        if outcome.error is not None:
            self.tracebacks.append(outcome)
        if outcome.hang:
            self.hangs.append(outcome)
        if outcome.wrong_accept:
            self.wrong_accepts.append(outcome)
        if outcome.validate_code == 0:
            self.accepted += 1


# --- The mutator -------------------------------------------------------------------------------------

_HOSTILE_SCALARS: list[tuple[Any, bool]] = [
    # (value, must_reject wherever it lands)
    (float("nan"), True),
    (float("inf"), True),
    (float("-inf"), True),
    (2**63, True),
    (-(2**63) - 1, True),
    (10**40, True),
    (2**63 - 1, False),
    (-1, False),
    (0, False),
    (1.5, False),
    (2.0, False),
    (True, False),
    (None, False),
    ("", False),
    ("x" * 5000, False),
    ("a\u202eb", False),
    ("tab\there", False),
    ("null\x00byte", False),
    ("line\nbreak", False),
    ("ümlaut-名前", False),
    ([], False),
    ({}, False),
    ([1, "two", None], False),
    ({"k": "v"}, False),
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _set(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    holder = document
    for part in path[:-1]:
        holder = holder[part]
    holder[path[-1]] = value
    return document


def _deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _billion_laughs(levels: int = 9) -> str:
    lines = ['  l0: &l0 "lol"']
    for level in range(1, levels):
        refs = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"  l{level}: &l{level} [{refs}]")
    return "\n".join(lines)


def _dump(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1000)


def _structural(rng: random.Random, document: Any) -> Case:
    """A change to the parsed example, dumped back to YAML."""
    document = copy.deepcopy(document)
    paths = list(_paths(document))
    path = rng.choice(paths[1:])
    kind = rng.randrange(10)
    if kind <= 2:
        value, must_reject = rng.choice(_HOSTILE_SCALARS)
        _set(document, path, value)
        return Case(_dump(document).encode(), f"set {path} to {value!r:.40}", must_reject)
    if kind == 3:
        depth = rng.choice([10, 63, 65, 100, 400, 3000])
        _set(document, path, _PLACEHOLDER)
        text = _dump(document).replace(_PLACEHOLDER, _deep(depth))
        return Case(text.encode(), f"nest {path} {depth} deep", depth > 64)
    if kind == 4:  # delete a field
        holder = document
        for part in path[:-1]:
            holder = holder[part]
        del holder[path[-1]]
        return Case(_dump(document).encode(), f"delete {path}", False)
    if kind == 5:  # an unknown field, in metadata or spec for certain (where unknown fields are errors)
        where = rng.choice(["metadata", "spec"])
        key = rng.choice(["bogus", "k" * 3000, "a\u202ekey", "x\x00y", "1", ""])
        document.setdefault(where, {})[key] = rng.choice([1, "v", None, [1]])
        return Case(_dump(document).encode(), f"unknown {where} field {key!r:.40}", True)
    if kind == 6:  # metadata as the API server checks it
        metadata = document.setdefault("metadata", {})
        choice = rng.randrange(8)
        if choice == 0:
            metadata.pop("name", None)
            return Case(_dump(document).encode(), "no name", True)
        if choice == 1:
            metadata.pop("name", None)
            metadata["generateName"] = rng.choice(["job-", "a" * 47, "a" * 48, "Bad-", "1job-", "job"])
            return Case(_dump(document).encode(), f"generateName {metadata['generateName']!r}", False)
        if choice == 2:
            metadata["namespace"] = rng.choice(["Bad_NS", "-ns", "n" * 64, "a.b", ""])
            must = metadata["namespace"] != ""
            return Case(_dump(document).encode(), f"namespace {metadata['namespace']!r}", must)
        if choice == 3:
            key = rng.choice(["-bad", "a/b/c", "x" * 64, "UPPER.example.com/x", "ok/"])
            metadata.setdefault("labels", {})[key] = "v"
            return Case(_dump(document).encode(), f"label key {key!r}", True)
        if choice == 4:
            value = rng.choice(["-v", "v" * 64, "a b", None, 3])
            metadata.setdefault("labels", {})["app"] = value
            return Case(_dump(document).encode(), f"label value {value!r}", value is not None)
        if choice == 5:
            metadata.setdefault("annotations", {})["big"] = "x" * (257 * 1024)
            return Case(_dump(document).encode(), "annotations over 256 KiB", True)
        if choice == 6:
            metadata["deletionGracePeriodSeconds"] = rng.choice([30, "30", 2**70])
            return Case(_dump(document).encode(), "deletionGracePeriodSeconds", False)
        metadata["name"] = rng.choice(["x" * 53, "UPPER", "a" * 52, "ok-name"])
        return Case(_dump(document).encode(), f"name {metadata['name']!r:.20}", False)
    if kind == 7:  # swap a type: a mapping for a list, a string for a number
        current: Any = document
        for part in path:
            current = current[part]
        swapped = (
            [current]
            if isinstance(current, dict)
            else {"0": current}
            if isinstance(current, list)
            else str(current)
        )
        _set(document, path, swapped)
        return Case(_dump(document).encode(), f"swap type at {path}", False)
    if kind == 8:  # an alias bomb in an unknown field or in deepspeed.config
        text = _dump(document)
        if rng.random() < 0.5:
            text += "bomb:\n" + _billion_laughs(rng.choice([3, 6, 9]))
        else:
            text = text.replace(
                "spec:\n", "spec:\n  deepspeed:\n    config:\n" + _billion_laughs(9) + "\n", 1
            )
        return Case(text.encode(), "alias bomb", True)
    # huge number text that Python's int() refuses (more than 4,300 digits)
    _set(document, path, _PLACEHOLDER)
    digits = rng.choice([19, 20, 400, 5000])
    text = _dump(document).replace(f"{_PLACEHOLDER}", "9" * digits)
    return Case(text.encode(), f"{digits}-digit number at {path}", digits > 18)


_INSERTS = [b"\x00", b"\x07", b"\x1b[31m", b"\x7f", b"\x85", b"\xc3\x28", b"\xff", b"\xef\xbb\xbf", b"\t"]
_INSERTS += [
    b"\xe2\x80\xae",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"!!set ",
    b"!!python/object ",
    b"? ",
    b"- ",
    b": ",
]
_INSERTS += [
    b"{",
    b"[",
    b"}",
    b"]",
    b'"',
    b"'",
    b"\n",
    b"#",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n",
    b".nan",
    b"1e999",
]
_INSERTS += [b"2024-01-01", b"0x1F", b"0o17", b"~", b"<<: ", b"|", b">"]


def _bytewise(rng: random.Random, data: bytes) -> Case:
    """Flips, inserts or deletes a few bytes of the example's text."""
    buffer = bytearray(data)
    must_reject = False
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(buffer) + 1)
        kind = rng.randrange(4)
        if kind == 0 and buffer:
            buffer[min(at, len(buffer) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            insert = rng.choice(_INSERTS)
            buffer[at:at] = insert
        elif kind == 2:
            del buffer[at : at + rng.randint(1, 8)]
        else:
            insert = bytes([rng.randrange(256)])
            buffer[at:at] = insert
    # Only the bytes that no valid YAML holds anywhere make the result invalid for certain.
    try:
        text = bytes(buffer).decode("utf-8")
    except UnicodeDecodeError:
        must_reject = True
    else:
        if any(ch in text for ch in "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f\x1b\x7f"):
            must_reject = True
    return Case(bytes(buffer), "bytes changed", must_reject)


def mutants(seed: int, examples: list[Path] = EXAMPLES) -> Iterator[Case]:
    """An endless, reproducible stream of mutants of the examples."""
    rng = random.Random(seed)
    sources = [path.read_bytes() for path in examples]
    documents = [yaml.safe_load(data) for data in sources]
    while True:
        which = rng.randrange(len(sources))
        if rng.random() < 0.4:
            yield _bytewise(rng, sources[which])
        else:
            yield _structural(rng, documents[which])


# --- Running a case ----------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    from finetune_operator.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return main(argv)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 1


def _outcome_of(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    try:
        result["validate"] = _main(["validate", str(path)])
        if result["validate"] == 0:
            result["render"] = _main(["render", str(path)])
    except Exception:
        result["error"] = traceback.format_exc()
    return result


def run_case(case: Case, folder: Path, case_seconds: float, fork: bool = True) -> Outcome:
    """Runs one case; with ``fork``, in a forked child that is killed past ``case_seconds`` (a hang in C
    code, json.dumps of a billion laughs say, ignores Python's signals)."""
    path = folder / "case.yaml"
    path.write_bytes(case.data)
    outcome = Outcome(case)
    started = time.monotonic()
    result = _in_child(path, case_seconds) if fork else _outcome_of(path)
    outcome.seconds = time.monotonic() - started
    outcome.hang = bool(result.get("hang")) or outcome.seconds > case_seconds
    outcome.validate_code = result.get("validate")
    outcome.render_code = result.get("render")
    outcome.error = result.get("error")
    if outcome.render_code not in (None, 0) and outcome.error is None:
        outcome.error = "render failed on a manifest validate accepted"
    return outcome


def _in_child(path: Path, case_seconds: float) -> dict[str, Any]:
    import finetune_operator.cli  # noqa: F401  (imported once, in the parent, and inherited)

    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(reader)
        code = 0
        try:
            payload = json.dumps(_outcome_of(path)).encode()
            with os.fdopen(writer, "wb") as pipe:
                pipe.write(payload)
        except BaseException:
            code = 1
        os._exit(code)
    os.close(writer)
    chunks: list[bytes] = []
    deadline = time.monotonic() + case_seconds
    hang = False
    with os.fdopen(reader, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([pipe], [], [], max(left, 0))
            if not ready:
                hang = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if hang:
        return {"hang": True}
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return {"error": f"the child died (wait status {status})"}


def fuzz(seed: int, seconds: float, case_seconds: float, max_cases: int | None = None) -> Summary:
    summary = Summary()
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as folder:
        for case in mutants(seed):
            if time.monotonic() > deadline or (max_cases is not None and summary.cases >= max_cases):
                break
            summary.add(run_case(case, Path(folder), case_seconds))
    return summary


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--case-seconds", type=float, default=5.0, help="a case slower than this hangs")
    parser.add_argument("--show", type=int, default=5, help="examples of each failure to print")
    args = parser.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    summary = fuzz(args.seed, args.seconds, args.case_seconds, args.cases)
    print(
        f"cases {summary.cases}  tracebacks {len(summary.tracebacks)}  hangs {len(summary.hangs)}  "
        f"wrong accepts {len(summary.wrong_accepts)}  accepted {summary.accepted}  "
        f"slowest {summary.slowest:.2f} s"
    )
    distinct: dict[str, Outcome] = {}
    for outcome in summary.tracebacks:
        distinct.setdefault(_last_line(outcome.error), outcome)
    for line, outcome in list(distinct.items())[: args.show]:
        print(f"  traceback: {line}  [{outcome.case.mutation}]")
    for outcome in summary.hangs[: args.show]:
        print(f"  hang: [{outcome.case.mutation}]")
    accepts: dict[str, Outcome] = {}
    for outcome in summary.wrong_accepts:
        accepts.setdefault(outcome.case.mutation.split(" at ")[0][:60], outcome)
    for mutation, _ in list(accepts.items())[: args.show * 2]:
        print(f"  wrong accept: [{mutation}]")
    print(json.dumps({"kinds_of_tracebacks": len(distinct)}))
    return 0 if not (summary.tracebacks or summary.hangs or summary.wrong_accepts) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A seeded fuzz of `finetune validate` and `finetune render` over mutants of examples/*.yaml.

The mutator is benchmarks/fuzz_validate.py's (flipped and inserted bytes, swapped types, deep nesting,
huge numbers, NaN and infinities, unicode controls, alias bombs, metadata as the API server checks it),
run here for about 40 seconds; the benchmark runs it for longer (`--seconds 600`). Each case runs in a
forked child that is killed after 5 s: no exception escapes the CLI's main, no case hangs, nothing
invalid for certain is accepted, and every accepted manifest renders.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ_SECONDS = 40.0


def _fuzzer():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fuzz_validate", ROOT / "benchmarks" / "fuzz_validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_validate"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="the fuzzer forks a child per case")
def test_fuzzed_manifests_never_crash_hang_or_wrongly_pass() -> None:
    fuzz = _fuzzer()
    summary = fuzz.fuzz(seed=12, seconds=FUZZ_SECONDS, case_seconds=5.0)
    assert summary.cases > 100
    problems = [
        *(f"traceback [{o.case.mutation}]: {o.error}" for o in summary.tracebacks[:3]),
        *(f"hang [{o.case.mutation}]" for o in summary.hangs[:3]),
        *(f"wrong accept [{o.case.mutation}]" for o in summary.wrong_accepts[:3]),
    ]
    assert not problems, "\n".join(problems)
    assert summary.accepted > 0  # the mutants are not all rejected: render ran on the accepted ones

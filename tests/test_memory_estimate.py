"""The memory-fit estimate (api/memory_fit.py) against what ranks really hold: `finetune run` with 2 gloo
ranks on the CPU, a random Llama of 84 M parameters in fp32 (0.32 GiB), each rank's peak PSS sampled from
/proc (benchmarks/memory.py), less the same job's peak on the tiny model (torch, DeepSpeed, the
interpreter). Below ZeRO-3 the estimate of a rank's tensors must be within 35 % of that.

ZeRO-3 is not held to it yet: on the benchmark's 1.24 GiB model its ranks hold 1.4x the estimate
(docs/PERFORMANCE.md, issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.memory import our_estimate, parse_args, prepare_store, run_job

TOLERANCE = 0.35
SHAPE = ["--hidden", "1024", "--layers", "8", "--heads", "8", "--steps", "4", "--seq", "64"]


@pytest.mark.system
def test_the_estimate_is_near_the_measured_peak_below_zero3(tmp_path: Path) -> None:
    args = parse_args([*SHAPE, "--zero", "2", "--precision", "fp32"])
    store = tmp_path / "s3"
    prepare_store(store, args)
    overhead = max(run_job(store, "tiny", args)["peaks"]["whole run"])
    found = {}
    for method in ("lora", "full"):
        measured = max(run_job(store, method, args)["peaks"]["whole run"]) - overhead
        estimated = our_estimate(store / "models" / "big", method, args)
        found[method] = (round(measured / 2**20), round(estimated / 2**20))
    for measured, estimated in found.values():
        assert abs(measured - estimated) <= TOLERANCE * estimated, f"MiB measured, estimated: {found}"

"""The memory-fit estimate (api/memory_fit.py) against what ranks really hold: `finetune run` with 2 gloo
ranks on the CPU, a random Llama of 84 M parameters in fp32 (0.32 GiB), each rank's peak PSS sampled from
/proc (benchmarks/memory.py), less the same job's peak on the tiny model (torch, DeepSpeed, the
interpreter). The estimate of a rank's tensors must be within 35 % of that: below ZeRO-3 for LoRA and
full fine-tuning, at ZeRO-3 for full fine-tuning (0.98x measured, 2026-12-05).

ZeRO-3 LoRA is not held to it yet: its ranks hold 1.47x the estimate on the benchmark's 1.24 GiB model,
the gathered layers of the frozen base beside the partitions (docs/PERFORMANCE.md, issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.memory import our_estimate, parse_args, prepare_store, run_job

TOLERANCE = 0.35
SHAPE = ["--hidden", "1024", "--layers", "8", "--heads", "8", "--steps", "4", "--seq", "64"]


@pytest.mark.system
@pytest.mark.parametrize(("zero", "methods"), [(2, ("lora", "full")), (3, ("full",))])
def test_the_estimate_is_near_the_measured_peak(tmp_path: Path, zero: int, methods: tuple[str, ...]) -> None:
    args = parse_args([*SHAPE, "--zero", str(zero), "--precision", "fp32"])
    store = tmp_path / "s3"
    prepare_store(store, args)
    overhead = max(run_job(store, "tiny", args)["peaks"]["whole run"])
    found = {}
    for method in methods:
        measured = max(run_job(store, method, args)["peaks"]["whole run"]) - overhead
        estimated = our_estimate(store / "models" / "big", method, args)
        found[method] = (round(measured / 2**20), round(estimated / 2**20))
    for measured, estimated in found.values():
        assert abs(measured - estimated) <= TOLERANCE * estimated, f"MiB measured, estimated: {found}"

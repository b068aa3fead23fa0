"""ZeRO-3's master weights are the rank's partition itself when that already is fp32
(``finetune_trainer.zero3_master_weights``): DeepSpeed as it is clones it, a second fp32 copy per rank.
Sharing changes nothing of the training (the same weights after 3 steps, bit for bit, on 2 gloo ranks,
also when the third step resumes from a checkpoint), and bf16 partitions still get their fp32 master copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer_runs import run_ranks


def _ranks(out: Path, precision: str) -> dict:
    run_ranks("tests.zero3_master_ranks", [str(out), precision], processes=2)
    return json.loads((out / f"{precision}.json").read_text())


@pytest.mark.system
def test_fp32_partitions_are_their_own_master_weights_and_train_the_same(tmp_path: Path) -> None:
    report = _ranks(tmp_path, "fp32")
    plain, shared = report["plain"], report["shared"]
    assert plain["aliased"] and not any(plain["aliased"])  # DeepSpeed alone: a clone per group
    assert plain["distinct_master_bytes"] > 0
    assert shared["aliased"] == [True] * len(plain["aliased"])
    assert shared["distinct_master_bytes"] == 0
    assert shared["losses"] == plain["losses"]
    assert report["resumed"]["aliased"] == shared["aliased"]
    assert report["resumed"]["losses"] == plain["losses"][2:]  # the checkpoint restored the third step
    assert report["same_weights"] == {"plain": True, "shared": True, "resumed": True}


@pytest.mark.system
def test_bf16_partitions_keep_an_fp32_master_copy(tmp_path: Path) -> None:
    report = _ranks(tmp_path, "bf16")
    assert not any(report["shared"]["aliased"])
    assert report["shared"]["distinct_master_bytes"] == report["plain"]["distinct_master_bytes"] > 0
    assert report["shared"]["losses"] == report["plain"]["losses"]
    assert report["same_weights"] == {"plain": True, "shared": True, "resumed": True}

"""returning_freed_memory: blocks freed inside it go back to the OS, where glibc's heap keeps them
otherwise. Each case runs in a fresh interpreter, so the allocator starts from the same state."""

from __future__ import annotations

import subprocess
import sys

import pytest
from finetune_trainer.host_memory import trims_heap_each_pass

# After a 16 MiB tensor is freed, glibc's dynamic mmap threshold is 16 MiB: 1 MiB tensors come from the
# heap. Every other one of 256 is freed, leaving holes the heap cannot shrink around. Prints the MiB
# the process's RSS fell by when they were freed.
PROBE = """
import sys, torch
from finetune_trainer.host_memory import loop_mmap_threshold, returning_freed_memory, trim_heap

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

big = torch.ones(4 * 2**20)
del big
def churn(elements):
    blocks = [torch.ones(elements) for _ in range(2**26 // elements)]
    before = rss()
    del blocks[::2]
    return before - rss()

if sys.argv[1] == "inside":
    with returning_freed_memory():
        fell = churn(2**18)
elif sys.argv[1].startswith("loop-after-zero"):
    # The training loop after setup: 4 MiB tensors (a gathered layer's size) freed there.
    with returning_freed_memory(loop_mmap_threshold(int(sys.argv[1][-1]))):
        pass
    fell = churn(2**20)
elif sys.argv[1] == "trimmed":
    # The holes the heap keeps, given back by trim_heap (as the ZeRO-3 CPU loop does each pass).
    fell = churn(2**18)
    before = rss()
    trim_heap()
    fell += before - rss()
else:
    fell = churn(2**18)
print(round(fell))
"""


def freed_mib(case: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, case], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def test_freed_blocks_go_back_to_the_os_inside_and_stay_in_the_heap_outside() -> None:
    assert freed_mib("outside") < 16  # the heap keeps the holes
    assert freed_mib("inside") > 100  # 128 MiB freed, unmapped at once


def test_zero3s_training_loop_maps_layer_sized_blocks_and_the_others_keep_the_heap() -> None:
    assert freed_mib("loop-after-zero3") > 100  # ZeRO-3's per-step gathers: unmapped when freed
    assert freed_mib("loop-after-zero2") < 16  # below ZeRO-3 the loop reuses the heap


def test_trimming_gives_the_heaps_holes_back() -> None:
    assert freed_mib("trimmed") > 100  # the 128 MiB of holes "outside" keeps


@pytest.mark.parametrize(
    ("zero_stage", "device", "trims"),
    [(3, "cpu", True), (3, "cuda", False), (2, "cpu", False), (0, "cpu", False)],
)
def test_only_zero3_on_cpu_ranks_trims_each_pass(zero_stage: int, device: str, trims: bool) -> None:
    assert trims_heap_each_pass(zero_stage, device) is trims

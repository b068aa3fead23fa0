"""returning_freed_memory: blocks freed inside it go back to the OS, where glibc's heap keeps them
otherwise. Each case runs in a fresh interpreter, so the allocator starts from the same state."""

from __future__ import annotations

import subprocess
import sys

# After a 16 MiB tensor is freed, glibc's dynamic mmap threshold is 16 MiB: 1 MiB tensors come from the
# heap. Every other one of 256 is freed, leaving holes the heap cannot shrink around. Prints the MiB
# the process's RSS fell by when they were freed.
PROBE = """
import sys, torch
from finetune_trainer.host_memory import returning_freed_memory

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

big = torch.ones(4 * 2**20)
del big
def churn():
    blocks = [torch.ones(2**18) for _ in range(256)]
    before = rss()
    del blocks[::2]
    return before - rss()

if sys.argv[1] == "inside":
    with returning_freed_memory():
        fell = churn()
else:
    fell = churn()
print(round(fell))
"""


def freed_mib(case: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, case], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def test_freed_blocks_go_back_to_the_os_inside_and_stay_in_the_heap_outside() -> None:
    assert freed_mib("outside") < 16  # the heap keeps the holes
    assert freed_mib("inside") > 100  # 128 MiB freed, unmapped at once

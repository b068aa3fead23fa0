"""Host memory freed while loading, partitioning, training and saving a model goes back to the OS.

Those phases allocate and free whole layers (ZeRO-3 gathers each module to load it, DeepSpeed flattens
and partitions, saving gathers again). glibc's malloc serves blocks under its mmap threshold from the
heap and keeps them when freed, and it raises that threshold (up to 32 MiB) after each large free, so a
rank keeps the high-water mark of those phases for the rest of the run: measured with 2 ZeRO-3 ranks, a
rank held 680 MiB more after loading an 84 M-parameter fp32 model than before, for a 162 MiB partition
(benchmarks/memory.py). Inside :func:`returning_freed_memory` blocks of 128 KiB and more are mapped on
their own, so freeing them unmaps them; afterwards the heap is trimmed and the training loop gets its
own threshold (:func:`loop_mmap_threshold`). Python and torch expose no allocator control; glibc's
``mallopt``/``malloc_trim`` through ctypes is the interface. Elsewhere than glibc (musl, macOS) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
PHASE_MMAP_THRESHOLD = 128 * 1024
LOOP_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest dynamic threshold on 64-bit
ZERO3_LOOP_MMAP_THRESHOLD = 2 * 1024 * 1024


def loop_mmap_threshold(zero_stage: int) -> int:
    """The training loop's mmap threshold. Below ZeRO-3 the loop's tensors come from the heap and are
    reused, not mapped and faulted in each step. ZeRO-3 on the CPU gathers every layer's weights (and,
    training them, their gradients) afresh each step, in sizes that fragment the heap: with 2 gloo
    ranks, a 1.24 GiB fp32 Llama and LoRA, the ranks' heaps held 1-1.9 GB of freed blocks, and mapping
    blocks of 2 MiB and more on their own took the run's summed peak from 6.02 to 3.08 GiB
    (docs/PERFORMANCE.md). The smaller tensors (activations, LoRA's) stay on the heap."""
    return ZERO3_LOOP_MMAP_THRESHOLD if zero_stage == 3 else LOOP_MMAP_THRESHOLD


def trims_heap_each_pass(zero_stage: int, device_type: str) -> bool:
    """Whether the training loop gives the heap's free pages back before each backward and after each
    step (:func:`trim_heap`). On CPU ranks under ZeRO-3 the loop's activations and gradients come
    from the heap between the mapped gathers and leave holes in it that glibc keeps resident: with 2
    gloo ranks, a 1.24 GiB fp32 Llama and LoRA, each rank's heap held about 120 MiB free, and trimming
    there took the steady phase's summed peak from 3.17 to 2.98-3.00 GiB at no measurable cost in time
    (docs/PERFORMANCE.md). On GPUs those tensors are GPU memory; below ZeRO-3 the heap is reused."""
    return zero_stage == 3 and device_type == "cpu"


def trim_heap() -> None:
    """Gives the heap's free pages back to the OS now (glibc's ``malloc_trim``, every arena)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@cache
def _glibc() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - present only in glibc
    except (OSError, AttributeError, TypeError):
        return None
    return libc


@contextmanager
def returning_freed_memory(loop_threshold: int = LOOP_MMAP_THRESHOLD) -> Iterator[None]:
    """Large blocks freed inside go back to the OS at once; on the way out the heap is trimmed and the
    mmap threshold set to ``loop_threshold`` for what follows."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, PHASE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, loop_threshold)
        trim_heap()

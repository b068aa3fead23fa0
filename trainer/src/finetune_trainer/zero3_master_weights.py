"""ZeRO-3 without a second copy of a rank's partition when the weights already are the master dtype.

DeepSpeed's stage 3 keeps "master" weights for the optimizer beside the partitioned weights the model
computes with. When both are fp32 (fp32 training, as on CPUs, or torch autocast) it means to share one
tensor (``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions``: "we don't need another copy of the
weights"), but it decides that with ``partition.device == self.device``, where ``self.device`` is the
accelerator's device *name*, a ``str``, and a ``torch.device`` never equals a ``str``. So every rank
clones its whole fp32 partition: 4 more bytes a trained parameter (0.62 GiB a rank of the 330 M-parameter
model of benchmarks/memory.py, at 2 ranks). DeepSpeed 0.19 offers no setting for it; the fix is to ask
the question with a ``torch.device`` while those partitions are created, so DeepSpeed's own sharing
branch runs, and nothing else of DeepSpeed changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3


def _with_device_as_torch_device(create: Callable[[Any], None]) -> Callable[[Any], None]:
    def create_fp32_partitions(optimizer: Any) -> None:
        name = optimizer.device
        if optimizer.offload_optimizer or isinstance(name, torch.device):
            create(optimizer)  # offloaded master weights are their own copy by design
            return
        optimizer.device = torch.device(name)
        try:
            create(optimizer)
        finally:
            optimizer.device = name

    return create_fp32_partitions


@contextmanager
def master_weights_shared_when_same_dtype() -> Iterator[None]:
    """Around ``deepspeed.initialize``: ZeRO-3's master weights are the partition itself where its dtype
    and device already are the master's (fp32 weights); a bf16 or fp16 partition still gets its fp32
    master copy, and offloaded optimizers are untouched."""
    create = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions
    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = _with_device_as_torch_device(create)
    try:
        yield
    finally:
        DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create

"""Agreement between ranks on one small number: the same answer on every rank, from one all-reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _reduce(value: int, device: torch.device, op: dist.ReduceOp) -> int:
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def largest(value: int, device: torch.device) -> int:
    """The largest of every rank's value."""
    return _reduce(value, device, dist.ReduceOp.MAX)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True everywhere when it is true on some rank."""
    return largest(int(flag), device) == 1


def every_rank(flag: bool, device: torch.device) -> bool:
    """True everywhere only when it is true on every rank."""
    return _reduce(int(flag), device, dist.ReduceOp.MIN) == 1

"""Run by tests/test_zero3_master_weights.py under torchrun with 2 gloo ranks: trains the same random
Llama for 3 ZeRO-3 steps with DeepSpeed as it is and inside
``zero3_master_weights.master_weights_shared_when_same_dtype``, and has rank 0 write
``<out>/<precision>.json``: whether each run's master weights were the partition itself, the bytes of
distinct master storage per rank, the losses, and whether the gathered weights after training equal
DeepSpeed's own; a third run resumes the shared one from its checkpoint after step 2.

    torchrun --nproc-per-node 2 -m tests.zero3_master_ranks OUT PRECISION
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from finetune_trainer.zero3_master_weights import master_weights_shared_when_same_dtype
from transformers import LlamaConfig, LlamaForCausalLM


def train(shared: bool, precision: str, checkpoints: Path, resume: bool = False) -> dict[str, object]:
    """3 steps; with ``resume``, loads the checkpoint a shared run wrote after its second step and takes
    only the third."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": precision == "bf16"},
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scope = master_weights_shared_when_same_dtype() if shared else contextlib.nullcontext()
    with scope:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    zero = engine.optimizer
    masters, partitions = zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat
    aliased = [m.data_ptr() == p.data_ptr() for m, p in zip(masters, partitions, strict=True)]
    distinct = sum(m.numel() * m.element_size() for m, a in zip(masters, aliased, strict=True) if not a)
    batches = torch.Generator().manual_seed(1 + dist.get_rank())
    losses = []
    if resume:
        engine.load_checkpoint(str(checkpoints), tag="step2")
    for step in range(1, 4):
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=batches)
        if resume and step < 3:
            continue
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if shared and not resume and step == 2:
            engine.save_checkpoint(str(checkpoints), tag="step2")
    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        weights = [p.detach().float().clone() for p in parameters]
    return {"aliased": aliased, "distinct_master_bytes": distinct, "losses": losses, "weights": weights}


def main(out: Path, precision: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    checkpoints = out / f"checkpoints-{precision}"
    plain, shared = train(False, precision, checkpoints), train(True, precision, checkpoints)
    resumed = train(True, precision, checkpoints, resume=True)
    runs = {"plain": plain, "shared": shared, "resumed": resumed}
    same = {
        name: all(torch.equal(a, b) for a, b in zip(plain["weights"], run["weights"], strict=True))
        for name, run in runs.items()
    }
    if dist.get_rank() == 0:
        report = {name: {k: v for k, v in run.items() if k != "weights"} for name, run in runs.items()}
        (out / f"{precision}.json").write_text(json.dumps(report | {"same_weights": same}))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as in tests/sharded_load_ranks.py: no gloo teardown once everything is written


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

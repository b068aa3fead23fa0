"""Run by tests/test_sharded_loading.py under torchrun with gloo ranks: loads each model directory
given with ``finetune_trainer.sharded_loading.load_partitioned`` under ZeRO-3, gathers every parameter
and persistent buffer, and has rank 0 save what the ranks held as ``<out>/<case>.safetensors``, with
each rank's loaded bytes and whether the loader took the checkpoint in ``<out>/<case>.json``.

    torchrun --nproc-per-node 3 -m tests.sharded_load_ranks OUT DTYPE CASE=MODEL_DIR ...
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from finetune_trainer.modeling import DTYPES, held_parameter_bytes
from finetune_trainer.sharded_loading import load_partitioned
from safetensors.torch import save_file
from transformers.integrations import HfDeepSpeedConfig


def main(out: Path, precision: str, cases: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": precision == "bf16"},
    }
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers holds it by a weak reference
    rank = dist.get_rank()
    for case in cases:
        name, model_dir = case.split("=", 1)
        model = load_partitioned(Path(model_dir), DTYPES[precision])
        held = torch.tensor([held_parameter_bytes(model) if model is not None else 0])
        everyone = [torch.zeros_like(held) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, held)
        if model is not None:
            parameters = [p for _, p in model.named_parameters()]
            with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
                state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
            if rank == 0:
                save_file(state, out / f"{name}.safetensors")
        if rank == 0:
            report = {"loaded": model is not None, "held": [int(t) for t in everyone]}
            if model is not None:
                report |= {
                    "tied": tied,
                    "training": model.training,
                    "eos": model.generation_config.eos_token_id,
                }
            (out / f"{name}.json").write_text(json.dumps(report))
        dist.barrier()
    # Every rank is done and rank 0 has written everything: leave without running destructors. Tearing
    # gloo down with 3 ranks once aborted a rank ("terminate called without an active exception")
    # after all of its work was done.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])

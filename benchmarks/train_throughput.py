"""Tokens/s and MFU of the trainer's own optimizer step for a model shape, method and ZeRO stage.

It builds a Llama-shaped model with random weights, applies the method the way the trainer does
(``modeling.apply_method``), wraps it in the trainer's DeepSpeed engine
(``training_support.build_engine``) and times ``training_support.optimizer_step`` on full-length
packed sequences: the same code a job runs, minus S3 and data preparation.

FLOPs per token (PaLM appendix B, counting no recomputation from gradient checkpointing):
    2N forward + 2N backward through activations + 2N_trainable weight gradients
    + 12 * layers * hidden * sequence for attention scores,
so 6N + 12LHT for full fine-tuning and about 4N + 12LHT for LoRA (N_trainable << N).
MFU = FLOPs per token x tokens/s / peak FLOP/s of the device (--peak-tflops; 989 for an H100's dense
bf16). Run single-process (it sets up a world of one) or under torchrun for several ranks.

    python benchmarks/train_throughput.py --method lora --hidden 4096 --layers 32 --heads 32 \
        --kv-heads 8 --intermediate 14336 --vocab 128256 --seq 4096 --precision bf16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from finetune_operator.api.resolve import resolve_trainer_config
from finetune_operator.api.validation import parse_finetune_job
from finetune_trainer.data import Example, collate
from finetune_trainer.modeling import apply_method, parameter_counts
from finetune_trainer.training_support import Plan, build_engine, init_distributed, optimizer_step
from transformers import LlamaConfig, LlamaForCausalLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=["full", "lora", "freeze"], default="lora")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="fp32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="sequences per device per micro-step")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for name, value in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29511"),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
    ):
        os.environ.setdefault(name, value)
    gpus = 1 if torch.cuda.is_available() else 0
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": "benchmark", "namespace": "bench"},
        "spec": {
            "model": {"uri": "s3://bench/model/"},
            "dataset": {"train": "s3://bench/train.jsonl", "maxSeqLength": args.seq, "packing": True},
            "method": {"type": args.method},
            "hyperparameters": {
                "maxSteps": args.steps + args.warmup,
                "batchSizePerDevice": args.batch,
                "gradientAccumulationSteps": args.accumulation,
                "precision": args.precision,
                "gradientCheckpointing": args.gradient_checkpointing,
            },
            "deepspeed": {"zeroStage": args.zero},
            "resources": {"gpusPerNode": gpus},
            "output": {"uri": "s3://bench/out/"},
        },
    }
    config = resolve_trainer_config(parse_finetune_job(manifest))
    ranks = init_distributed(config)
    shape = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    with ranks.device:
        model = LlamaForCausalLM(shape).to(dtype if gpus else torch.float32)
    model = apply_method(model, config)
    trainable, total = parameter_counts(model)
    engine = build_engine(config, model, Plan(1, args.accumulation, args.steps + args.warmup), ranks)

    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).tolist()
            yield [Example(row, row) for row in ids]

    stream = batches()
    loss_sum = torch.zeros((), device=ranks.device, dtype=torch.float64)
    tokens = torch.zeros((), device=ranks.device, dtype=torch.float64)
    for _ in range(args.warmup):
        optimizer_step(engine, stream, lambda b: collate(b, 0), args.accumulation, loss_sum, tokens)
    if gpus:
        torch.cuda.synchronize()
    tokens.zero_()
    started = time.perf_counter()
    for _ in range(args.steps):
        optimizer_step(engine, stream, lambda b: collate(b, 0), args.accumulation, loss_sum, tokens)
    if gpus:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_second = tokens.item() * ranks.world_size / seconds
    attention = 12 * args.layers * args.hidden * args.seq
    flops_per_token = 4 * total + 2 * trainable + attention
    achieved = flops_per_token * tokens_per_second / ranks.world_size
    result = {
        "device": torch.cuda.get_device_name() if gpus else "cpu",
        "ranks": ranks.world_size,
        "method": args.method,
        "zeroStage": args.zero,
        "precision": args.precision,
        "parameters": total,
        "trainableParameters": trainable,
        "sequenceLength": args.seq,
        "tokensPerSecond": round(tokens_per_second, 1),
        "flopsPerToken": flops_per_token,
        "achievedTflopsPerRank": round(achieved / 1e12, 4),
        "mfu": round(achieved / (args.peak_tflops * 1e12), 4) if args.peak_tflops else None,
        "secondsPerStep": round(seconds / args.steps, 4),
    }
    if ranks.rank == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Host memory of each rank of a ZeRO-3 run through ``finetune run``, per phase, as PSS.

It builds a store folder with a random Llama-shaped model (``finetune_trainer.tiny.build_tiny_model``
with a wide hidden size: about 1.3 GB of fp32 safetensors by default) and chat rows, runs a short
2-rank CPU job through ``finetune run job.yaml --store DIR`` (the user's command: the CLI, the
launcher, torchrun, gloo), and samples every process of that command's tree every 0.1 s
(``tests/proc_memory.py``: PSS from /proc/<pid>/smaps_rollup, so pages two ranks share are counted
once). Each rank's peak is reported per phase, the phases cut by the trainer's own log lines:

- loading: from the start to the last rank's "method ... parameters train" line (the model loaded and
  its method applied; the download and the data preparation are in it too);
- engine + first step: to rank 0's "step 1/N" line (deepspeed.initialize, the first optimizer step);
- steady: to the "step N/N" line;
- save: to the end (the final outputs: ZeRO-3 gathers the weights).

The same job on the tiny model (hidden 64, 2 layers) is the fixed overhead (torch, DeepSpeed,
the interpreter). For full fine-tuning the peak is set against DeepSpeed's own estimate of the
partitioned model states (``estimate_zero3_model_states_mem_needs``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py --methods tiny,lora,full
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.proc_memory import Sample, TreeSampler

GIB = 1024**3
RANK_NEEDLE = "-m finetune_trainer --config"
LOADED = re.compile(r"rank (\d+) INFO \S+: method \S+: \d+ of \d+ parameters train")
STEP = re.compile(r"rank 0 INFO \S+: step (\d+)/(\d+) ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="tiny,lora,full", help="comma-separated: tiny, lora, full")
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument(
        "--deepspeed-config",
        type=json.loads,
        default={},
        help="JSON for spec.deepspeed.config, to measure a setting: "
        '\'{"zero_optimization": {"stage3_max_live_parameters": 0}}\'',
    )
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--work", type=Path, default=None, help="keep the store here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def manifest(model: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    kind = "full" if method == "full" else "lora"
    spec_method: dict[str, Any] = {"type": kind}
    if kind == "lora":
        spec_method["lora"] = {"r": 4, "alpha": 8}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": f"memory-{method}", "namespace": "bench"},
        "spec": {
            "model": {"uri": f"s3://models/{model}/"},
            "dataset": {"train": "s3://datasets/capitals/train.jsonl", "maxSeqLength": args.seq},
            "method": spec_method,
            "hyperparameters": {
                "maxSteps": args.steps,
                "learningRate": 1.0e-4,
                "batchSizePerDevice": 1,
                "precision": args.precision,
            },
            "deepspeed": {"zeroStage": args.zero, "config": args.deepspeed_config},
            "resources": {"nodes": 2, "gpusPerNode": 0},
            "output": {"uri": f"s3://outputs/memory-{method}/", "checkpointEverySteps": 10**6},
        },
    }


def prepare_store(store: Path, args: argparse.Namespace) -> dict[str, int]:
    """The tiny and the big model and the rows; returns each model's safetensors bytes."""
    from finetune_trainer.tiny import build_tiny_model, demo_rows

    sizes = {}
    for name, hidden, layers, heads in (("tiny", 64, 2, 4), ("big", args.hidden, args.layers, args.heads)):
        directory = store / "models" / name
        if not (directory / "config.json").exists():
            started = time.monotonic()
            build_tiny_model(directory, hidden_size=hidden, layers=layers, heads=heads)
            print(f"built {name} model in {time.monotonic() - started:.0f}s", file=sys.stderr)
        sizes[name] = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    rows = store / "datasets" / "capitals" / "train.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(64)))
    (store / "outputs").mkdir(exist_ok=True)
    return sizes


@dataclass
class Marks:
    """Phase boundaries (time.monotonic()) found in the trainer's log while sampling."""

    log: Path | None = None
    offset: int = 0
    loaded: dict[int, float] = field(default_factory=dict)
    first_step: float | None = None
    last_step: float | None = None
    pending: str = ""

    def scan(self, sample: Sample) -> None:
        if self.log is None or not self.log.exists():
            return
        with self.log.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        self.offset += len(chunk)
        text = self.pending + chunk.decode(errors="replace")
        lines = text.split("\n")
        self.pending = lines.pop()
        for line in lines:
            if match := LOADED.search(line):
                self.loaded.setdefault(int(match.group(1)), sample.time)
            elif match := STEP.search(line):
                step, total = int(match.group(1)), int(match.group(2))
                if step == 1 and self.first_step is None:
                    self.first_step = sample.time
                if step == total:
                    self.last_step = sample.time


def run_job(store: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``finetune run``, sampled; each rank's peak PSS per phase in bytes."""
    model = "tiny" if method == "tiny" else "big"
    job = store.parent / f"job-{method}.yaml"
    job.write_text(yaml.safe_dump(manifest(model, "lora" if method == "tiny" else method, args)))
    finetune = Path(sys.executable).with_name("finetune")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.monotonic()
    process = subprocess.Popen(
        [str(finetune), "run", str(job), "--store", str(store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    marks = Marks()
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if found := re.search(r"trainer log: (\S+)", line):
                marks.log = Path(found.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with TreeSampler(process.pid, args.interval, on_sample=marks.scan) as sampler:
        process.wait()
    reader.join()
    ended = time.monotonic()
    if process.returncode != 0:
        raise SystemExit(
            f"finetune run ({method}) failed with {process.returncode}:\n{''.join(output[-40:])}"
        )
    ranks = [
        pid for pid in sampler.matching(RANK_NEEDLE) if "torch.distributed.run" not in sampler.cmdlines[pid]
    ]
    loaded = max(marks.loaded.values(), default=None)
    if len(ranks) != 2 or loaded is None or marks.first_step is None or marks.last_step is None:
        raise SystemExit(f"cannot find the ranks or the phases in the log: ranks {ranks}, marks {marks}")
    phases = {
        "loading": (started, loaded),
        "engine+first step": (loaded, marks.first_step),
        "steady": (marks.first_step, marks.last_step),
        "save": (marks.last_step, ended),
        "whole run": (started, ended),
    }
    peaks = {
        name: [sampler.peak(pid, since, until) for pid in ranks] for name, (since, until) in phases.items()
    }
    return {
        "method": method,
        "seconds": round(ended - started, 1),
        "samples": len(sampler.samples),
        "phase_seconds": {name: round(until - since, 1) for name, (since, until) in phases.items()},
        "peaks": peaks,
    }


def zero3_estimate(params: int, largest_layer: int, ranks: int) -> int:
    """DeepSpeed's own estimate of the model states per rank without offload (its "per GPU" column:
    the largest layer gathered plus 18 bytes a parameter, partitioned: fp16/bf16 parameters and
    gradients, fp32 master weights and two Adam moments)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, per_device, _ = estimate_zero3_model_states_mem_needs(
        params, largest_layer, num_gpus_per_node=ranks, num_nodes=1, cpu_offload=False, zero_init=True
    )
    return int(per_device)


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="memory-bench-"))
    store = work / "s3"
    sizes = prepare_store(store, args)
    hidden, layers = args.hidden, args.layers
    params = layers * 10 * hidden * hidden  # q, k, v, o (4 h^2) and gate, up, down (3 x h x 2h)
    print(f"big model: {sizes['big'] / GIB:.2f} GiB of safetensors, about {params / 1e6:.0f} M parameters")
    results = {"model_bytes": sizes["big"], "tiny_bytes": sizes["tiny"], "runs": []}
    for method in args.methods.split(","):
        result = run_job(store, method, args)
        results["runs"].append(result)
        print(f"\n{method}: {result['seconds']}s, {result['samples']} samples")
        for phase, values in result["peaks"].items():
            seconds = result["phase_seconds"][phase]
            each = ", ".join(f"{v / GIB:.2f}" for v in values)
            print(
                f"  {phase:18} {seconds:6.1f}s  peak PSS per rank (GiB) {each}  sum {sum(values) / GIB:.2f}"
            )
    by_method = {r["method"]: r for r in results["runs"]}
    model_gib = sizes["big"] / GIB
    overhead = sum(by_method["tiny"]["peaks"]["whole run"]) / GIB if "tiny" in by_method else None
    if overhead is not None:
        print(
            f"\noverhead (tiny model, 2 ranks, sum of peaks): {overhead:.2f} GiB; model {model_gib:.2f} GiB"
        )
        if "lora" in by_method:
            total = sum(by_method["lora"]["peaks"]["whole run"]) / GIB
            print(
                f"lora: sum of peaks {total:.2f} GiB = overhead + {(total - overhead) / model_gib:.2f} x "
                "model "
                f"(goal <= 1.25 x: {overhead + 1.25 * model_gib:.2f} GiB)"
            )
    if "full" in by_method and args.zero == 3:
        largest = 2 * hidden * hidden  # an MLP projection
        estimate = zero3_estimate(params, largest, 2) / GIB
        peak = max(by_method["full"]["peaks"]["whole run"]) / GIB
        rank_overhead = overhead / 2 if overhead is not None else 0.0
        print(
            f"full: highest rank peak {peak:.2f} GiB; DeepSpeed's estimate of the model states per rank "
            f"{estimate:.2f} GiB + a rank's overhead {rank_overhead:.2f} GiB = "
            f"{estimate + rank_overhead:.2f} GiB"
        )
        results["zero3_estimate_bytes"] = int(estimate * GIB)
    if overhead is not None:
        for method in ("lora", "full"):
            if method in by_method:
                measured = max(by_method[method]["peaks"]["whole run"]) - overhead * GIB / 2
                ours = our_estimate(store / "models" / "big", method, args)
                by_method[method]["estimate_bytes"] = ours
                print(
                    f"{method}: memory_fit's estimate of a rank's tensors {ours / GIB:.2f} GiB, measured "
                    f"(highest rank peak less a rank's overhead) {measured / GIB:.2f} GiB: "
                    f"{measured / ours:.2f} x"
                )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


def our_estimate(model_dir: Path, method: str, args: argparse.Namespace) -> int:
    """finetune validate --fit's estimate for the same job, what a rank holds on the CPU: weights,
    gradients, optimizer, buffers, activations and logits, without the GPU's terms (CUDA context, NCCL,
    fragmentation). ZeRO-2's gradient bucket counts only as far as the gradients fill it: the pages of a
    ``torch.empty`` on the CPU are resident only once written (on a GPU the whole bucket is allocated)."""
    from finetune_operator.api.memory_fit import ModelShape, Plan, estimate

    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    plan = Plan(
        method="full" if method == "full" else "lora",
        lora_r=4,
        precision=args.precision,
        zero_stage=args.zero,
        nodes=2,
        gpus_per_node=1,
        batch_size=1,
        seq_length=args.seq,
        gradient_checkpointing=True,  # the spec's default, which manifest() keeps
    )
    found = estimate(shape, plan)
    written = min(found.buffers, found.trainable_parameters * (4 if args.precision == "fp32" else 2))
    return found.total - found.overhead - found.buffers + written


if __name__ == "__main__":
    main()

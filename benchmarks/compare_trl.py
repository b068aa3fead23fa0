"""Our trainer (through `finetune run`, as a user runs it) against TRL's SFTTrainer on the same LoRA job.

The same model (SmolLM2-135M-Instruct, ``smollm2_model_dir()``), the same data (the Quillmoor handbook,
``finetune_operator.local.facts``: chat rows, loss on the assistant turns), the same LoRA (rank, alpha,
dropout, target modules), learning rate, schedule, weight decay, clipping, batch, steps and sequence
length, on one CPU process each, with the same thread count. The runs alternate (ours, TRL, ours,
TRL, ...) so that the machine's noise hits both alike.

Both train on the very same token sequences: TRL gets the rows as our trainer tokenizes them
(``finetune_trainer.data.prepare``: the chat template, labels on the assistant turns, EOS, truncation
at --seq), as a pre-tokenized dataset of ``input_ids`` and ``labels``, which SFTTrainer trains on as
given. Each side also counts the tokens it trains on (non-padding tokens: the attention mask's sum):

- tokens/s: those tokens over the training loop's time. Ours: the trainer's own per-window figures from
  ``metrics.json`` (tokens over the time of the steps of each log window; the base model's evaluation
  before the first step and the final one are outside). TRL: its ``num_tokens`` over the time from
  ``on_train_begin`` to ``on_train_end`` (evaluation off during training);
- wall: the whole command, start-up, model loading and the final save included (ours: `finetune run`
  with its base and final evaluations; TRL: the worker process, without evaluation);
- eval loss and answer accuracy: computed afterwards by this script for both adapters alike, on the
  paraphrased evaluation questions (never trained on): the mean cross-entropy per assistant token, in
  fp32, and the share of greedy replies (at most 32 new tokens) that contain the reference answer,
  both normalised (case, whitespace, punctuation). Our trainer's own final evalLoss is shown as well.

TRL is not in the test environment: ``make bench-trl`` installs it (benchmarks/requirements-trl.txt)
into .venv/bench-trl and runs this script with it on the path of the TRL runs only.

    make bench-trl ARGS='--rounds 2 --json compare.json'
    .venv/bin/python benchmarks/compare_trl.py --trl-path .venv/bench-trl --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
BUCKET = "bench"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (ours, TRL), alternated")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads of each run")
    parser.add_argument(
        "--zero", type=int, default=2, choices=[0, 1, 2, 3], help="our ZeRO stage (the default)"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 where the CPU multiplies it natively (as finetune run decides), else fp32",
    )
    parser.add_argument("--only", choices=["both", "ours", "trl"], default="both")
    parser.add_argument("--trl-path", default=str(HERE.parent / ".venv" / "bench-trl"))
    parser.add_argument("--workdir", default=None, help="kept afterwards when given")
    parser.add_argument("--json", default=None, help="also write the results here")
    # Internal: the TRL worker and the scorer, each in a process of its own.
    parser.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--score", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the shared inputs ------------------------------------------------------------------------------


def _manifest(args: argparse.Namespace, name: str, precision: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FinetuneJob",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "model": {"uri": f"s3://{BUCKET}/models/smollm2/"},
            "dataset": {
                "train": f"s3://{BUCKET}/data/train.jsonl",
                "eval": f"s3://{BUCKET}/data/eval.jsonl",
                "format": "chat",
                "maxSeqLength": args.seq,
                "packing": False,
            },
            "method": {
                "type": "lora",
                "lora": {
                    "r": args.r,
                    "alpha": args.alpha,
                    "dropout": args.dropout,
                    "targetModules": TARGET_MODULES,
                },
            },
            "hyperparameters": {
                "maxSteps": args.steps,
                "batchSizePerDevice": args.batch,
                "gradientAccumulationSteps": 1,
                "learningRate": args.lr,
                "lrScheduler": "cosine",
                "warmupRatio": 0.0,
                "weightDecay": 0.0,
                "precision": precision,
                "gradientCheckpointing": False,
            },
            # Only the base model's and the final evaluation (outside the training time).
            "evaluation": {"everySteps": 10 * args.steps},
            "deepspeed": {"zeroStage": args.zero},
            "resources": {"nodes": 1, "gpusPerNode": 0},
            "output": {"uri": f"s3://{BUCKET}/out/{name}/", "checkpointEverySteps": 10 * args.steps},
        },
    }


def _trainer_config(args: argparse.Namespace, precision: str) -> Any:
    from finetune_operator.api.resolve import resolve_trainer_config
    from finetune_operator.api.validation import parse_finetune_job

    return resolve_trainer_config(parse_finetune_job(_manifest(args, "prepare", precision)))


def _precision(args: argparse.Namespace) -> str:
    if args.precision != "auto":
        return args.precision
    from finetune_trainer.deepspeed_config import cpu_precision

    return cpu_precision("bf16")[0]


def prepare_store(args: argparse.Namespace, work: Path, precision: str) -> dict[str, Any]:
    """The store folder (model, train and eval data) and the tokenized examples, shared by both sides."""
    from finetune_operator.local import facts
    from finetune_trainer import data
    from finetune_trainer.modeling import load_tokenizer
    from finetune_trainer.smollm2 import smollm2_model_dir

    model_dir = Path(smollm2_model_dir())
    store = work / "store"
    model_copy = store / BUCKET / "models" / "smollm2"
    model_copy.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):
            target = model_copy / path.name
            if not target.exists():
                try:
                    os.link(path, target)
                except OSError:
                    shutil.copy2(path, target)
    train_rows, eval_rows = facts.train_rows(facts.HANDBOOK), facts.eval_rows(facts.HANDBOOK)
    data_dir = store / BUCKET / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    (data_dir / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in eval_rows))
    config = _trainer_config(args, precision)
    tokenizer = load_tokenizer(model_dir, config)
    train, _ = data.prepare(train_rows, config.dataset, tokenizer)
    evaluation, _ = data.prepare(eval_rows, config.dataset, tokenizer)
    shared = {
        "model_dir": str(model_dir),
        "train": [{"input_ids": e.input_ids, "labels": e.labels} for e in train],
        "eval": [
            {
                "input_ids": e.input_ids,
                "labels": e.labels,
                "messages": row["messages"],
                "reference": row["reference"],
            }
            for e, row in zip(evaluation, eval_rows, strict=True)
        ],
    }
    (work / "shared.json").write_text(json.dumps(shared))
    return shared


def _env(args: argparse.Namespace, extra_path: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return env


def _timed_run(argv: list[str], env: dict[str, str], log: Path) -> tuple[str, float]:
    """Runs one side's process to the end: its stdout and wall seconds; its output kept in ``log``."""
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}), see {log}:\n{result.stderr[-3000:]}")
    return result.stdout, wall


# --- ours: finetune run --------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, work: Path, round_: int, precision: str) -> dict[str, Any]:
    name = f"ours-{round_}"
    job = work / f"{name}.yaml"
    job.write_text(yaml.safe_dump(_manifest(args, name, precision), sort_keys=False))
    finetune = Path(sys.executable).with_name("finetune")
    stdout, wall = _timed_run(
        [str(finetune), "run", str(job), "--store", str(work / "store")], _env(args), work / f"{name}.out"
    )
    output = work / "store" / BUCKET / "out" / name
    metrics = json.loads((output / "metrics.json").read_text())
    windows = [e for e in metrics["history"] if "tokensPerSecond" in e]
    # Each window's tokens/s is its tokens over its steps' time; windows cover equal numbers of steps
    # (the last may be shorter), so the run's rate is the step-weighted harmonic mean.
    steps_in = [w["step"] - p for w, p in zip(windows, [0] + [w["step"] for w in windows[:-1]], strict=True)]
    tokens_per_second = sum(steps_in) / sum(
        n / w["tokensPerSecond"] for n, w in zip(steps_in, windows, strict=True)
    )
    notes = [line.removeprefix("note: ") for line in stdout.splitlines() if line.startswith("note: ")]
    return {
        "side": "ours",
        "round": round_,
        "tokensPerSecond": tokens_per_second,
        "wallSeconds": wall,
        "trainLossLast": windows[-1]["trainLoss"],
        "ownEvalLoss": metrics["final"].get("evalLoss"),
        "adapter": str(output / "model"),
        "notes": notes,
    }


# --- TRL: SFTTrainer ------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, work: Path, round_: int, precision: str) -> dict[str, Any]:
    name = f"trl-{round_}"
    spec = {"args": vars(args), "precision": precision, "work": str(work), "name": name}
    spec_file = work / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    _, wall = _timed_run(
        [sys.executable, __file__, "--trl-worker", str(spec_file)],
        _env(args, args.trl_path),
        work / f"{name}.out",
    )
    report = json.loads((work / name / "report.json").read_text())
    return {
        "side": "trl",
        "round": round_,
        "wallSeconds": wall,
        **report,
        "adapter": str(work / name / "model"),
    }


def trl_worker(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    args, precision, work = argparse.Namespace(**spec["args"]), spec["precision"], Path(spec["work"])
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    shared = json.loads((work / "shared.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(shared["model_dir"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(shared["model_dir"], dtype=dtype, attn_implementation="sdpa")
    train = Dataset.from_list(shared["train"])
    out = work / spec["name"]

    class Clock(TrainerCallback):
        begin = end = 0.0

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            Clock.begin = time.perf_counter()

        def on_train_end(self, *_: Any, **__: Any) -> None:
            Clock.end = time.perf_counter()

    config = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=precision == "bf16",
        max_length=args.seq,
        packing=False,
        gradient_checkpointing=False,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, args.steps // 20),
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    peft_config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    result = trainer.train()
    seconds = Clock.end - Clock.begin
    tokens = trainer._total_train_tokens  # the attention mask's sum over every trained batch
    trainer.model.save_pretrained(str(out / "model"))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    report = {
        "tokensPerSecond": tokens / seconds,
        "trainTokens": tokens,
        "trainSeconds": seconds,
        "trainRuntime": result.metrics.get("train_runtime"),
        "trainLossLast": losses[-1] if losses else None,
        "trl": trl.__version__,
    }
    (out / "report.json").write_text(json.dumps(report))


# --- scoring both adapters alike ------------------------------------------------------------------


def score(args: argparse.Namespace, work: Path, adapter: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--score", json.dumps({"work": str(work), "adapter": adapter})],
        env=_env(args),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise SystemExit(f"scoring {adapter} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def score_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    import torch
    from finetune_trainer.evaluation import answer_matches
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shared = json.loads((Path(spec["work"]) / "shared.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(shared["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(shared["model_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, spec["adapter"]).eval()
    total, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for row in shared["eval"]:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
            prompt = tokenizer.apply_chat_template(
                row["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            output = model.generate(
                **inputs, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += answer_matches(reply, row["reference"], "contains")
    print(json.dumps({"evalLoss": total / count, "answerAccuracy": correct / len(shared["eval"])}))


# --- the comparison -------------------------------------------------------------------------------


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {}
    for name in ("torch", "transformers", "peft", "deepspeed", "accelerate"):  # TRL's: from its runs
        found[name] = metadata.version(name)
    return found


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | tokens/s | train s | wall s | final train loss | eval loss (ours: own) | answer acc |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        own = f" ({r['ownEvalLoss']:.4f})" if r.get("ownEvalLoss") is not None else ""
        train_s = r.get("trainSeconds")
        lines.append(
            f"| {r['side']} {r['round']} | {r['tokensPerSecond']:,.0f} | "
            f"{'' if train_s is None else f'{train_s:.1f}'} | {r['wallSeconds']:.1f} | "
            f"{r['trainLossLast']:.4f} | {r['evalLoss']:.4f}{own} | {r['answerAccuracy']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)
    if args.score:
        return score_worker(args.score)
    if args.only != "ours" and not (Path(args.trl_path) / "trl").is_dir():
        raise SystemExit(f"no TRL in {args.trl_path}: run `make bench-trl` (or pip install --target it)")
    precision = _precision(args)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="compare-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    shared = prepare_store(args, work, precision)
    train_tokens = sum(sum(1 for _ in row["input_ids"]) for row in shared["train"])
    print(
        f"{len(shared['train'])} training rows ({train_tokens} tokens), {len(shared['eval'])} eval rows; "
        f"{args.steps} steps x batch {args.batch}, seq {args.seq}, LoRA r {args.r} alpha {args.alpha}, "
        f"lr {args.lr}, {precision}, 1 process x {args.threads} thread(s); work in {work}",
        flush=True,
    )
    sides = {"both": ("ours", "trl"), "ours": ("ours",), "trl": ("trl",)}[args.only]
    results = []
    for round_ in range(1, args.rounds + 1):
        for side in sides:
            run = (run_ours if side == "ours" else run_trl)(args, work, round_, precision)
            if side == "ours" and args.steps * args.batch % len(shared["train"]) == 0:
                # Whole epochs (one rank, every row each epoch): the same tokens TRL counts.
                run["trainTokens"] = args.steps * args.batch // len(shared["train"]) * train_tokens
                run["trainSeconds"] = run["trainTokens"] / run["tokensPerSecond"]
            results.append(run)
            print(
                f"{side} {round_}: {run['tokensPerSecond']:,.0f} tokens/s, wall {run['wallSeconds']:.1f} s",
                flush=True,
            )
    for run in results:
        run.update(score(args, work, run["adapter"]))
    print(table(results))
    summary: dict[str, Any] = {}
    if args.only == "both":
        ours = [r for r in results if r["side"] == "ours"]
        trl_runs = [r for r in results if r["side"] == "trl"]
        for key in ("tokensPerSecond", "wallSeconds", "evalLoss", "answerAccuracy"):
            summary[key] = {
                "ours": statistics.median(r[key] for r in ours),
                "trl": statistics.median(r[key] for r in trl_runs),
            }
        summary["tokensPerSecondRatio"] = (
            summary["tokensPerSecond"]["ours"] / summary["tokensPerSecond"]["trl"]
        )
        summary["wallTimeRatio"] = summary["wallSeconds"]["ours"] / summary["wallSeconds"]["trl"]
        print(
            f"median tokens/s ours / TRL = {summary['tokensPerSecondRatio']:.2f}x; "
            f"wall time ours / TRL = {summary['wallTimeRatio']:.2f}x; eval loss "
            f"{summary['evalLoss']['ours']:.4f} vs {summary['evalLoss']['trl']:.4f}; answer accuracy "
            f"{summary['answerAccuracy']['ours']:.3f} vs {summary['answerAccuracy']['trl']:.3f}"
        )
    if args.json:
        document = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("trl_worker", "score")},
            "precision": precision,
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count()},
            "versions": versions() | {"trl": next((r["trl"] for r in results if "trl" in r), None)},
            "runs": results,
            "summary": summary,
        }
        Path(args.json).write_text(json.dumps(document, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

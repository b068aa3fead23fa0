"""The trainer as a worker pod runs it: launcher, torchrun, DeepSpeed on gloo, S3 on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_trainer.config import TrainerConfig
from finetune_trainer.evaluation import normalise_answer
from finetune_trainer.launch import descendants
from finetune_trainer.summary import (
    EVAL_GATE_NOT_MET,
    NON_RETRYABLE_EXIT_CODE,
    STOPPED_EXIT_CODE,
    parse_termination_message,
)
from finetune_trainer.tiny import demo_rows
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.s3server import S3Server, s3_server
from tests.trainer_runs import (
    Run,
    finish_trainer,
    put_jsonl,
    run_trainer,
    s3_client,
    seed_store,
    start_trainer,
    trainer_config,
)

pytestmark = pytest.mark.system

BUCKET = "finetune"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Path]]:
    workdir = tmp_path_factory.mktemp("store")
    with s3_server() as server:
        seed_store(server.endpoint, workdir, BUCKET)
        yield server, workdir / "tiny-model"


def keys(server: S3Server, prefix: str) -> list[str]:
    pages = s3_client(server.endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def get_json(server: S3Server, key: str) -> Any:
    return json.loads(s3_client(server.endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read())


def download(server: S3Server, prefix: str, target: Path) -> Path:
    client = s3_client(server.endpoint)
    for key in keys(server, prefix):
        path = target / key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(path))
    return target


def succeeded(run: Run) -> None:
    assert run.code == 0, run.log[-4000:]
    assert run.summary is not None and run.summary.outcome == "succeeded"


def generate(model: Any, tokenizer: Any) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1] :])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lora_on_two_ranks_writes_a_loadable_adapter_and_its_metrics(
    store: tuple[S3Server, Path], tmp_path: Path, zero_stage: int
) -> None:
    server, base_model = store
    name = f"lora-zero{zero_stage}"
    config = trainer_config(
        server.endpoint,
        name,
        dataset={"evalSplit": 0.25},
        deepspeed={"zeroStage": zero_stage},
        hyperparameters={"gradientAccumulationSteps": zero_stage - 1},
        evaluation={"everySteps": 3},
        output={"checkpointEverySteps": 2, "keepCheckpoints": 1, "saveMerged": True},
    )
    run = run_trainer(config, tmp_path, server.endpoint, processes=2)
    succeeded(run)
    output = f"out/{name}/"
    assert run.summary.output_model == f"s3://{BUCKET}/{output}model/"
    assert {"evalLoss", "perplexity", "tokenAccuracy", "trainLoss"} <= run.summary.metrics.keys()

    metrics = get_json(server, f"{output}metrics.json")
    assert metrics["final"] == run.summary.metrics
    assert [e["step"] for e in metrics["history"] if "evalLoss" in e] == [0, 3, 6]  # 0: the base model
    assert all("trainLoss" in e for e in metrics["history"] if "evalLoss" not in e)
    assert get_json(server, f"{output}config.json") == json.loads(config.to_json()) | {
        "reporting": get_json(server, f"{output}config.json")["reporting"]
    }
    card = (
        s3_client(server.endpoint).get_object(Bucket=BUCKET, Key=f"{output}README.md")["Body"].read().decode()
    )
    assert f"s3://{BUCKET}/models/tiny/" in card and "evalLoss" in card
    curve = s3_client(server.endpoint).get_object(Bucket=BUCKET, Key=f"{output}loss.png")["Body"].read()
    assert curve.startswith(b"\x89PNG")

    # keepCheckpoints 1: only the newest complete checkpoint (step 4) remains, with its manifest.
    checkpoint_keys = keys(server, f"{output}checkpoints/")
    assert {k.split("/")[3] for k in checkpoint_keys} == {"step-4"}
    manifest = get_json(server, f"{output}checkpoints/step-4/manifest.json")
    assert manifest["worldSize"] == 2 and manifest["files"]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])

    adapter_dir = download(server, f"{output}model/", tmp_path / "adapter")
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # ZeRO-3 must not save an empty adapter
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter_dir)
    assert isinstance(generate(model, tokenizer), str)
    merged = AutoModelForCausalLM.from_pretrained(adapter_dir / "merged")  # saveMerged: full weights
    assert not hasattr(merged, "peft_config") and isinstance(generate(merged, tokenizer), str)


def test_full_fine_tune_on_one_rank_memorises_and_reloads(
    store: tuple[S3Server, Path], tmp_path: Path
) -> None:
    server, _ = store
    config = trainer_config(
        server.endpoint,
        "full",
        method={"type": "full"},
        hyperparameters={"maxSteps": 30, "learningRate": 5e-3, "warmupRatio": 0.0},
        output={"checkpointEverySteps": 100},
    )
    run = run_trainer(config, tmp_path, server.endpoint, processes=1)
    succeeded(run)
    history = [
        e["trainLoss"] for e in get_json(server, "out/full/metrics.json")["history"] if "trainLoss" in e
    ]
    assert history[-1] < history[0] * 0.7, history  # a memorisable dataset: the loss falls
    model_dir = download(server, "out/full/model/", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    answer = generate(model, AutoTokenizer.from_pretrained(model_dir))
    assert answer.strip()  # the reloaded full model generates (a tiny model; quality is not the point)


def _classification_rows(count: int) -> list[dict[str, Any]]:
    topics = {
        "billing": "my invoice is wrong and I was charged twice",
        "technical": "the app crashes when I open the settings page",
    }
    return [{"body": f"{text} ({i})", "queue": label} for i in range(count) for label, text in topics.items()]


def test_freeze_classification_reports_label_metrics_and_trains_only_the_top(
    store: tuple[S3Server, Path], tmp_path: Path
) -> None:
    server, base_model = store
    put_jsonl(server.endpoint, BUCKET, "data/tickets.jsonl", _classification_rows(24))
    config = trainer_config(
        server.endpoint,
        "router",
        dataset={
            "train": f"s3://{BUCKET}/data/tickets.jsonl",
            "format": "classification",
            "columns": {"text": "body", "label": "queue"},
            "evalSplit": 0.25,
        },
        method={"type": "freeze", "freeze": {"trainableLayers": 1}},
        hyperparameters={"maxSteps": 8, "learningRate": 5e-3},
        evaluation={"everySteps": 4},
        output={"checkpointEverySteps": 100},
    )
    run = run_trainer(config, tmp_path, server.endpoint, processes=2)
    succeeded(run)
    assert {"accuracy", "precision", "recall", "f1"} <= run.summary.metrics.keys()
    assert 0.0 <= run.summary.metrics["f1"] <= 1.0
    tuned = load_file(download(server, "out/router/model/", tmp_path / "model") / "model.safetensors")
    base = load_file(base_model / "model.safetensors")
    assert torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(
        tuned["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"]
    )


def _wait_for_checkpoint(server: S3Server, output: str, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [k for k in keys(server, f"{output}checkpoints/") if k.endswith("manifest.json")]
        if done:
            return max(int(k.split("/")[3].removeprefix("step-")) for k in done)
        time.sleep(0.2)
    raise AssertionError("no complete checkpoint appeared")


def test_resume_after_sigkill_continues_from_the_newest_complete_checkpoint(
    store: tuple[S3Server, Path], tmp_path: Path
) -> None:
    server, _ = store
    output = "out/resume/"
    config = trainer_config(
        server.endpoint,
        "resume",
        # 400 steps log every 10th; a checkpoint every 12 holds a history that starts before it.
        hyperparameters={"maxSteps": 400, "warmupRatio": 0.0},
        output={"checkpointEverySteps": 12, "keepCheckpoints": 2},
    )
    process, _ = start_trainer(config, tmp_path / "first", server.endpoint, processes=2)
    try:
        saved = _wait_for_checkpoint(server, output)
    finally:
        for pid in [*descendants(process.pid), process.pid]:  # the whole pod dies at once
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(30)
    # A newer checkpoint without a manifest (an upload that never finished) must be skipped.
    s3_client(server.endpoint).put_object(
        Bucket=BUCKET, Key=f"{output}checkpoints/step-9999/junk.pt", Body=b"x"
    )
    newest = max(
        int(k.split("/")[3].removeprefix("step-"))
        for k in keys(server, f"{output}checkpoints/")
        if k.endswith("manifest.json")
    )
    assert newest >= saved
    second = config.model_copy(
        update={"hyperparameters": config.hyperparameters.model_copy(update={"max_steps": newest + 4})}
    )
    run = run_trainer(second, tmp_path / "second", server.endpoint, processes=2)
    succeeded(run)
    assert f"resumed from s3://{BUCKET}/{output}checkpoints/step-{newest}/" in run.log
    assert "skipping" in run.log and "step-9999" in run.log
    assert f"step {newest + 1}/{newest + 4}" in run.log and "step 1/" not in run.log
    history = get_json(server, f"{output}metrics.json")["history"]
    steps = [e["step"] for e in history]
    assert steps == sorted(steps) and steps[-1] == newest + 4 and steps[0] < newest  # the history continues
    assert run.summary.step == newest + 4


def test_sigterm_saves_a_checkpoint_then_exits_and_progress_is_served(
    store: tuple[S3Server, Path], tmp_path: Path
) -> None:
    server, _ = store
    config = trainer_config(
        server.endpoint, "stop", hyperparameters={"maxSteps": 100000}, output={"checkpointEverySteps": 100000}
    )
    process, termination = start_trainer(config, tmp_path, server.endpoint, processes=2)
    port = json.loads((tmp_path / "config.json").read_text())["reporting"]["progressPort"]
    progress = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and progress is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2) as answer:
                    document = json.loads(answer.read())
                    progress = document if document["step"] > 0 else None
            except OSError:
                time.sleep(0.3)
        assert progress is not None, (tmp_path / "trainer.log").read_text()[-3000:]
        assert progress["state"] == "training" and progress["totalSteps"] == 100000
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            assert "finetune_trainer_step" in answer.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(120)
    summary = parse_termination_message(termination.read_text())
    assert code == STOPPED_EXIT_CODE and summary is not None and summary.outcome == "stopped"
    manifests = [k for k in keys(server, "out/stop/checkpoints/") if k.endswith("manifest.json")]
    assert manifests == [f"out/stop/checkpoints/step-{summary.step}/manifest.json"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param(
            {"dataset": {"train": f"s3://{BUCKET}/data/broken.jsonl"}},
            "no assistant turn (rows 1, 2, 3",
            id="bad-rows",
        ),
        pytest.param(
            {"model": {"uri": f"s3://{BUCKET}/models/missing/"}},
            f"s3://{BUCKET}/models/missing/",
            id="missing-model",
        ),
        pytest.param(
            {"model": {"uri": f"s3://{BUCKET}/models/truncated/"}},
            "model file model.safetensors is corrupt or truncated",
            id="truncated-model",
        ),
        pytest.param(
            {"deepspeed": {"config": {"zero_optimization": {"reduce_bucket_size": 0}}}},
            "deepspeed.config rejected by DeepSpeed",
            id="deepspeed-rejects-config",
        ),
        pytest.param(
            {"output": {"uri": "s3://no-such-bucket/out/"}},
            "output.uri s3://no-such-bucket/out/: cannot write there",
            id="output-not-writable",
        ),
    ],
)
def test_what_no_restart_can_fix_exits_with_the_reserved_code_and_says_why(
    store: tuple[S3Server, Path], tmp_path: Path, spec: dict[str, Any], message: str
) -> None:
    server, tiny_model = store
    broken = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(10)]
    put_jsonl(server.endpoint, BUCKET, "data/broken.jsonl", broken)
    client = s3_client(server.endpoint)
    for path in tiny_model.iterdir():  # the tiny model with its weights cut in half
        body = path.read_bytes()
        body = body[: len(body) // 2] if path.suffix == ".safetensors" else body
        client.put_object(Bucket=BUCKET, Key=f"models/truncated/{path.name}", Body=body)
    run = run_trainer(
        trainer_config(server.endpoint, "broken", **spec), tmp_path, server.endpoint, processes=2
    )
    assert run.code == NON_RETRYABLE_EXIT_CODE, run.log[-3000:]
    assert run.summary is not None and run.summary.retryable is False
    assert message in run.summary.error


# --- the eval gate, continuing an adapter, lineage, the card and the logs ------------------------------

FIRST, SECOND = "out/first/", "out/second/"


@dataclass(frozen=True)
class Lineage:
    first: Run
    second: Run


@pytest.fixture(scope="module")
def lineage(store: tuple[S3Server, Path], tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """Job "first" trains a LoRA adapter and meets its gate; job "second" continues that adapter under
    ZeRO-3 at a learning rate too small to move it, and misses its gate. An object planted under
    second's model/ stands for an earlier attempt's model."""
    server, _ = store
    workdir = tmp_path_factory.mktemp("lineage")
    common: dict[str, Any] = {"dataset": {"evalSplit": 0.25}, "output": {"checkpointEverySteps": 100}}
    first_config = trainer_config(
        server.endpoint,
        "first",
        **common,
        evaluation={"everySteps": 3, "gate": {"metric": "evalLoss", "max": 1000}},
    )
    first = run_trainer(first_config, workdir / "first", server.endpoint)
    s3_client(server.endpoint).put_object(
        Bucket=BUCKET, Key=f"{SECOND}model/adapter_model.safetensors", Body=b"x"
    )
    second_config = trainer_config(
        server.endpoint,
        "second",
        **common,
        model={"adapter": f"s3://{BUCKET}/{FIRST}model/"},
        deepspeed={"zeroStage": 3},
        hyperparameters={"learningRate": 1e-9},
        evaluation={"everySteps": 3, "gate": {"metric": "evalLoss", "max": 0.001}},
    )
    second = run_trainer(second_config, workdir / "second", server.endpoint)
    return Lineage(first, second)


def _text(server: S3Server, key: str) -> str:
    return s3_client(server.endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def test_a_met_gate_writes_model_and_every_ranks_log(store: tuple[S3Server, Path], lineage: Lineage) -> None:
    server, _ = store
    succeeded(lineage.first)
    assert lineage.first.summary.output_model == f"s3://{BUCKET}/{FIRST}model/"
    written = keys(server, FIRST)
    assert (
        f"{FIRST}model/adapter_config.json" in written
        and f"{FIRST}model/adapter_model.safetensors" in written
    )
    assert not any(k.startswith(f"{FIRST}rejected/") for k in written)
    adapter_config = get_json(server, f"{FIRST}model/adapter_config.json")
    assert adapter_config["base_model_name_or_path"] == f"s3://{BUCKET}/models/tiny/"  # not the deleted copy
    card = _text(server, f"{FIRST}README.md")
    assert "| Evaluation gate | evalLoss <= 1000: met |" in card and "Rejected" not in card
    assert _text(server, f"{FIRST}model/README.md") == card  # the model folder carries its card
    for rank in (0, 1):
        log = _text(server, f"{FIRST}logs/rank-{rank}.log")
        assert f" rank {rank} INFO " in log and f" rank {1 - rank} " not in log
    assert "step 6/6" in _text(server, f"{FIRST}logs/rank-0.log")


def test_a_missed_gate_writes_rejected_not_model_and_fails_non_retryable(
    store: tuple[S3Server, Path], lineage: Lineage
) -> None:
    server, _ = store
    run = lineage.second
    assert run.code == NON_RETRYABLE_EXIT_CODE, run.log[-4000:]
    assert run.summary is not None and run.summary.outcome == "failed" and run.summary.retryable is False
    assert run.summary.reason == EVAL_GATE_NOT_MET and not run.summary.collateral
    value = get_json(server, f"{SECOND}metrics.json")["final"]["evalLoss"]
    assert run.summary.error == (
        f"evaluation gate not met: evalLoss {value:.4g}, needs <= 0.001 "
        f"(model written to s3://{BUCKET}/{SECOND}rejected/)"
    )
    written = keys(server, SECOND)
    assert f"{SECOND}rejected/adapter_model.safetensors" in written
    assert not any(k.startswith(f"{SECOND}model/") for k in written)  # the earlier attempt's model is gone
    assert {f"{SECOND}{name}" for name in ("metrics.json", "config.json", "README.md", "loss.png")} <= set(
        written
    )
    assert {f"{SECOND}logs/rank-0.log", f"{SECOND}logs/rank-1.log"} <= set(written)
    card = _text(server, f"{SECOND}README.md")
    assert f"**Rejected: evaluation gate not met: evalLoss {value:.4g}, needs <= 0.001.**" in card
    assert "| Evaluation gate | evalLoss <= 0.001: not met |" in card


def test_a_continued_adapter_starts_from_the_earlier_weights_and_names_them(
    store: tuple[S3Server, Path], lineage: Lineage, tmp_path: Path
) -> None:
    server, _ = store
    assert lineage.second.summary is not None and lineage.second.summary.reason == EVAL_GATE_NOT_MET
    earlier = load_file(download(server, f"{FIRST}model/", tmp_path / "first") / "adapter_model.safetensors")
    later = load_file(
        download(server, f"{SECOND}rejected/", tmp_path / "second") / "adapter_model.safetensors"
    )
    assert earlier.keys() == later.keys()
    assert any(t.abs().max() > 1e-3 for k, t in earlier.items() if "lora_B" in k)  # a fresh lora_B is zero
    assert all(torch.allclose(earlier[k], later[k], atol=1e-5) for k in earlier)  # lr 1e-9 moved nothing
    first_loss = get_json(server, f"{FIRST}metrics.json")["final"]["evalLoss"]
    second_loss = get_json(server, f"{SECOND}metrics.json")["final"]["evalLoss"]
    assert second_loss == pytest.approx(first_loss, abs=1e-4)  # the same evaluation set, the same weights
    assert get_json(server, f"{SECOND}config.json")["model"]["adapter"] == f"s3://{BUCKET}/{FIRST}model/"
    assert f"| Continued from | s3://{BUCKET}/{FIRST}model/ |" in _text(server, f"{SECOND}README.md")


def test_the_cards_loading_code_runs_as_written(
    store: tuple[S3Server, Path], lineage: Lineage, tmp_path: Path
) -> None:
    server, _ = store
    succeeded(lineage.first)
    card = _text(server, f"{FIRST}README.md")
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    copies: dict[str, str] = {}

    def local_copy(match: re.Match[str]) -> str:
        uri = match[1]
        if uri not in copies:
            copies[uri] = str(
                download(server, uri.removeprefix(f"s3://{BUCKET}/"), tmp_path / f"copy-{len(copies)}")
            )
        return copies[uri]

    runnable = re.sub(r"<local copy of (s3://[^>]+)>", local_copy, code)
    assert copies.keys() == {f"s3://{BUCKET}/{FIRST}model/", f"s3://{BUCKET}/models/tiny/"}
    namespace: dict[str, Any] = {}
    exec(runnable, namespace)  # the card's own code, as a reader would paste it
    assert isinstance(namespace["model"], PeftModel)
    assert isinstance(generate(namespace["model"], namespace["tokenizer"]), str)


def test_an_adapter_with_other_settings_is_refused_before_training(
    store: tuple[S3Server, Path], lineage: Lineage, tmp_path: Path
) -> None:
    server, _ = store
    succeeded(lineage.first)
    config = trainer_config(
        server.endpoint,
        "mismatch",
        model={"adapter": f"s3://{BUCKET}/{FIRST}model/"},
        method={"type": "lora", "lora": {"r": 8}},
    )
    run = run_trainer(config, tmp_path, server.endpoint)
    assert run.code == NON_RETRYABLE_EXIT_CODE, run.log[-3000:]
    assert run.summary is not None and run.summary.retryable is False
    assert run.summary.error.startswith(
        f"model.adapter s3://{BUCKET}/{FIRST}model/ was trained with r 16 (method.lora.r 8); "
    ), run.summary.error
    assert "step 1/" not in run.log and not keys(server, "out/mismatch/model/")
    # The rank whose report ended the run put its log up first, its error included.
    assert run.summary.error in _text(server, f"out/mismatch/logs/rank-{run.summary.rank}.log")


# ZeRO-1 runs the same DeepSpeed optimizer as ZeRO-2 (stage_1_and_2.py), so 2 stands for both.
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_bf16_on_cpu_trains_checkpoints_resumes_and_reloads(
    store: tuple[S3Server, Path], tmp_path: Path, zero_stage: int
) -> None:
    """bf16 on 2 gloo ranks (what `finetune run` keeps on a CPU with fast bf16): the loss falls, a
    checkpoint saved in bf16 resumes, and the adapter reloads and generates."""
    server, base_model = store
    name = f"bf16-zero{zero_stage}"
    output = f"out/{name}/"
    config = trainer_config(
        server.endpoint,
        name,
        dataset={"evalSplit": 0.25},
        deepspeed={"zeroStage": zero_stage},
        hyperparameters={"maxSteps": 8, "precision": "bf16", "warmupRatio": 0.0},
        evaluation={"everySteps": 4},
        output={"checkpointEverySteps": 3, "keepCheckpoints": 2},
    )
    assert config.distributed.uses_gpus is False
    first = run_trainer(config, tmp_path / "first", server.endpoint, processes=2)
    succeeded(first)
    history = get_json(server, f"{output}metrics.json")["history"]
    losses = [e["trainLoss"] for e in history if "trainLoss" in e]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # it learns
    evals = [e["evalLoss"] for e in history if "evalLoss" in e]
    assert evals[-1] < evals[0], evals

    second = config.model_copy(
        update={"hyperparameters": config.hyperparameters.model_copy(update={"max_steps": 10})}
    )
    resumed = run_trainer(second, tmp_path / "second", server.endpoint, processes=2)
    succeeded(resumed)
    assert f"resumed from s3://{BUCKET}/{output}checkpoints/step-6/" in resumed.log
    assert "step 7/10" in resumed.log and "step 1/" not in resumed.log
    history = get_json(server, f"{output}metrics.json")["history"]
    trained = [e for e in history if "trainLoss" in e]
    assert [e["step"] for e in trained][-4:] == [7, 8, 9, 10] and trained[-1]["trainLoss"] < losses[0]

    adapter_dir = download(server, f"{output}model/", tmp_path / "adapter")
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 and torch.isfinite(t.float()).all() for t in tensors.values())
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), adapter_dir)
    assert isinstance(generate(model, tokenizer), str)


def test_bf16_on_cpu_reports_what_fp32_reports(store: tuple[S3Server, Path], tmp_path: Path) -> None:
    """The same run in bf16 and fp32 (ZeRO-2, 2 ranks): DeepSpeed's fp32 master weights and unscaled
    bf16 loss keep the curves and the evaluation within a few hundredths."""
    server, _ = store
    finals = {}
    for precision in ("bf16", "fp32"):
        name = f"compare-{precision}"
        config = trainer_config(
            server.endpoint,
            name,
            dataset={"evalSplit": 0.25},
            hyperparameters={"maxSteps": 8, "precision": precision, "warmupRatio": 0.0},
            evaluation={"everySteps": 100},
            output={"checkpointEverySteps": 100},
        )
        run = run_trainer(config, tmp_path / precision, server.endpoint, processes=2)
        succeeded(run)
        history = get_json(server, f"out/{name}/metrics.json")["history"]
        finals[precision] = [e["trainLoss"] for e in history if "trainLoss" in e], run.summary.metrics
    (bf16_curve, bf16), (fp32_curve, fp32) = finals["bf16"], finals["fp32"]
    assert len(bf16_curve) == len(fp32_curve) == 8
    assert max(abs(a - b) for a, b in zip(bf16_curve, fp32_curve, strict=True)) < 0.05, finals
    assert abs(bf16["evalLoss"] - fp32["evalLoss"]) < 0.03, finals


GENERATION_TOKENS = 8


def _greedy_replies(model_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The base model's greedy reply to each row's question, one row at a time (no padding): what the
    trainer's batched, left-padded generation must reproduce."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    replies = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)["input_ids"]
        with torch.no_grad():
            output = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=GENERATION_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies.append(tokenizer.decode(output[0][len(prompt) :], skip_special_tokens=True))
    return replies


def _run_with_progress(
    config: TrainerConfig, workdir: Path, endpoint: str
) -> tuple[Run, list[dict[str, Any]]]:
    """Runs the trainer on 2 ranks, collecting every /progress document it serves until it exits."""
    process, termination = start_trainer(config, workdir, endpoint, processes=2)
    port = json.loads((workdir / "config.json").read_text())["reporting"]["progressPort"]
    documents = []
    while process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=2) as answer:
                documents.append(json.loads(answer.read()))
        except OSError:
            pass
        time.sleep(0.2)
    return finish_trainer(process, termination, workdir), documents


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_answer_accuracy_is_measured_before_training_and_after(
    store: tuple[S3Server, Path], tmp_path: Path, zero_stage: int
) -> None:
    """evaluation.generation on 2 ranks (ZeRO-3: decoding in lockstep): the base model's answerAccuracy
    at step 0 is exactly what its own greedy replies earn, each rank generating its share in batches
    (5 rows, 2 a batch: 2 batches on rank 0, 1 and a filler on rank 1); /progress reports it as
    baseMetrics, and a resumed run keeps it without evaluating the base again."""
    server, base_model = store
    name = f"generation-zero{zero_stage}"
    rows = demo_rows(5, seed=7)
    replies = _greedy_replies(base_model, rows)
    for index, (row, reply) in enumerate(zip(rows, replies, strict=True)):
        words = normalise_answer(reply).split()
        # Even rows: the reply's own first words, so they match; odd rows: words the reply lacks.
        row["reference"] = " ".join(words[:2]) if index % 2 == 0 and words else "quokka zebra"
        assert index % 2 == 0 or "quokka" not in reply.lower()
    expected = sum(row["reference"] != "quokka zebra" for row in rows) / len(rows)
    assert expected > 0, replies  # the base model says something
    put_jsonl(server.endpoint, BUCKET, f"data/{name}-eval.jsonl", rows)
    config = trainer_config(
        server.endpoint,
        name,
        dataset={"eval": f"s3://{BUCKET}/data/{name}-eval.jsonl"},
        deepspeed={"zeroStage": zero_stage},
        hyperparameters={"batchSizePerDevice": 2, "gradientCheckpointing": True},
        evaluation={"everySteps": 3, "generation": {"maxNewTokens": GENERATION_TOKENS, "match": "contains"}},
    )
    first, documents = _run_with_progress(config, tmp_path / "first", server.endpoint)
    succeeded(first)
    history = get_json(server, f"out/{name}/metrics.json")["history"]
    evaluations = [e for e in history if "answerAccuracy" in e]
    assert [e["step"] for e in evaluations] == [0, 3, 6]
    base = evaluations[0]
    assert base["answerAccuracy"] == pytest.approx(expected) and "evalLoss" in base
    assert (
        "answerAccuracy" in first.summary.metrics
        and first.summary.metrics["answerAccuracy"] == (evaluations[-1]["answerAccuracy"])
    )
    base_metrics = {k: v for k, v in base.items() if k != "step"}
    reported = [d for d in documents if d.get("baseMetrics")]
    assert reported, documents[-3:]
    assert all(d["baseMetrics"] == base_metrics for d in reported)
    assert all("evalLoss" not in d["evalMetrics"] for d in reported if d["step"] < 3)  # the trained model's
    assert any(d["evalMetrics"].get("answerAccuracy") is not None for d in reported)
    throughput = [e["tokensPerSecond"] for e in history if "tokensPerSecond" in e]
    assert len(throughput) == 6 and all(t > 0 for t in throughput)

    longer = config.model_copy(
        update={"hyperparameters": config.hyperparameters.model_copy(update={"max_steps": 8})}
    )
    second, documents = _run_with_progress(longer, tmp_path / "second", server.endpoint)
    succeeded(second)
    assert f"resumed from s3://{BUCKET}/out/{name}/checkpoints/step-3/" in second.log
    assert "step 0 evaluation" not in second.log
    history = get_json(server, f"out/{name}/metrics.json")["history"]
    assert [e["step"] for e in history if "answerAccuracy" in e] == [0, 3, 6, 8]
    assert history[0] == base
    assert any(d["step"] > 3 for d in documents)
    assert all(d["baseMetrics"] == base_metrics for d in documents if d["state"] == "training")

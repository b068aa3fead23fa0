"""spec.deepspeed.config: the allow-list of raw DeepSpeed keys, its messages, and DeepSpeed's own classes."""

from __future__ import annotations

import enum
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.deepspeed_overrides import (
    ALLOWED,
    REFUSED,
    Leaf,
    allowed_keys,
    check_deepspeed_overrides,
    openapi_schema,
)

from tests.manifests import minimal_manifest

ROOT = Path(__file__).resolve().parents[1]
P = "spec.deepspeed.config"
NAN = float("nan")
INF = float("inf")

ACCEPTED = [
    pytest.param({}, id="empty"),
    pytest.param({"gradient_clipping": 0.5}, id="clipping"),
    pytest.param({"gradient_clipping": 2}, id="integer-for-number"),
    pytest.param(
        {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 500000000}}, id="example-zero3"
    ),
    pytest.param({"zero_optimization": {"reduce_bucket_size": 5e8}}, id="integral-float-for-integer"),
    pytest.param({"zero_optimization": {"overlap_comm": None}}, id="null-where-deepspeed-takes-none"),
    pytest.param({"zero_optimization": {"offload_optimizer": {"pin_memory": False}}}, id="offload-pinning"),
    pytest.param({"zero_optimization": {}}, id="empty-section"),
    pytest.param({"communication_data_type": "bf16", "gradient_allreduce_op": "mean"}, id="choices"),
    pytest.param({"fp16": {"loss_scale": 0, "initial_scale_power": 12}, "bf16": {}}, id="loss-scaling"),
    pytest.param({"steps_per_print": 50, "wall_clock_breakdown": True}, id="logging"),
]

# (config, [(path, the message or the start of it)...]): every problem, in order.
REJECTED = [
    pytest.param(
        {"torch_autocast": {"enabled": True, "lower_precision_safe_modules": ["x.Marker"]}},
        [(f"{P}.torch_autocast", "not allowed (it imports the modules that lower_precision_safe_modules")],
        id="exploit-autocast-imports-a-module",
    ),
    pytest.param(
        {"csv_monitor": {"enabled": True, "output_path": "/etc/", "job_name": "x"}},
        [(f"{P}.csv_monitor", "not allowed (it writes files); allowed keys: bf16, communication_data_type")],
        id="exploit-csv-monitor-writes-files",
    ),
    pytest.param({"tensorboard": {"enabled": True}}, [(f"{P}.tensorboard", "not allowed (it writes")],
                 id="tensorboard"),
    pytest.param({"wandb": {"enabled": True}}, [(f"{P}.wandb", "not allowed (it sends metrics")], id="wandb"),
    pytest.param({"comet": {}}, [(f"{P}.comet", "not allowed (it sends metrics")], id="comet"),
    pytest.param({"flops_profiler": {"output_file": "/x"}},
                 [(f"{P}.flops_profiler", "not allowed (it writes files: output_file)")],
                 id="flops-profiler"),
    pytest.param({"autotuning": {"enabled": True}}, [(f"{P}.autotuning", "not allowed (it runs trial")],
                 id="autotuning"),
    pytest.param({"checkpoint": {"use_node_local_storage": True}}, [(f"{P}.checkpoint", "not allowed (")],
                 id="checkpoint"),
    pytest.param({"aio": {"block_size": 1}}, [(f"{P}.aio", "not allowed (asynchronous I/O")], id="aio"),
    pytest.param({"data_efficiency": {}}, [(f"{P}.data_efficiency", "not allowed (it reads data")],
                 id="data-efficiency"),
    pytest.param({"elasticity": {"enabled": True}}, [(f"{P}.elasticity", "not allowed (it changes")],
                 id="elasticity"),
    pytest.param(
        {"zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": "/etc"}}},
        [
            (f"{P}.zero_optimization.offload_param.device",
             "not allowed (set from spec.deepspeed.offload: use that field); allowed keys: pin_memory"),
            (f"{P}.zero_optimization.offload_param.nvme_path",
             "not allowed (NVMe offload writes to a folder on the node); allowed keys: pin_memory"),
        ],
        id="nvme-offload-path",
    ),
    pytest.param(
        {"zero_optimization": {"stage": 3}},
        [(f"{P}.zero_optimization.stage", "not allowed (set from spec.deepspeed.zeroStage: use that field)")],
        id="zero-stage-is-a-spec-field",
    ),
    pytest.param(
        {"train_batch_size": 7},
        [(f"{P}.train_batch_size", "not allowed (derived from spec.hyperparameters.batchSizePerDevice x")],
        id="derived-batch-size",
    ),
    pytest.param(
        {"gradient_accumulation_steps": 4, "train_micro_batch_size_per_gpu": 2},
        [
            (f"{P}.gradient_accumulation_steps", "not allowed (set from spec.hyperparameters.gradientAccum"),
            (f"{P}.train_micro_batch_size_per_gpu", "not allowed (set from spec.hyperparameters.batchSize"),
        ],
        id="batch-settings-are-spec-fields",
    ),
    pytest.param(
        {"bf16": {"enabled": True}, "fp16": {"enabled": False}},
        [
            (f"{P}.bf16.enabled", "not allowed (set from spec.hyperparameters.precision: use that field)"),
            (f"{P}.fp16.enabled", "not allowed (set from spec.hyperparameters.precision: use that field)"),
        ],
        id="precision-is-a-spec-field",
    ),
    pytest.param({"optimizer": {"type": "Adam"}}, [(f"{P}.optimizer", "not allowed (set by the operator")],
                 id="optimizer"),
    pytest.param({"scheduler": {"type": "WarmupLR"}}, [(f"{P}.scheduler", "not allowed (the trainer's")],
                 id="scheduler"),
    pytest.param(
        {"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": False}},
        [(f"{P}.zero_optimization.stage3_gather_16bit_weights_on_model_save", "not allowed (set by the")],
        id="zero3-save-gathering",
    ),
    pytest.param(
        {"zero_optimization": {"leaf_module": {"classes": ["x.Y"]}}},
        [(f"{P}.zero_optimization.leaf_module", "not allowed (it names module classes)")],
        id="leaf-module-names-classes",
    ),
    pytest.param(
        {"zero_optimization": {"stage3_prefetch_buckt_size": 10}},
        [(f"{P}.zero_optimization.stage3_prefetch_buckt_size",
          "not allowed (not a DeepSpeed key this operator accepts; "
          'did you mean "stage3_prefetch_bucket_size"?); allowed keys: allgather_bucket_size, ')],
        id="misspelt-nested-key",
    ),
    pytest.param({"gradient_cliping": 1.0},
                 [(f"{P}.gradient_cliping",
                   "not allowed (not a DeepSpeed key this operator accepts; "
                   'did you mean "gradient_clipping"?)')],
                 id="misspelt-top-level-key"),
    pytest.param({"no_such_key": 1}, [(f"{P}.no_such_key", "not allowed (not a DeepSpeed key this operator "
                                       "accepts); allowed keys: ")], id="unknown-key"),
    pytest.param({"gradient_clipping": "x"}, [(f"{P}.gradient_clipping", 'expected a number, got "x"')],
                 id="string-for-number"),
    pytest.param({"gradient_clipping": True}, [(f"{P}.gradient_clipping", "expected a number, got true")],
                 id="boolean-for-number"),
    pytest.param({"gradient_clipping": None}, [(f"{P}.gradient_clipping", "expected a number, got null")],
                 id="null-for-number"),
    pytest.param({"zero_optimization": {"reduce_bucket_size": 1.5}},
                 [(f"{P}.zero_optimization.reduce_bucket_size", "expected an integer, got 1.5")],
                 id="fraction-for-integer"),
    pytest.param({"zero_optimization": {"reduce_bucket_size": 2**70}},
                 [(f"{P}.zero_optimization.reduce_bucket_size",
                   "expected an integer, got 1180591620717411303424")],
                 id="integer-beyond-int64"),
    pytest.param({"zero_optimization": {"overlap_comm": "yes"}},
                 [(f"{P}.zero_optimization.overlap_comm", 'expected a boolean or null, got "yes"')],
                 id="string-for-boolean"),
    pytest.param({"communication_data_type": "fp8"},
                 [(f"{P}.communication_data_type",
                   'expected one of "fp32", "fp16", "bf16" or null, got "fp8"')],
                 id="not-a-choice"),
    pytest.param({"zero_optimization": None}, [(f"{P}.zero_optimization", "expected an object, got null")],
                 id="null-for-section"),
    pytest.param({"zero_optimization": [1]}, [(f"{P}.zero_optimization", "expected an object, got a list")],
                 id="list-for-section"),
    pytest.param({"fp16": {"loss_scale": {"a": 1}}}, [(f"{P}.fp16.loss_scale", "expected a number, got an "
                                                       "object")], id="object-for-number"),
    pytest.param({"gradient_clipping": NAN}, [(f"{P}.gradient_clipping", "expected a number, got NaN (not a "
                                               "finite number)")], id="nan"),
    pytest.param({"zero_optimization": {"offload_optimizer": {"ratio": -INF}}},
                 [(f"{P}.zero_optimization.offload_optimizer.ratio", "expected a number, got -Infinity")],
                 id="nested-infinity"),
    pytest.param(
        {"autotuning": {"a": [1, {"b": INF}]}, "zero_optimization": {"stage3_x": [NAN]}},
        [
            (f"{P}.autotuning", "not allowed ("),
            (f"{P}.autotuning.a[1].b", "Infinity is not allowed (not a finite number)"),
            (f"{P}.zero_optimization.stage3_x", "not allowed (not a DeepSpeed key"),
            (f"{P}.zero_optimization.stage3_x[0]", "NaN is not allowed (not a finite number)"),
        ],
        id="non-finite-inside-refused-values",
    ),
    pytest.param({3: 1}, [(f"{P}.3", "not allowed (not a DeepSpeed key")], id="non-string-key"),
]  # fmt: skip


@pytest.mark.parametrize("config", ACCEPTED)
def test_accepted(config: dict[str, Any]) -> None:
    assert check_deepspeed_overrides(config) == []


@pytest.mark.parametrize(("config", "expected"), REJECTED)
def test_rejected(config: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    issues = check_deepspeed_overrides(config)
    assert [path for path, _ in issues] == [path for path, _ in expected], issues
    for (_, message), (_, start) in zip(issues, expected, strict=True):
        assert message.startswith(start), message


def test_the_path_prefix_is_the_callers() -> None:
    issues = check_deepspeed_overrides({"csv_monitor": {}}, "deepspeed.config")
    assert issues[0][0] == "deepspeed.config.csv_monitor"
    assert check_deepspeed_overrides([1]) == [(P, "expected an object, got a list")]  # type: ignore[arg-type]


def test_hostile_sizes_neither_crash_nor_flood() -> None:
    deep: Any = 1.0
    for _ in range(100_000):  # deeper than Python's recursion limit
        deep = {"x": deep}
    assert check_deepspeed_overrides({"wandb": deep})[0][0] == f"{P}.wandb"
    flood = check_deepspeed_overrides({"wandb": [NAN] * 1_000_000})
    assert 1 < len(flood) <= 11
    assert all(len(message) < 2000 for _, message in check_deepspeed_overrides({"a" * 10_000: "b" * 10_000}))


def test_refused_and_allowed_keys_are_disjoint_and_every_refusal_has_a_reason() -> None:
    assert not set(REFUSED) & set(allowed_keys())
    # Each reason goes inside "not allowed (...)".
    assert all(reason and "(" not in reason for reason in REFUSED.values())


def test_the_openapi_schema_lists_the_same_keys() -> None:
    schema = openapi_schema()
    assert schema["properties"]["zero_optimization"]["properties"]["overlap_comm"] == {
        "type": "boolean",
        "nullable": True,
    }
    assert set(schema["properties"]) == set(ALLOWED)


# --- Against the installed DeepSpeed -----------------------------------------------------------------------


def _section_models() -> dict[str, type]:
    """The pydantic model DeepSpeedConfig parses each top-level section of ALLOWED with."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import precision_config
    from deepspeed.runtime.zero import config as zero_config

    models = {
        "zero_optimization": zero_config.DeepSpeedZeroConfig,
        "fp16": precision_config.DeepSpeedFP16Config,
        "bf16": precision_config.DeepSpeedBF16Config,
    }
    # ... as DeepSpeed's own getters say.
    assert type(zero_config.get_zero_config({"zero_optimization": {}})) is models["zero_optimization"]
    assert type(precision_config.get_float16_config({"fp16": {}})) is models["fp16"]
    assert type(precision_config.get_bfloat16_config({"bf16": {}})) is models["bf16"]
    return models


def _kinds(annotation: Any) -> tuple[set[str], bool, set[str]]:
    """The JSON kinds a pydantic annotation takes, whether it takes None, and its string choices."""
    kinds: set[str] = set()
    nullable = False
    choices: set[str] = set()
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else ()
    for arg in args or (annotation,):
        if arg is type(None):
            nullable = True
        elif arg is bool:
            kinds.add("boolean")
        elif isinstance(arg, type) and issubclass(arg, enum.Enum):
            values = {member.value for member in arg}
            kinds |= {"integer"} if all(isinstance(v, int) for v in values) else {"string"}
            choices |= {v for v in values if isinstance(v, str)}
        elif arg is int:
            kinds.add("integer")
        elif arg is float:
            kinds |= {"number", "integer"}
        elif arg is str:
            kinds.add("string")
    return kinds, nullable, choices


def _model_at(models: dict[str, type], dotted: str) -> tuple[type, str]:
    """The DeepSpeed model that holds a dotted key, and the key's last part."""
    first, *middle, last = dotted.split(".")
    model = models[first]
    for part in middle:
        model = _field(model, part)
        candidates = (*typing.get_args(model.annotation), model.annotation)
        model = next(a for a in candidates if hasattr(a, "model_fields"))
    return model, last


def _field(model: type, key: str) -> Any:
    """The pydantic field ``key`` names, by its alias (DeepSpeed's documented name) or its own name."""
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        if key in (info.alias, name):
            return info
    raise AssertionError(f"{model.__name__} has no field {key}")


NESTED = [key for key in allowed_keys() if "." in key]
TOP_LEVEL = [key for key in allowed_keys() if "." not in key]


@pytest.mark.parametrize("dotted", NESTED)
def test_every_nested_key_is_a_field_of_deepspeeds_model_with_a_compatible_type(dotted: str) -> None:
    model, key = _model_at(_section_models(), dotted)
    field = _field(model, key)
    kinds, nullable, choices = _kinds(field.annotation)
    leaf = allowed_keys()[dotted]
    assert leaf.kind in kinds, (dotted, field.annotation)
    assert nullable or not leaf.nullable, f"{dotted}: DeepSpeed does not take null"
    assert set(leaf.choices) <= choices or not choices
    assert not (field.json_schema_extra or {}).get("deprecated"), f"{dotted} is deprecated in DeepSpeed"


@pytest.mark.parametrize("key", TOP_LEVEL)
def test_every_top_level_key_is_a_deepspeed_constant_with_a_compatible_default(key: str) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import constants

    names = [name for name, value in vars(constants).items() if value == key and name.isupper()]
    assert names, f"deepspeed.runtime.constants names no key {key!r}"
    default = getattr(constants, f"{names[0]}_DEFAULT")
    leaf = allowed_keys()[key]
    if default is None:  # DeepSpeed takes null, and the type from elsewhere
        assert leaf.nullable
    else:
        expected = {bool: "boolean", int: "integer", float: "number", str: "string"}[type(default)]
        assert leaf.kind == expected or (leaf.kind, expected) == ("number", "integer"), (key, default)
    if leaf.choices and hasattr(constants, f"{names[0]}_SUPPORTED"):
        assert set(leaf.choices) == set(getattr(constants, f"{names[0]}_SUPPORTED"))


def _sample(dotted: str, leaf: Leaf) -> Any:
    """A value of the leaf's kind: DeepSpeed's default where it is one, else a plain one."""
    if leaf.choices:
        return leaf.choices[-1]
    canonical = {"boolean": True, "integer": 1, "number": 1.0}[leaf.kind]
    if "." not in dotted:
        return canonical
    model, key = _model_at(_section_models(), dotted)
    default = _field(model, key).default
    if leaf.kind == "integer" and type(default) is int and default > 0:
        return default
    return default if type(default) is type(canonical) else canonical


def _job_config(deepspeed: dict[str, Any]) -> Any:
    from finetune_operator.api.resolve import resolve_trainer_config
    from finetune_operator.api.validation import parse_finetune_job

    manifest = minimal_manifest(
        hyperparameters={"batchSizePerDevice": 2, "gradientAccumulationSteps": 3, "precision": "fp32"},
        resources={"nodes": 1, "gpusPerNode": 0},
        deepspeed=deepspeed,
    )
    return resolve_trainer_config(parse_finetune_job(manifest))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


@pytest.mark.parametrize("dotted", list(allowed_keys()))
def test_deepspeed_accepts_every_allowed_key_with_a_value_of_its_type(dotted: str) -> None:
    pytest.importorskip("deepspeed")
    from finetune_trainer.deepspeed_config import build_deepspeed_config, check_with_deepspeed

    override = _nest(dotted, _sample(dotted, allowed_keys()[dotted]))
    assert check_deepspeed_overrides(override) == []
    stage = 3 if "stage3" in dotted or "offload" in dotted else 2
    built = build_deepspeed_config(_job_config({"zeroStage": stage, "config": override}), 1)
    check_with_deepspeed(built, 1)


def test_an_allowed_override_reaches_the_built_deepspeed_config() -> None:
    pytest.importorskip("deepspeed")
    from finetune_trainer.deepspeed_config import build_deepspeed_config, check_with_deepspeed

    override = {
        "gradient_clipping": 0.25,
        "zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 123456},
        "fp16": {"loss_scale_window": 500},
        "wall_clock_breakdown": True,
    }
    assert check_deepspeed_overrides(override) == []
    built = build_deepspeed_config(_job_config({"zeroStage": 2, "config": override}), 4)
    assert built["gradient_clipping"] == 0.25
    assert built["zero_optimization"] == {
        "stage": 2,  # the operator's own keys stay
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 123456,
    }
    assert built["fp16"]["loss_scale_window"] == 500 and built["fp16"]["enabled"] is False
    assert built["wall_clock_breakdown"] is True
    assert built["train_batch_size"] == 2 * 3 * 4
    check_with_deepspeed(built, 4)


def test_ranges_stay_deepspeeds_to_judge_and_fail_the_job_non_retryable() -> None:
    """An allowed key with a value out of DeepSpeed's range passes admission; DeepSpeed refuses it first."""
    pytest.importorskip("deepspeed")
    from finetune_trainer.deepspeed_config import build_deepspeed_config, check_with_deepspeed
    from finetune_trainer.errors import NonRetryableError

    override = {"zero_optimization": {"reduce_bucket_size": 0}}
    assert check_deepspeed_overrides(override) == []
    built = build_deepspeed_config(_job_config({"config": override}), 1)
    rejected = r"^deepspeed\.config rejected by DeepSpeed: .*reduce_bucket_size"
    with pytest.raises(NonRetryableError, match=rejected):
        check_with_deepspeed(built, 1)


# --- The documentation ------------------------------------------------------------------------------------


def test_the_docs_list_every_allowed_and_refused_key() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("## deepspeed.config: the allowed keys", 1)[1].split("\n## ", 1)[0]
    tokens = re.findall(r"`([a-z0-9_.]+)`", section)
    listed = {*tokens, *(token.rsplit(".", 1)[-1] for token in tokens)}
    missing = [key for key in [*allowed_keys(), *REFUSED] if key.rsplit(".", 1)[-1] not in listed]
    assert not missing, f"docs/api.md does not list {missing}"

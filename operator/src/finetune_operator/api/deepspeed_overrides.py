"""Which raw DeepSpeed keys ``spec.deepspeed.config`` may set: an allow-list, checked at admission.

``spec.deepspeed.config`` is merged last over the DeepSpeed configuration that the trainer generates
(``finetune_trainer.deepspeed_config``). Left open, it reached DeepSpeed code that imports modules
(``torch_autocast.lower_precision_safe_modules: ["x.Marker"]`` imported and ran a module from the
working directory) and writes files anywhere (``csv_monitor.output_path``, ``tensorboard``,
``flops_profiler.output_file``, NVMe ``nvme_path``...). So only the keys in :data:`ALLOWED` are accepted,
each with its type; everything else is refused with the reason, :data:`REFUSED` giving it for the keys
users are likely to try.

Where the list comes from: DeepSpeed 0.19's own configuration, the pydantic models that parse its
sections (``deepspeed.runtime.zero.config.DeepSpeedZeroConfig`` and its offload models,
``deepspeed.runtime.precision_config.DeepSpeedFP16Config`` / ``DeepSpeedBF16Config``) and, for the
top-level scalars that ``DeepSpeedConfig`` reads with ``get_scalar_param``, the key and default constants
of ``deepspeed.runtime.constants``. Of those, it keeps the performance and numerics knobs that mean
something for this trainer and touch neither the file system nor the import system.

Why data and not DeepSpeed's classes at admission: the operator image and ``finetune validate`` install
the ``[operator]`` extras, which have neither DeepSpeed nor torch (``deepspeed.runtime.config_utils``
imports torch), and importing DeepSpeed costs seconds. tests/test_deepspeed_overrides.py checks every
key and type here against the installed DeepSpeed's classes, so that the list cannot drift from it.
Ranges (``reduce_bucket_size > 0``, ``fp16.loss_scale >= 0``) stay DeepSpeed's to judge: the trainer's
``check_with_deepspeed`` runs DeepSpeed's own parser before training and fails the job, non-retryable,
on what it rejects.

Keys the operator derives from spec fields are refused, naming the field to use instead: overriding
them would either be rejected by DeepSpeed at start (``train_batch_size`` is
batchSizePerDevice x gradientAccumulationSteps x nodes x gpusPerNode) or, worse, disagree with what the
trainer itself does with the spec field (its accumulation loop, the dtype it loads the model in, the
ZeRO-3 gathering it needs to save the model).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

Kind = Literal["boolean", "integer", "number", "string"]

INT64_MAX = 2**63 - 1  # JSON integers the API server stores; DeepSpeed sizes are int64 on the device
MAX_REPORTED_NON_FINITE = 10  # a hostile list of a million NaNs gets ten lines, not a million


@dataclass(frozen=True)
class Leaf:
    """A scalar value: its JSON kind, whether null is accepted, and the strings accepted (``string``)."""

    kind: Kind
    nullable: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(json.dumps(choice) for choice in self.choices)
        else:
            text = {"boolean": "a boolean", "integer": "an integer", "number": "a number"}.get(
                self.kind, "a string"
            )
        return text + (" or null" if self.nullable else "")


# key -> a Leaf, or a nested section of the same shape.
Section: TypeAlias = Mapping[str, "Leaf | Section"]

BOOLEAN = Leaf("boolean")
INTEGER = Leaf("integer")
NUMBER = Leaf("number")

ALLOWED: Section = {
    "gradient_clipping": NUMBER,  # the operator's default is 1.0; no spec field sets it
    "gradient_predivide_factor": NUMBER,
    "prescale_gradients": BOOLEAN,
    "gradient_allreduce_op": Leaf("string", choices=("mean", "sum")),
    "communication_data_type": Leaf("string", nullable=True, choices=("fp32", "fp16", "bf16")),
    "disable_allgather": BOOLEAN,
    "steps_per_print": Leaf("integer", nullable=True),  # DeepSpeed's log lines; the operator sets 10**9
    "wall_clock_breakdown": BOOLEAN,
    "memory_breakdown": BOOLEAN,
    "fp16": {  # DeepSpeedFP16Config; `enabled` follows spec.hyperparameters.precision
        "loss_scale": NUMBER,
        "initial_scale_power": INTEGER,
        "loss_scale_window": INTEGER,
        "hysteresis": INTEGER,
        "consecutive_hysteresis": BOOLEAN,
        "min_loss_scale": INTEGER,
    },
    "bf16": {  # DeepSpeedBF16Config; `enabled` follows spec.hyperparameters.precision
        "immediate_grad_update": BOOLEAN,
        "check_grad_overflow": BOOLEAN,
    },
    "zero_optimization": {  # DeepSpeedZeroConfig, by the names DeepSpeed documents (stage3_* aliases)
        "contiguous_gradients": BOOLEAN,
        "reduce_scatter": BOOLEAN,
        "reduce_bucket_size": INTEGER,
        "use_multi_rank_bucket_allreduce": BOOLEAN,
        "allgather_partitions": BOOLEAN,
        "allgather_bucket_size": INTEGER,
        "overlap_comm": Leaf("boolean", nullable=True),
        "load_from_fp32_weights": BOOLEAN,
        "sub_group_size": INTEGER,
        "stage3_prefetch_bucket_size": INTEGER,
        "stage3_param_persistence_threshold": INTEGER,
        "stage3_model_persistence_threshold": INTEGER,
        "stage3_max_live_parameters": INTEGER,
        "stage3_max_reuse_distance": INTEGER,
        "stage3_module_granularity_threshold": INTEGER,
        "stage3_use_all_reduce_for_fetch_params": BOOLEAN,
        "stage3_allgather_sequential": BOOLEAN,
        "ignore_unused_parameters": BOOLEAN,
        "round_robin_gradients": BOOLEAN,
        "zero_hpz_partition_size": INTEGER,
        "zero_quantized_weights": BOOLEAN,
        "zero_quantized_nontrainable_weights": BOOLEAN,
        "zero_quantized_gradients": BOOLEAN,
        "memory_efficient_linear": BOOLEAN,
        "offload_optimizer": {  # DeepSpeedZeroOffloadOptimizerConfig; `device` is spec.deepspeed.offload
            "pin_memory": BOOLEAN,
            "ratio": NUMBER,
        },
        "offload_param": {  # DeepSpeedZeroOffloadParamConfig; `device` is spec.deepspeed.offload
            "pin_memory": BOOLEAN,
        },
    },
}

_PRECISION = "set from spec.hyperparameters.precision: use that field"
_OFFLOAD_DEVICE = "set from spec.deepspeed.offload: use that field"
_NVME = "NVMe offload writes to a folder on the node"
_ZERO3_SAVE = "set by the operator at ZeRO-3: without it the saved model would be empty"
_DEPRECATED_OFFLOAD = "deprecated by DeepSpeed; CPU offload is spec.deepspeed.offload"
_WRITES = "it writes files"

# Dotted key -> why it is refused. Any key neither here nor in ALLOWED is refused too, as unknown.
REFUSED: Mapping[str, str] = {
    # Derived from spec fields.
    "train_batch_size": "derived from spec.hyperparameters.batchSizePerDevice x gradientAccumulationSteps "
    "x spec.resources.nodes x gpusPerNode: set those",
    "train_micro_batch_size_per_gpu": "set from spec.hyperparameters.batchSizePerDevice: use that field",
    "gradient_accumulation_steps": "set from spec.hyperparameters.gradientAccumulationSteps: use that field",
    "optimizer": "set by the operator from spec.hyperparameters.learningRate and weightDecay and "
    "spec.deepspeed.offload",
    "scheduler": "the trainer's schedule is spec.hyperparameters.lrScheduler and warmupRatio",
    "fp16.enabled": _PRECISION,
    "bf16.enabled": _PRECISION,
    "bfloat16": "DeepSpeed's old name for bf16; the precision is spec.hyperparameters.precision",
    "amp": _PRECISION,
    "zero_optimization.stage": "set from spec.deepspeed.zeroStage: use that field",
    "zero_optimization.offload_optimizer.device": _OFFLOAD_DEVICE,
    "zero_optimization.offload_param.device": _OFFLOAD_DEVICE,
    "zero_optimization.offload_optimizer.nvme_path": _NVME,
    "zero_optimization.offload_param.nvme_path": _NVME,
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _ZERO3_SAVE,
    "zero_optimization.gather_16bit_weights_on_model_save": _ZERO3_SAVE,
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": _ZERO3_SAVE,
    "zero_optimization.cpu_offload": _DEPRECATED_OFFLOAD,
    "zero_optimization.cpu_offload_param": _DEPRECATED_OFFLOAD,
    "zero_optimization.cpu_offload_use_pin_memory": _DEPRECATED_OFFLOAD,
    "zero_optimization.leaf_module": "it names module classes",
    "activation_checkpointing": "no effect here: the trainer checkpoints activations itself, "
    "as spec.hyperparameters.gradientCheckpointing says",
    # Import code, write files, send data out.
    "torch_autocast": "it imports the modules that lower_precision_safe_modules names; the precision is "
    "spec.hyperparameters.precision",
    "data_types": "keep_in_fp32_modules names modules, and the dtypes follow spec.hyperparameters.precision",
    "compression_training": "it names modules",
    "csv_monitor": _WRITES,
    "tensorboard": _WRITES,
    "wandb": "it sends metrics to an outside service and writes files",
    "comet": "it sends metrics to an outside service and writes files",
    "flops_profiler": "it writes files: output_file",
    "autotuning": "it runs trial jobs and writes files: results_dir, exps_dir",
    "checkpoint": "the trainer writes and keeps checkpoints itself, as spec.output says",
    "nebula": "it writes checkpoints to a folder: persistent_storage_path",
    "datastates": "it writes checkpoints itself",
    "aio": "asynchronous I/O for NVMe offload, which writes to a folder on the node",
    "data_efficiency": "it reads data and index files from paths; the data is spec.dataset",
    "curriculum_learning": "it reads data and index files from paths; the data is spec.dataset",
    "elasticity": "it changes the batch size and the world size, which spec.hyperparameters and "
    "spec.resources decide",
}

_UNKNOWN = "not a DeepSpeed key this operator accepts"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value, default=str)  # NaN and Infinity print as such
    return text if len(text) <= 80 else text[:77] + "..."


def _type_error(leaf: Leaf, value: Any) -> str | None:
    """Why ``value`` is not a ``leaf``, or None when it is one."""
    if value is None:
        return None if leaf.nullable else f"expected {leaf.describe()}, got null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected {leaf.describe()}, got {_show(value)} (not a finite number)"
    if leaf.kind == "boolean":
        fits = isinstance(value, bool)
    elif leaf.kind == "integer":
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        fits = integral and not isinstance(value, bool) and abs(value) <= INT64_MAX
    elif leaf.kind == "number":
        fits = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        fits = isinstance(value, str) and (not leaf.choices or value in leaf.choices)
    return None if fits else f"expected {leaf.describe()}, got {_show(value)}"


def _non_finite(value: Any, path: str, found: list[tuple[str, str]]) -> None:
    """Appends NaN and infinities anywhere inside ``value``; iterative, so depth cannot crash it."""
    stack = [(path, value)]
    while stack and len(found) < MAX_REPORTED_NON_FINITE:
        where, current = stack.pop()
        if isinstance(current, float) and not math.isfinite(current):
            found.append((where, f"{_show(current)} is not allowed (not a finite number)"))
        elif isinstance(current, dict):
            stack.extend((f"{where}.{key}", item) for key, item in reversed(list(current.items())))
        elif isinstance(current, list):
            stack.extend((f"{where}[{index}]", item) for index, item in reversed(list(enumerate(current))))


def _refusal(section: Section, key: Any, dotted: str) -> str:
    allowed = sorted(section)
    reason = REFUSED.get(dotted)
    if reason is None:
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.75)
        reason = _UNKNOWN + (f'; did you mean "{close[0]}"?' if close else "")
    return f"not allowed ({reason}); allowed keys: {', '.join(allowed)}"


def _check(section: Section, config: dict[Any, Any], path: str, dotted: str) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    for key, value in config.items():
        where = f"{path}.{key}"
        key_dotted = f"{dotted}.{key}" if dotted else str(key)
        allowed = section.get(key) if isinstance(key, str) else None
        if allowed is None:
            issues.append((where, _refusal(section, key, key_dotted)))
            _non_finite(value, where, issues)
        elif isinstance(allowed, Leaf):
            problem = _type_error(allowed, value)
            if problem is not None:
                issues.append((where, problem))
                if isinstance(value, dict | list):
                    _non_finite(value, where, issues)
        elif isinstance(value, dict):
            issues.extend(_check(allowed, value, where, key_dotted))
        else:
            issues.append((where, f"expected an object, got {_show(value)}"))
            _non_finite(value, where, issues)
    return issues


def check_deepspeed_overrides(
    config: dict[str, Any], path: str = "spec.deepspeed.config"
) -> list[tuple[str, str]]:
    """The problems of a ``spec.deepspeed.config``: (dotted path, message) pairs, empty when it is fine.

    Refused and unknown keys give ``not allowed (why); allowed keys: ...``; wrong types give
    ``expected a number, got "x"``; NaN and infinities are refused wherever they are. Never raises, and
    takes time linear in the size of ``config``.
    """
    if not isinstance(config, dict):
        return [(path, f"expected an object, got {_show(config)}")]
    return _check(ALLOWED, config, path, "")


def allowed_keys(section: Section = ALLOWED, prefix: str = "") -> dict[str, Leaf]:
    """Every allowed leaf by its dotted key, e.g. ``zero_optimization.overlap_comm``."""
    keys: dict[str, Leaf] = {}
    for key, allowed in section.items():
        if isinstance(allowed, Leaf):
            keys[prefix + key] = allowed
        else:
            keys |= allowed_keys(allowed, f"{prefix}{key}.")
    return keys


def openapi_schema(section: Section = ALLOWED) -> dict[str, Any]:
    """The allow-list as an OpenAPI v3 structural schema, should the CRD want the API server to prune
    or, under strict field validation, refuse what is not listed (without the reasons given here)."""
    properties: dict[str, Any] = {}
    for key, allowed in section.items():
        if isinstance(allowed, Leaf):
            schema: dict[str, Any] = {"type": allowed.kind}
            if allowed.choices:
                schema["enum"] = list(allowed.choices)
            if allowed.nullable:
                schema["nullable"] = True
        else:
            schema = openapi_schema(allowed)
        properties[key] = schema
    return {"type": "object", "properties": properties}

"""The DeepSpeed configuration of a run, generated from the trainer configuration.

``deepspeed.config`` from the FinetuneJob is merged last, key by key, so that users can tune any
DeepSpeed setting without the operator having to know it; :func:`check_with_deepspeed` then has
DeepSpeed itself judge the result, so that a setting it rejects fails the job once (non-retryable)
instead of restarting the gang on the same error. DeepSpeed is imported only by that function.
"""

from __future__ import annotations

import copy
from typing import Any

from finetune_trainer.config import Precision, TrainerConfig
from finetune_trainer.errors import NonRetryableError


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested mappings merge, everything else in ``overrides`` replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# cpuinfo's names (torch.cpu.get_capabilities) of the instructions that multiply bf16 natively: x86's
# AVX512-BF16 and AMX-BF16, Arm's BF16 (NEON) and SVE-BF16. Without them oneDNN emulates bf16 through
# fp32, slower than fp32 itself.
FAST_BF16_CAPABILITIES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (on the 2-core AMD EPYC CI machine, with AVX512-BF16, a
    1024x576x1536 matmul takes 4.3 ms in bf16 and 19 ms in fp32 on one thread)."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # an older torch: the one probe it has
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    found = capabilities()
    return any(found.get(name) is True for name in FAST_BF16_CAPABILITIES)


def cpu_precision(precision: Precision) -> tuple[Precision, str | None]:
    """The precision a run on CPUs uses for the job's ``precision``, and why it differs (None if not).

    bf16 where the CPU multiplies it natively: DeepSpeed keeps fp32 master weights and optimizer states
    at every ZeRO stage and scales no loss for bf16, so only the forward and backward run in bf16, as on
    GPUs. fp16 becomes bf16 there (no CPU here has fast fp16 matmuls, and fp16 would need loss
    scaling); elsewhere both become fp32.
    """
    if precision == "fp32":
        return "fp32", None
    if not cpu_has_fast_bf16():
        return "fp32", "this CPU has no fast bf16"
    if precision == "fp16":
        return "bf16", "fp16 is slow on CPUs, this one multiplies bf16 natively"
    return "bf16", None


def zero3_buffer_sizes(hidden_size: int, uses_gpus: bool) -> dict[str, int]:
    """ZeRO-3's buffer and reuse settings sized by the model's hidden size (transformers' "auto" rule).

    DeepSpeed's defaults are fixed element counts (reduce bucket and prefetch bucket 5e8, reuse distance
    1e9): for a model of under 1e9 parameters the reuse distance keeps every gathered parameter alive
    from the forward to the backward, a whole unpartitioned copy per rank, and the reduce bucket alone is
    2 GB of fp32. Sized by the hidden size, a rank holds about one block's weights gathered at a time.

    The live parameters are capped lower on CPU ranks, where gathered weights are host memory: with
    16 x hidden² the prefetcher kept about two blocks gathered from the end of the forward through the
    backward (2 gloo ranks, a 1.24 GiB fp32 Llama, LoRA: the steady phase's summed peak 2.98-3.00 GiB);
    with 4 x hidden² 2.84-2.85 GiB, in the same time within the noise (docs/PERFORMANCE.md). On GPUs the
    deeper prefetch, which overlaps gathers with compute there, stays.
    """
    square = hidden_size * hidden_size
    return {
        "reduce_bucket_size": square,
        "stage3_prefetch_bucket_size": int(0.9 * square),
        "stage3_param_persistence_threshold": 10 * hidden_size,
        "stage3_max_reuse_distance": 4 * square,
        "stage3_max_live_parameters": (16 if uses_gpus else 4) * square,
    }


def build_deepspeed_config(
    config: TrainerConfig, world_size: int, hidden_size: int | None = None
) -> dict[str, Any]:
    """The run's DeepSpeed configuration; the same dict goes to ``HfDeepSpeedConfig`` (ZeRO-3 loading
    partitioned, modeling.load_model) and to ``deepspeed.initialize``. ``hidden_size`` (the model's
    config.json) sizes ZeRO-3's buffers (:func:`zero3_buffer_sizes`); without it DeepSpeed's defaults."""
    hp = config.hyperparameters
    zero: dict[str, Any] = {"stage": config.deepspeed.zero_stage}
    if config.deepspeed.zero_stage >= 2:
        zero |= {"overlap_comm": config.distributed.uses_gpus, "contiguous_gradients": True}
    if config.deepspeed.zero_stage == 3:
        # Without it, ZeRO-3 saves an empty LoRA adapter (peft#453) and no loadable full model.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if hidden_size is not None:
            if hidden_size <= 0:
                raise NonRetryableError(f"model config.json: hidden_size {hidden_size} is not positive")
            zero |= zero3_buffer_sizes(hidden_size, config.distributed.uses_gpus)
    if config.deepspeed.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.distributed.uses_gpus}
        if config.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": config.distributed.uses_gpus}
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hp.batch_size_per_device,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "train_batch_size": hp.batch_size_per_device * hp.gradient_accumulation_steps * world_size,
        "gradient_clipping": hp.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": hp.precision == "bf16"},
        "fp16": {"enabled": hp.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # the trainer reports progress itself
        "wall_clock_breakdown": False,
    }
    if config.deepspeed.offload == "cpu":
        # ZeRO-Offload needs DeepSpeed's own CPU Adam; otherwise the trainer passes a torch optimizer.
        generated["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": hp.learning_rate, "weight_decay": hp.weight_decay, "betas": [0.9, 0.999]},
        }
    return merge(generated, config.deepspeed.overrides)


def check_with_deepspeed(ds_config: dict[str, Any], world_size: int) -> None:
    """Raises NonRetryableError when DeepSpeed rejects ``ds_config`` for ``world_size`` data-parallel ranks.

    DeepSpeed's own ``DeepSpeedConfig`` parses the configuration, with the checks that
    ``deepspeed.initialize`` would make (the batch sizes agreeing with the world size, known keys and
    values, ZeRO settings). It takes the world size from an initialised process group, or 1 without
    one; here it is given, so the check is the same before or after ``init_process_group``, on any
    rank, and runs no collective. ``ds_config`` is not modified.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    class _ForWorld(DeepSpeedConfig):
        def _configure_train_batch_size(self) -> None:
            self.world_size = world_size  # read only by the batch checks that follow, after its guess
            super()._configure_train_batch_size()

    try:
        _ForWorld(copy.deepcopy(ds_config))
    except Exception as error:  # assertions, pydantic's ValueErrors, TypeErrors on wrong types...
        # One line: pydantic lists each problem on its own lines, then a link to its documentation.
        lines = [line.strip() for line in str(error).splitlines()]
        detail = "; ".join(line for line in lines if line and not line.startswith("For further information"))
        raise NonRetryableError(
            f"deepspeed.config rejected by DeepSpeed: {detail or type(error).__name__}"
        ) from error

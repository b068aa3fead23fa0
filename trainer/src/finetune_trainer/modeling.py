"""Loads the base model and tokenizer and decides which parameters train (full, LoRA, QLoRA, freeze)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from finetune_trainer.config import ADAPTER_METHODS, TrainerConfig
from finetune_trainer.errors import NonRetryableError
from finetune_trainer.sharded_loading import SAFETENSORS_INDEX, load_partitioned

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ADAPTER_CONFIG = "adapter_config.json"


def check_model_files(model_dir: Path) -> None:
    """NonRetryableError naming the file when the model directory holds a file no restart can mend.

    Every top-level JSON file (config.json, the tokenizer's files, a shard index) must parse; every
    safetensors file must have a readable header whose tensors fit in the file, which catches a file
    cut short and one that is not safetensors at all (the header is read, not the tensors: a few
    kilobytes per file). A shard that an index names must exist. Flipped bytes inside tensor data
    are beyond a header check: checkpoints carry checksums for that, models do not.
    """
    for path in sorted(model_dir.glob("*.json")):
        try:
            value = json.loads(path.read_bytes())
        except ValueError as error:  # also bad UTF-8
            raise NonRetryableError(f"model file {path.name} is not valid JSON: {error}") from error
        if path.name == SAFETENSORS_INDEX:
            weight_map = value.get("weight_map") if isinstance(value, dict) else None
            if not isinstance(weight_map, dict):
                raise NonRetryableError(f"model file {path.name} has no weight_map object")
            missing = sorted(
                {str(shard) for shard in weight_map.values()} - {p.name for p in model_dir.iterdir()}
            )
            if missing:
                raise NonRetryableError(
                    f"model file {path.name} lists shards that are missing: {', '.join(missing[:5])}"
                )
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as error:
            raise NonRetryableError(f"model file {path.name} is corrupt or truncated: {error}") from error


def load_tokenizer(model_dir: Path, config: TrainerConfig) -> PreTrainedTokenizerBase:
    check_model_files(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise NonRetryableError(f"cannot load the tokenizer from {config.model.uri}: {error}") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization(config: TrainerConfig) -> dict[str, Any]:
    """QLoRA's 4-bit NF4 base; bitsandbytes' kernels exist for GPUs only."""
    if not (config.distributed.uses_gpus and torch.cuda.is_available()):
        raise NonRetryableError(
            "method qlora needs GPUs: 4-bit bitsandbytes kernels have no CPU implementation"
        )
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as error:  # pragma: no cover - transformers always has it
        raise NonRetryableError(f"qlora needs bitsandbytes: {error}") from error
    compute = DTYPES[config.hyperparameters.precision]
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,  # needed to shard the 4-bit base under ZeRO-3
        )
    }


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of transformer blocks (``model.model.layers`` for Llama-like models)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not candidates:
        raise NonRetryableError("method freeze: the model has no list of transformer blocks to unfreeze")
    return max(candidates, key=len)


def _freeze_all_but_top(model: PreTrainedModel, trainable_layers: int) -> None:
    layers = decoder_layers(model)
    if trainable_layers > len(layers):
        raise NonRetryableError(
            f"method freeze: trainableLayers {trainable_layers} exceeds the model's {len(layers)} blocks"
        )
    model.requires_grad_(False)
    for block in list(layers)[-trainable_layers:]:
        block.requires_grad_(True)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    final_norm = getattr(decoder, "norm", None)
    if final_norm is not None:
        final_norm.requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)


def targeted_modules(model: torch.nn.Module, target_modules: str | Sequence[str]) -> set[str]:
    """The names of the modules a LoRA ``target_modules`` selects in ``model``, as peft selects them:
    "all-linear" is every linear layer but the output head, a list matches a module's name or its last
    dotted parts, another string is a regular expression for the whole name. Comparing selections, not
    spellings, lets a job's "all-linear" match an adapter whose configuration lists what it resolved to."""
    modules = dict(model.named_modules())
    if target_modules == "all-linear":
        head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        return {n for n, m in modules.items() if isinstance(m, torch.nn.Linear | Conv1D) and m is not head}
    if isinstance(target_modules, str):
        return {n for n in modules if re.fullmatch(target_modules, n)}
    return {n for n in modules for t in target_modules if n == t or n.endswith(f".{t}")}


def _shown_targets(target_modules: str | Sequence[str], selected: set[str]) -> str:
    """A target_modules setting for a message: peft writes every layer's full name, so a list is shown by
    its distinct last parts, with the number of modules it selects."""
    spelled = (
        target_modules
        if isinstance(target_modules, str)
        else "[" + ", ".join(sorted({t.rsplit(".", 1)[-1] for t in target_modules})) + "]"
    )
    return f"{spelled} ({len(selected)} modules)"


def continued_lora_config(adapter_dir: Path, config: TrainerConfig, base: PreTrainedModel) -> LoraConfig:
    """The peft configuration of the earlier adapter in ``adapter_dir`` (model.adapter), with this job's
    dropout, for training it further. NonRetryableError naming model.adapter, before any step, when it
    holds no LoRA adapter, when its r, alpha or target modules differ from method.lora (continuing
    would silently change the job's method), or when it records a base model other than model.uri. An
    adapter that records no S3 base (one written before the trainer recorded it) is not compared."""
    from peft import LoraConfig

    uri, lora = config.model.adapter, config.method.lora
    assert lora is not None
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise NonRetryableError(f"model.adapter {uri} holds no LoRA adapter (no {ADAPTER_CONFIG})")
    try:
        saved = json.loads(path.read_bytes())
    except ValueError as error:
        raise NonRetryableError(f"model.adapter {uri}: {ADAPTER_CONFIG} is not JSON: {error}") from error
    kind = saved.get("peft_type") if isinstance(saved, dict) else None
    if kind != "LORA":
        raise NonRetryableError(
            f"model.adapter {uri} holds no LoRA adapter ({ADAPTER_CONFIG} has peft_type {kind!r}, not 'LORA')"
        )
    differences = []
    if saved.get("r") != lora.r:
        differences.append(f"r {saved.get('r')!r} (method.lora.r {lora.r})")
    alpha = saved.get("lora_alpha")
    if not isinstance(alpha, int | float) or float(alpha) != lora.alpha:
        differences.append(f"alpha {alpha!r} (method.lora.alpha {lora.alpha:g})")
    theirs = saved.get("target_modules")
    names = theirs if isinstance(theirs, list) else [theirs]
    readable = isinstance(theirs, str | list) and all(isinstance(t, str) for t in names)
    if not readable:
        differences.append(f"target_modules {theirs!r} (method.lora.targetModules {lora.target_modules})")
    else:
        selected, wanted = targeted_modules(base, theirs), targeted_modules(base, lora.target_modules)
        if selected != wanted:
            differences.append(
                f"target modules {_shown_targets(theirs, selected)} (method.lora.targetModules "
                f"{_shown_targets(lora.target_modules, wanted)})"
            )
    if differences:
        raise NonRetryableError(
            f"model.adapter {uri} was trained with {', '.join(differences)}; continuing it needs the same "
            "settings in method.lora"
        )
    recorded = saved.get("base_model_name_or_path")
    on_s3 = isinstance(recorded, str) and recorded.startswith("s3://")
    if on_s3 and recorded.rstrip("/") != config.model.uri.rstrip("/"):
        raise NonRetryableError(
            f"model.adapter {uri} was trained on {recorded} (base_model_name_or_path in its "
            f"{ADAPTER_CONFIG}), not on model.uri {config.model.uri}"
        )
    try:
        continued = LoraConfig.from_pretrained(str(adapter_dir))
    except (TypeError, ValueError) as error:  # e.g. settings this peft version does not know
        raise NonRetryableError(f"model.adapter {uri}: peft cannot read {ADAPTER_CONFIG}: {error}") from error
    continued.lora_dropout = lora.dropout
    return continued


def _apply_lora(model: PreTrainedModel, config: TrainerConfig, adapter_dir: Path | None) -> PreTrainedModel:
    """A new adapter, or the earlier one in ``adapter_dir`` (model.adapter) trainable again."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    lora = config.method.lora
    assert lora is not None
    if config.method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.hyperparameters.gradient_checkpointing
        )
    if adapter_dir is not None:
        continued = continued_lora_config(adapter_dir, config, model)
        try:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True, config=continued)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # missing or misshapen weights
            raise NonRetryableError(
                f"model.adapter {config.model.adapter}: cannot load its weights: {error}"
            ) from error
    else:
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as error:  # e.g. target modules that the model does not have
            raise NonRetryableError(f"method lora: {error}") from error
    # What adapter_config.json names as the base: peft would write the trainer's own copy, a folder that
    # is deleted with the workspace; the URI is what a later job (model.adapter) and the card compare.
    model.peft_config["default"].base_model_name_or_path = config.model.uri
    return model


# The HfDeepSpeedConfig of a ZeRO-3 run: transformers holds it only by a weak reference (what
# is_deepspeed_zero3_enabled() and from_pretrained's zero.Init read), so the process keeps it alive.
_zero3_config: Any = None


def model_hidden_size(model_dir: Path) -> int | None:
    """The model's hidden size from its config.json (``hidden_size``, or a multimodal model's
    ``text_config``'s), which sizes ZeRO-3's buffers; None when it names none."""
    try:
        value = json.loads((model_dir / "config.json").read_bytes())
    except (OSError, ValueError):
        return None  # load_model reports a missing or broken config.json with the model's URI
    if not isinstance(value, dict):
        return None
    text = value.get("text_config")
    size = value.get("hidden_size", text.get("hidden_size") if isinstance(text, dict) else None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _loading_kwargs(config: TrainerConfig, zero3: bool) -> dict[str, Any]:
    """from_pretrained's arguments. transformers 5 always loads the low-memory way (the model built on
    the meta device, each tensor read from the mmapped safetensors straight into its parameter; its
    ``low_cpu_mem_usage`` is gone), in the engine's own dtype, so bf16 is never upcast on the host.
    On GPUs below ZeRO-3 the tensors go straight to this rank's GPU (``device_map``), so the host holds
    no copy at all; under ZeRO-3 zero.Init places each rank's partition itself."""
    kwargs: dict[str, Any] = {
        "trust_remote_code": config.model.trust_remote_code,
        "attn_implementation": "sdpa",
        # The engine's own precision, on CPUs too (finetune run chose it for the CPU): DeepSpeed casts
        # the parameters to it anyway, so loading in it saves a copy.
        "dtype": DTYPES[config.hyperparameters.precision],
    }
    if config.method.type == "qlora":
        kwargs |= _quantization(config)
    if not zero3 and config.distributed.uses_gpus and torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def load_model(
    model_dir: Path,
    config: TrainerConfig,
    adapter_dir: Path | None = None,
    ds_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """The base model with only the parameters of the chosen method trainable; with ``adapter_dir``
    (model.adapter's download) LoRA continues that adapter instead of starting a new one.

    With ZeRO-3 in ``ds_config`` (the very dict deepspeed.initialize gets) the parameters are created
    partitioned under ``deepspeed.zero.Init`` (through ``HfDeepSpeedConfig``) and each rank reads only
    its partition of each tensor from the safetensors files (``sharded_loading``), so a rank holds its
    share of the weights, never the whole model; a checkpoint that loader cannot match exactly goes
    through from_pretrained's own ZeRO-3 path (rank 0 reads each module and scatters it). Needs the
    process group (init_distributed) first.
    """
    global _zero3_config
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        _zero3_config = HfDeepSpeedConfig(ds_config)
    kwargs = _loading_kwargs(config, zero3)
    check_model_files(model_dir)
    partition_by_partition = zero3 and "quantization_config" not in kwargs
    model = load_partitioned(model_dir, kwargs["dtype"]) if partition_by_partition else None
    try:
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except SafetensorError as error:  # what the header check cannot see, e.g. a tensor of the wrong shape
        raise NonRetryableError(f"model files in {config.model.uri} are corrupt: {error}") from error
    except (OSError, ValueError) as error:
        raise NonRetryableError(f"cannot load the model from {config.model.uri}: {error}") from error
    _, total = parameter_counts(model)
    logger.info(
        "model loaded: %d parameters, %d bytes of them held by this rank (%s)",
        total,
        held_parameter_bytes(model),
        "partitioned by ZeRO-3" if zero3 else "a whole copy",
    )
    return apply_method(model, config, adapter_dir)


def apply_method(
    model: PreTrainedModel, config: TrainerConfig, adapter_dir: Path | None = None
) -> PreTrainedModel:
    """Gradient checkpointing, then only the method's parameters trainable (LoRA wraps the model)."""
    if config.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.method.type in ADAPTER_METHODS:
        model = _apply_lora(model, config, adapter_dir)
        if config.hyperparameters.gradient_checkpointing:
            model.enable_input_require_grads()  # LoRA + checkpointing needs grads at the inputs (peft#137)
    elif config.method.type == "freeze":
        assert config.method.freeze is not None
        _freeze_all_but_top(model, config.method.freeze.trainable_layers)
    logger.info("method %s: %d of %d parameters train", config.method.type, *parameter_counts(model))
    return model


def full_numel(parameter: torch.nn.Parameter) -> int:
    """A parameter's element count, also when ZeRO-3 partitioned it (then ``numel()`` is this rank's
    empty placeholder and ``ds_numel`` the whole tensor's)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def held_parameter_bytes(model: torch.nn.Module) -> int:
    """The bytes of parameter data this rank holds: its ZeRO-3 partition (``ds_tensor``) where a
    parameter is partitioned, the whole tensor otherwise."""
    total = 0
    for parameter in model.parameters():
        local = getattr(parameter, "ds_tensor", None)
        data = local if isinstance(local, torch.Tensor) else parameter.data
        total += data.numel() * data.element_size()
    return total


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, for throughput and MFU accounting; whole tensors under ZeRO-3."""
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(full_numel(p) for p in model.parameters())

"""Loads the base model and tokenizer and decides which parameters train (full, LoRA, QLoRA, freeze)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from finetune_trainer.config import ADAPTER_METHODS, TrainerConfig
from finetune_trainer.errors import NonRetryableError

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_INDEX = "model.safetensors.index.json"


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


def _apply_lora(model: PreTrainedModel, config: TrainerConfig) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = config.method.lora
    assert lora is not None
    if config.method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.hyperparameters.gradient_checkpointing
        )
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:  # e.g. target modules that the model does not have
        raise NonRetryableError(f"method lora: {error}") from error


def load_model(model_dir: Path, config: TrainerConfig) -> PreTrainedModel:
    """The base model with only the parameters of the chosen method trainable."""
    precision = config.hyperparameters.precision
    kwargs: dict[str, Any] = {
        "trust_remote_code": config.model.trust_remote_code,
        "attn_implementation": "sdpa",
        "dtype": DTYPES[precision] if config.distributed.uses_gpus else torch.float32,
    }
    if config.method.type == "qlora":
        kwargs |= _quantization(config)
    check_model_files(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except SafetensorError as error:  # what the header check cannot see, e.g. a tensor of the wrong shape
        raise NonRetryableError(f"model files in {config.model.uri} are corrupt: {error}") from error
    except (OSError, ValueError) as error:
        raise NonRetryableError(f"cannot load the model from {config.model.uri}: {error}") from error
    return apply_method(model, config)


def apply_method(model: PreTrainedModel, config: TrainerConfig) -> PreTrainedModel:
    """Gradient checkpointing, then only the method's parameters trainable (LoRA wraps the model)."""
    if config.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.method.type in ADAPTER_METHODS:
        model = _apply_lora(model, config)
        if config.hyperparameters.gradient_checkpointing:
            model.enable_input_require_grads()  # LoRA + checkpointing needs grads at the inputs (peft#137)
    elif config.method.type == "freeze":
        assert config.method.freeze is not None
        _freeze_all_but_top(model, config.method.freeze.trainable_layers)
    logger.info("method %s: %d of %d parameters train", config.method.type, *parameter_counts(model))
    return model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, for throughput and MFU accounting."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())

"""Under ZeRO-3 each rank reads only its own partition of every weight from the safetensors files.

transformers' ZeRO-3 path (from_pretrained under HfDeepSpeedConfig) builds the model partitioned with
deepspeed.zero.Init, then rank 0 maps every checkpoint file and each module is gathered whole on every
rank to take rank 0's values: on 2 gloo ranks with a 1.24 GiB fp32 model, rank 0's mapped file pages
alone reached 1.55 GB while loading (benchmarks/memory.py). Here every rank builds the same partitioned
model and reads the bytes of its own flat slice of each tensor straight into its partition
(``ds_tensor``, the slice DeepSpeed's ``_partition_param`` would keep): no file is mapped, nothing is
gathered or broadcast, and a rank's memory grows by its share of the weights only.

The safetensors header (an 8-byte little-endian length, then JSON giving each tensor's dtype, shape
and byte range) is parsed here because the safetensors library offers no read of a byte range into a
given buffer: ``safe_open`` maps the file and slices by rows, not by flat element ranges.

Only a checkpoint that matches the model exactly takes this path: safetensors files, a model class
transformers knows for the config, every parameter and persistent buffer present under its name with
its shape. Anything else (weight-name conversions, ``.bin`` files, a model with its own code,
quantisation) is loaded by from_pretrained; :func:`load_partitioned` returns None and logs why.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils.generic import ContextManagers

logger = logging.getLogger(__name__)

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
READ_CHUNK_BYTES = 64 * 1024 * 1024  # a dtype conversion's staging buffer, at most
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class UnsupportedCheckpoint(Exception):
    """The checkpoint or model is one this loader leaves to from_pretrained; the message says why."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte, from the start of the file


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header alone."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UnsupportedCheckpoint(f"{path.name}: tensor {name} has dtype {entry['dtype']}")
        start = 8 + length + entry["data_offsets"][0]
        tensors[name] = StoredTensor(path, dtype, tuple(entry["shape"]), start)
    return tensors


def checkpoint_tensors(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the model's safetensors weights: one file, or the shards its index names."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
    elif (model_dir / SAFETENSORS_WEIGHTS).is_file():
        files = [SAFETENSORS_WEIGHTS]
    else:
        raise UnsupportedCheckpoint(f"no {SAFETENSORS_WEIGHTS} or {SAFETENSORS_INDEX}")
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        tensors |= read_header(model_dir / name)
    return tensors


class RangeReader:
    """Reads flat element ranges of stored tensors into tensors, keeping each file open once."""

    def __init__(self) -> None:
        self._descriptors: dict[Path, int] = {}

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *_: object) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)

    def _pread_into(self, path: Path, offset: int, target: torch.Tensor) -> None:
        if path not in self._descriptors:
            self._descriptors[path] = os.open(path, os.O_RDONLY)
        view = memoryview(target.view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self._descriptors[path], [view[done:]], offset + done)
            if got == 0:
                raise UnsupportedCheckpoint(f"{path.name} ends inside a tensor")
            done += got

    def read(self, stored: StoredTensor, start: int, into: torch.Tensor) -> None:
        """Elements ``[start, start + into.numel())`` of ``stored`` into the 1-D ``into``, converted to
        its dtype and device; read in place where no conversion is needed."""
        size = stored.dtype.itemsize
        offset = stored.offset + start * size
        if into.dtype == stored.dtype and into.device.type == "cpu" and into.is_contiguous():
            self._pread_into(stored.path, offset, into)
            return
        step = max(1, READ_CHUNK_BYTES // size)
        for first in range(0, into.numel(), step):
            chunk = torch.empty(min(step, into.numel() - first), dtype=stored.dtype)
            self._pread_into(stored.path, offset + first * size, chunk)
            into[first : first + chunk.numel()].copy_(chunk)


def _persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name: value for name, value in model.state_dict().items() if name not in parameters}


def _matched(
    prefix: str,
    parameters: dict[str, torch.nn.Parameter],
    buffers: dict[str, torch.Tensor],
    stored: dict[str, StoredTensor],
) -> dict[str, StoredTensor]:
    """The stored tensor of every parameter and persistent buffer, by the model's names (a checkpoint
    saved without the base model's ``prefix`` is matched with it, as from_pretrained does)."""
    for name, parameter in parameters.items():
        if not hasattr(parameter, "ds_tensor"):
            raise UnsupportedCheckpoint(f"{name} was not partitioned by deepspeed.zero.Init")
        if getattr(parameter, "ds_secondary_tensor", None) is not None:
            raise UnsupportedCheckpoint("hierarchical partitions (zero_hpz_partition_size) are not read here")
    wanted = {name: tuple(p.ds_shape) for name, p in parameters.items()}
    wanted |= {name: tuple(b.shape) for name, b in buffers.items()}
    prefix = f"{prefix}."
    by_name = {(prefix + k if k not in wanted and prefix + k in wanted else k): v for k, v in stored.items()}
    problems = [f"{name} is not in the checkpoint" for name in wanted if name not in by_name]
    problems += [
        f"{name} has shape {list(by_name[name].shape)} in the checkpoint, {list(shape)} in the model"
        for name, shape in wanted.items()
        if name in by_name and by_name[name].shape != shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UnsupportedCheckpoint("; ".join(problems[:3]) + more)
    return {name: by_name[name] for name in wanted}


def _build_partitioned(model_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model as from_pretrained builds it under ZeRO-3, before any weight is read: deepspeed.zero.Init
    partitions each parameter as its module is created, weights neither initialised nor read."""
    config = AutoConfig.from_pretrained(model_dir)
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        raise UnsupportedCheckpoint("the model ships its own modelling code (auto_map in config.json)")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise UnsupportedCheckpoint(f"transformers has no causal-LM class for model type {config.model_type}")
    config.dtype = dtype
    config._attn_implementation = "sdpa"
    with ContextManagers(model_class.get_init_context(dtype, False, False, None)):
        model = model_class(config)
    model.tie_weights()  # an untied head would be a parameter of its own, missing from the checkpoint
    return model


def load_partitioned(model_dir: Path, dtype: torch.dtype) -> PreTrainedModel | None:
    """The model with each rank's partition read from ``model_dir``'s safetensors files; None (logged)
    when the checkpoint does not match the model exactly, for from_pretrained to load. Needs the
    process group and an HfDeepSpeedConfig of ZeRO-3 first, as from_pretrained does."""
    try:
        stored = checkpoint_tensors(model_dir)
        model = _build_partitioned(model_dir, dtype)
        parameters = dict(model.named_parameters())
        buffers = _persistent_buffers(model)
        matched = _matched(model.base_model_prefix, parameters, buffers, stored)
    except (UnsupportedCheckpoint, ValueError, KeyError, OSError) as reason:
        logger.info("loading through from_pretrained, not partition by partition: %s", reason)
        return None
    with RangeReader() as reader, torch.no_grad():
        for name, parameter in parameters.items():
            _read_partition(reader, matched[name], parameter)
        for name, buffer in buffers.items():
            reader.read(matched[name], 0, buffer.view(-1))
    model.eval()  # as from_pretrained leaves it
    if (model_dir / GENERATION_CONFIG).is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    logger.info("model read partition by partition: %d tensors", len(matched))
    return model


def _read_partition(reader: RangeReader, stored: StoredTensor, parameter: Any) -> None:
    """This rank's slice of the flattened tensor, as DeepSpeed partitions it: equal slices of
    ``ds_tensor.numel()`` elements in rank order, the last one zero-padded."""
    partition = parameter.ds_tensor
    start = partition.numel() * dist.get_rank(group=parameter.ds_process_group)
    count = max(0, min(partition.numel(), parameter.ds_numel - start))
    if count:
        reader.read(stored, start, partition[:count])
    partition[count:].zero_()

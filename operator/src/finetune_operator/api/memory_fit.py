"""Will a FinetuneJob fit in GPU memory? An estimate per rank from the model's ``config.json`` alone.

Pure arithmetic, no weights, no torch: ``finetune validate --fit`` runs it on a laptop and the
operator runs it before it takes a GPU. The model is a Llama-style decoder (Llama, Mistral, Qwen2,
Gemma): embeddings, ``num_hidden_layers`` blocks of attention (q/k/v/o projections, grouped-query K
and V) and a SwiGLU MLP (gate/up/down), RMSNorms, and a head tied to the embeddings or not.

Bytes per GPU, with N = nodes x gpusPerNode data-parallel ranks, P the parameters, T the trainable
ones (all for full; r x (in + out) per adapted projection for LoRA; the top blocks, final norm and
head for freeze), b = batchSizePerDevice, s = maxSeqLength:

- weights: P x 2 B (bf16/fp16) or 4 B (fp32); QLoRA's quantised projections 0.5 B + 1/64 B per
  parameter (nf4 with double-quantised block scales, modeling.py), the rest in the compute dtype.
  ZeRO-3 keeps P/N of them plus the largest layer gathered (DeepSpeed counts 4 B x its parameters);
  ZeRO-3 with offload keeps only that gathered layer.
- gradients: 2 B (16-bit) + 4 B (fp32 for the optimizer) per trainable parameter under mixed
  precision, 4 B under fp32; /N from ZeRO-2 on; on the CPU with offload.
- optimizer: AdamW's fp32 master copy and two moments, 12 B per trainable parameter, under fp32 too
  (DeepSpeed's ZeRO optimizers clone the fp32 partition as the master even then); /N from ZeRO-1 on; on
  the CPU with offload.
- buffers: at ZeRO-2, the contiguous-gradients bucket DeepSpeed allocates whole at the first backward
  (``reduce_bucket_size``, 5e8 elements by default, of the gradient dtype: 1 GB in 16-bit), which its
  estimators leave out; ZeRO-3's buckets are sized by the hidden size (the trainer's
  ``zero3_buffer_sizes``) and its gathered layer is in the weights.
- activations: per block and token, the tensors a Llama block saves for its backward pass, 16-bit:
  2 x (5h + 2 kv) for attention (norm input, q/k/v input, q, k, v, the attention output; fused SDPA
  attention saves no s x s scores) and 2 x (2h + 4i) for the MLP (norm input, gate/up input, gate,
  up, SiLU(gate), the down projection's input): Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", section 4.1 (34 sbh + 5 a s^2 b for a GPT block), with
  Llama's shapes, no dropout and flash attention. With gradient checkpointing only each block's input
  (2h per token) is kept, plus one block's activations while it is recomputed. Frozen blocks below the
  trainable ones (freeze) keep none. Plus the logits for the loss: b x s x vocab x (2 B + 4 B for the
  fp32 copy the loss takes + 4 B for its gradient).
- overhead: the CUDA context and cuBLAS workspace (1 GiB), NCCL's buffers (0.5 GiB with more than one
  rank) and the caching allocator's fragmentation (10 % of the rest).

The model-state terms (weights, gradients, optimizer) are DeepSpeed's own estimators for full
fine-tuning: ``estimate_zero2_model_states_mem_needs`` (2P + 18P/N; offload: 2P) in
deepspeed/runtime/zero/stage_1_and_2.py and ``estimate_zero3_model_states_mem_needs`` (4 x largest
layer + 18P/N; offload: the largest layer) in stage3.py, which tests/test_memory_fit.py compares with.
At ZeRO-3, DeepSpeed's 18 B count the 16-bit parameter and gradient partitions, the fp32 master and the
moments (16 B) and the fp32 gradient of one optimizer sub-group at a time (amortised to 2 B): here 2 B
of weights, 4 B of gradients and 12 B of optimizer per parameter, /N.

An estimate, not a measurement: it is meant to tell 40 GiB from 160 GiB, not 70 from 75. A job
"clearly does not fit" (the operator fails it) only above 100 % of the GPU's memory; above 90 % it is
tight.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

GIB = 1024**3
MIB = 1024**2
# The GPU assumed when nothing says otherwise: an 80 GB A100/H100, the common fine-tuning GPU.
DEFAULT_GPU_MEMORY = 80 * GIB
CUDA_CONTEXT_BYTES = 1 * GIB
NCCL_BYTES = GIB // 2
FRAGMENTATION = 0.10
TIGHT_FRACTION = 0.90
# QLoRA: 4-bit nf4 weights (0.5 B) plus double-quantised block scales (an fp8 scale per 64 weights and
# an fp32 per 256 of those: 8/64 + 32/(64 x 256) bits, about 1/64 B per weight).
QLORA_BYTES_PER_PARAM = 0.5 + 1 / 64
# The projections "all-linear" adapts (every linear layer but the head) and those a block has.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_SUGGESTED_NODES = 512
# DeepSpeed's default zero_optimization.reduce_bucket_size, which the trainer keeps below ZeRO-3.
REDUCE_BUCKET_ELEMENTS = 500_000_000

Verdict = Literal["fits", "tight", "does-not-fit"]


class ModelConfigError(ValueError):
    """A config.json (or the annotation holding one) without the shape of a Llama-style decoder."""


@dataclass(frozen=True)
class ModelShape:
    """The shape keys of a decoder's config.json, checked."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v (and o for Llama's attention_bias) carry biases
    output_bias: bool = False  # o_proj has a bias (Llama attention_bias), not Qwen2's

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelShape:
        """The shape from a config.json dict; ModelConfigError naming the key, its value and ``source``."""
        if not isinstance(config, Mapping):
            raise ModelConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if isinstance(config.get("text_config"), Mapping):  # multimodal wrappers keep the decoder here
            config = {**config, **config["text_config"]}

        def integer(key: str, default: int | None = None, low: int = 1, high: int = 10**7) -> int:
            value = config.get(key, default)
            if value is None:
                raise ModelConfigError(
                    f"{source}: missing key {key!r} (needed for a Llama-style decoder: vocab_size, "
                    "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads)"
                )
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ModelConfigError(
                    f"{source}: {key} is {value!r}; expected an integer from {low} to {high}"
                )
            return value

        heads = integer("num_attention_heads", high=4096)
        hidden = integer("hidden_size")
        kv_heads = integer("num_key_value_heads", heads, high=heads)
        if heads % kv_heads:
            raise ModelConfigError(
                f"{source}: num_key_value_heads {kv_heads} must divide num_attention_heads {heads}"
            )
        head_dim = config.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ModelConfigError(
                    f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                    "and there is no head_dim"
                )
            head_dim = hidden // heads
        else:
            head_dim = integer("head_dim", high=65536)
        tie = config.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ModelConfigError(f"{source}: tie_word_embeddings is {tie!r}; expected true or false")
        bias = config.get("attention_bias", False)
        if not isinstance(bias, bool):
            raise ModelConfigError(f"{source}: attention_bias is {bias!r}; expected true or false")
        qwen2 = str(config.get("model_type", "")).startswith("qwen2")
        return cls(
            vocab_size=integer("vocab_size", high=10**8),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers", high=10**5),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            tie_word_embeddings=tie,
            attention_bias=bias or qwen2,
            output_bias=bias and not qwen2,
        )

    def projection(self, name: str) -> tuple[int, int]:
        """(in, out) features of one of a block's projections."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[name]

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def projection_parameters(self) -> int:
        """A block's linear weights (what QLoRA quantises)."""
        return sum(a * b for a, b in map(self.projection, PROJECTIONS))

    @property
    def block_parameters(self) -> int:
        biases = (self.q_dim + 2 * self.kv_dim) * self.attention_bias + self.hidden_size * self.output_bias
        return self.projection_parameters + biases + 2 * self.hidden_size  # two RMSNorms

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_parameters(self) -> int:
        """The output head's own weights: none when tied to the embeddings."""
        return 0 if self.tie_word_embeddings else self.embedding_parameters

    @property
    def parameters(self) -> int:
        """Every parameter once (a tied head is the embedding), as transformers counts them."""
        return (
            self.embedding_parameters
            + self.num_hidden_layers * self.block_parameters
            + self.hidden_size  # the final norm
            + self.head_parameters
        )

    @property
    def largest_layer_parameters(self) -> int:
        """The most parameters one module holds itself (DeepSpeed's ``largest_layer_params``)."""
        return max(self.embedding_parameters, *(a * b for a, b in map(self.projection, PROJECTIONS)))


@dataclass(frozen=True)
class Plan:
    """What the estimate depends on in a FinetuneJob's spec (the alternatives vary it)."""

    method: str = "lora"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ()  # empty: all-linear
    freeze_layers: int = 2
    precision: str = "bf16"
    zero_stage: int = 2
    offload: bool = False
    nodes: int = 1
    gpus_per_node: int = 1
    batch_size: int = 4
    seq_length: int = 2048
    gradient_checkpointing: bool = True

    @property
    def world_size(self) -> int:
        return self.nodes * max(self.gpus_per_node, 1)

    @classmethod
    def from_job(cls, job: Any) -> Plan:
        """The plan of a validated FinetuneJob (api.spec), defaults applied."""
        spec = job.spec
        lora = spec.method.lora
        return cls(
            method=spec.method.type,
            lora_r=lora.r if lora is not None else 16,
            lora_targets=tuple(lora.target_modules) if lora is not None else (),
            freeze_layers=spec.method.freeze.trainable_layers if spec.method.freeze is not None else 2,
            precision=spec.hyperparameters.precision,
            zero_stage=spec.deepspeed.zero_stage,
            offload=spec.deepspeed.offload == "cpu",
            nodes=spec.resources.nodes,
            gpus_per_node=spec.resources.gpus_per_node,
            batch_size=spec.hyperparameters.batch_size_per_device,
            seq_length=spec.dataset.max_seq_length,
            gradient_checkpointing=spec.hyperparameters.gradient_checkpointing,
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, term by term."""

    parameters: int  # of the model, for the record
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    world_size: int
    buffers: int = 0
    ignored_targets: tuple[str, ...] = ()  # LoRA target modules that are no projection of a block

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.buffers + self.activations + self.logits + self.overhead

    def terms(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("buffers", self.buffers),
            ("activations", self.activations),
            ("logits", self.logits),
            ("overhead", self.overhead),
        ]


def _lora_trainable(shape: ModelShape, plan: Plan) -> tuple[int, tuple[str, ...]]:
    targets = plan.lora_targets or PROJECTIONS
    known = [t for t in targets if t in PROJECTIONS]
    ignored = tuple(t for t in targets if t not in PROJECTIONS)
    per_block = sum(plan.lora_r * sum(shape.projection(t)) for t in dict.fromkeys(known))
    return shape.num_hidden_layers * per_block, ignored


def trainable_parameters(shape: ModelShape, plan: Plan) -> tuple[int, tuple[str, ...]]:
    """(trainable parameters, LoRA targets not counted) of the plan's method."""
    if plan.method in ("lora", "qlora"):
        return _lora_trainable(shape, plan)
    if plan.method == "freeze":
        layers = min(plan.freeze_layers, shape.num_hidden_layers)
        head = shape.head_parameters or shape.embedding_parameters  # a tied head trains the embedding
        return layers * shape.block_parameters + shape.hidden_size + head, ()
    return shape.parameters, ()


def estimate(shape: ModelShape, plan: Plan) -> MemoryEstimate:
    """Bytes per GPU of the plan on the model (the module docstring gives the formula)."""
    n = plan.world_size
    total_params = shape.parameters
    trainable, ignored = trainable_parameters(shape, plan)
    adapter = trainable if plan.method in ("lora", "qlora") else 0
    dtype = 4 if plan.precision == "fp32" else 2
    if plan.method == "qlora":
        quantised = shape.num_hidden_layers * shape.projection_parameters
        weight_bytes = quantised * QLORA_BYTES_PER_PARAM + (total_params - quantised + adapter) * dtype
    else:
        weight_bytes = (total_params + adapter) * dtype
    largest = 4 * shape.largest_layer_parameters
    if plan.zero_stage == 3:
        weights = largest if plan.offload else largest + weight_bytes / n
    else:
        weights = weight_bytes
    grad_bytes = 4 if plan.precision == "fp32" or plan.zero_stage == 3 else 6  # ZeRO-3: DeepSpeed's 18 B
    optimizer_bytes = 12
    gradients = 0.0 if plan.offload else trainable * grad_bytes / (n if plan.zero_stage >= 2 else 1)
    optimizer = 0.0 if plan.offload else trainable * optimizer_bytes / (n if plan.zero_stage >= 1 else 1)

    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    act_dtype = 4 if plan.precision == "fp32" else 2
    per_token_block = act_dtype * ((5 * h + 2 * kv) + (2 * h + 4 * i))
    tokens = plan.batch_size * plan.seq_length
    backprop_layers = (
        min(plan.freeze_layers, shape.num_hidden_layers)
        if plan.method == "freeze"
        else shape.num_hidden_layers
    )
    if plan.gradient_checkpointing:
        activations = tokens * (backprop_layers * act_dtype * h + per_token_block)
    else:
        activations = tokens * backprop_layers * per_token_block
    logits = tokens * shape.vocab_size * (act_dtype + 4 + 4)
    buffers = REDUCE_BUCKET_ELEMENTS * dtype if plan.zero_stage == 2 else 0
    tensors = weights + gradients + optimizer + buffers + activations + logits
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if n > 1 else 0) + FRAGMENTATION * tensors
    return MemoryEstimate(
        parameters=total_params,
        trainable_parameters=trainable,
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(optimizer),
        activations=int(activations),
        logits=int(logits),
        overhead=int(overhead),
        world_size=n,
        buffers=int(buffers),
        ignored_targets=ignored,
    )


def verdict_of(total: int, gpu_memory: int) -> Verdict:
    if total > gpu_memory:
        return "does-not-fit"
    return "tight" if total > TIGHT_FRACTION * gpu_memory else "fits"


@dataclass(frozen=True)
class Alternative:
    """A change to the spec, and the estimate with it."""

    change: str
    total: int
    fits: bool


@dataclass(frozen=True)
class FitReport:
    """The estimate against one GPU's memory, with what would fit when it does not."""

    estimate: MemoryEstimate
    gpu_memory: int
    verdict: Verdict
    alternatives: tuple[Alternative, ...] = ()

    @property
    def fits(self) -> bool:
        return self.verdict != "does-not-fit"

    @property
    def summary(self) -> str:
        """One line: the estimate, the GPU assumed, the verdict and (when it does not fit) what would."""
        e = self.estimate
        head = (
            f"{gib(e.total)} per GPU of {gib(self.gpu_memory)} ({percent(e.total, self.gpu_memory)}; "
            f"weights {gib(e.weights)}, gradients {gib(e.gradients)}, optimizer {gib(e.optimizer)}, "
            f"buffers {gib(e.buffers)}, "
            f"activations {gib(e.activations)}, logits {gib(e.logits)}, overhead {gib(e.overhead)}; "
            f"{e.world_size} GPU(s))"
        )
        if self.verdict == "fits":
            return f"fits: {head}"
        if self.verdict == "tight":
            return f"tight: {head}; above {int(TIGHT_FRACTION * 100)} %, it may run out of memory"
        fitting = [a for a in self.alternatives if a.fits]
        others = [a for a in self.alternatives if not a.fits]
        words = f"does not fit: {head}"
        if fitting:
            words += "; would fit: " + "; ".join(f"{a.change} ({gib(a.total)})" for a in fitting)
        else:
            words += "; nothing tried fits"
        if others:
            words += "; not enough: " + "; ".join(f"{a.change} ({gib(a.total)})" for a in others)
        return words


def gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %"


def _alternatives(shape: ModelShape, plan: Plan, gpu_memory: int) -> list[Alternative]:
    """In order: ZeRO-3, offload, LoRA instead of full, more GPUs, a shorter maxSeqLength, gradient
    checkpointing; each alone, against the same GPU."""
    tried: list[tuple[str, Plan]] = []
    if plan.zero_stage < 3:
        tried.append(("deepspeed.zeroStage 3", replace(plan, zero_stage=3)))
    if not plan.offload:
        stage = max(plan.zero_stage, 1)
        where = "optimizer and parameters" if stage == 3 else "optimizer"
        tried.append(
            (
                f"deepspeed.offload cpu ({where}), zeroStage {stage}",
                replace(plan, offload=True, zero_stage=stage),
            )
        )
        if stage < 3:
            tried.append(
                (
                    "deepspeed.zeroStage 3 with offload cpu (optimizer and parameters)",
                    replace(plan, zero_stage=3, offload=True),
                )
            )
    if plan.method in ("full", "freeze"):
        tried.append(
            ("method lora (r 16, all-linear)", replace(plan, method="lora", lora_r=16, lora_targets=()))
        )
    alternatives = [Alternative(change, estimate(shape, p).total, False) for change, p in tried]
    alternatives = [replace(a, fits=a.total <= gpu_memory) for a in alternatives]

    per_node = max(plan.gpus_per_node, 1)
    bigger = next(
        (
            nodes
            for nodes in range(plan.nodes + 1, MAX_SUGGESTED_NODES + 1)
            if estimate(shape, replace(plan, nodes=nodes)).total <= gpu_memory
        ),
        None,
    )
    if bigger is not None and plan.gpus_per_node > 0:
        total = estimate(shape, replace(plan, nodes=bigger)).total
        alternatives.append(
            Alternative(
                f"resources.nodes {bigger} ({bigger * per_node} GPUs in all, at this ZeRO stage)", total, True
            )
        )
    seq = plan.seq_length // 2
    while seq >= 16:
        total = estimate(shape, replace(plan, seq_length=seq)).total
        if total <= gpu_memory:
            alternatives.append(Alternative(f"dataset.maxSeqLength {seq}", total, True))
            break
        seq //= 2
    if not plan.gradient_checkpointing:
        total = estimate(shape, replace(plan, gradient_checkpointing=True)).total
        alternatives.append(
            Alternative("hyperparameters.gradientCheckpointing true", total, total <= gpu_memory)
        )
    return alternatives


def check_fit(shape: ModelShape, plan: Plan, gpu_memory: int) -> FitReport:
    """The estimate against ``gpu_memory`` bytes; alternatives only when it does not fit."""
    found = estimate(shape, plan)
    verdict = verdict_of(found.total, gpu_memory)
    alternatives = tuple(_alternatives(shape, plan, gpu_memory)) if verdict == "does-not-fit" else ()
    return FitReport(found, gpu_memory, verdict, alternatives)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|Ki|Mi|Gi|Ti|KB|MB|GB|TB|K|M|G|T)?\s*$")
_UNITS = {
    "B": 1,
    "KiB": 1024,
    "Ki": 1024,
    "MiB": MIB,
    "Mi": MIB,
    "GiB": GIB,
    "Gi": GIB,
    "TiB": 1024 * GIB,
    "Ti": 1024 * GIB,
    "KB": 10**3,
    "K": 10**3,
    "MB": 10**6,
    "M": 10**6,
    "GB": 10**9,
    "G": 10**9,
    "TB": 10**12,
    "T": 10**12,
}


def parse_memory(text: str) -> int:
    """Bytes from "80GiB", "80GB", "81559MiB" or a bare number of MiB (as nvidia.com/gpu.memory)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"GPU memory {text!r}: expected a size such as 80GiB, 80GB or 81559MiB (a bare number is MiB)"
        )
    number, unit = float(match.group(1)), match.group(2)
    size = number * (_UNITS[unit] if unit else MIB)
    if not math.isfinite(size) or size < GIB or size > 64 * 1024 * GIB:
        raise ValueError(f"GPU memory {text!r}: expected from 1 GiB to 64 TiB")
    return int(size)


# --- where the operator finds the model's shape and the GPU's memory -------------------------------------

# The model's config.json (its shape keys suffice) as JSON, on the FinetuneJob: the operator holds no
# data credentials, so this is how it learns the shape; `finetune validate --fit` prints the line to add.
MODEL_CONFIG_ANNOTATION = "finetune.dev/model-config"
# Set by NVIDIA GPU feature discovery on GPU nodes: the memory of one GPU, in MiB.
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
)


def annotation_value(config: Mapping[str, Any]) -> str:
    """The annotation's value for a config.json: its shape keys only, compact JSON."""
    source = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
    return json.dumps({k: source[k] for k in SHAPE_KEYS if k in source}, separators=(",", ":"))


def shape_from_annotation(job: Any) -> ModelShape | None:
    """The shape a job's annotation declares; None without one, ModelConfigError when it is bad."""
    text = job.metadata.annotations.get(MODEL_CONFIG_ANNOTATION)
    if text is None:
        return None
    where = f"metadata.annotations[{MODEL_CONFIG_ANNOTATION}]"
    try:
        config = json.loads(text)
    except ValueError as error:
        raise ModelConfigError(f"{where}: not JSON ({error})") from None
    return ModelShape.from_config(config, where)


@dataclass(frozen=True)
class GpuNode:
    """What the operator keeps of a Node (its kopf index): the name and labels, to match a job's
    nodeSelector, and the memory of one of its GPUs, None when nvidia.com/gpu.memory is not a size."""

    name: str
    labels: Mapping[str, str]
    gpu_memory: int | None

    @classmethod
    def of(cls, name: str, labels: Mapping[str, str]) -> GpuNode:
        try:
            memory: int | None = parse_memory(labels.get(GPU_MEMORY_LABEL, ""))
        except ValueError:
            memory = None
        return cls(name, dict(labels), memory)


def _in_mib(label: str) -> str:
    """A label's size as written, with the MiB a bare number means (as nvidia.com/gpu.memory)."""
    return f"{label} MiB" if label.replace(".", "", 1).isdigit() else label


def gpu_memory_for(job: Any, default: int | None, nodes: Iterable[GpuNode] = ()) -> tuple[int | None, str]:
    """(bytes of one GPU, where that comes from), the first known of: the job's nodeSelector on
    nvidia.com/gpu.memory (MiB), which names the GPUs it can run on; the smallest label among the
    ``nodes`` that match all of its nodeSelector, since the scheduler may place a rank on any of them;
    ``default`` (the operator's --gpu-memory)."""
    selector = job.spec.resources.node_selector
    label = selector.get(GPU_MEMORY_LABEL)
    if label is not None:
        try:
            return parse_memory(label), f"spec.resources.nodeSelector[{GPU_MEMORY_LABEL}] {_in_mib(label)}"
        except ValueError:
            pass  # not a size: no node matches it with a size either, so the default, below
    matching = [n for n in nodes if n.gpu_memory is not None and selector.items() <= n.labels.items()]
    if matching:
        smallest = min(matching, key=lambda n: (n.gpu_memory or 0, n.name))
        which = (
            "the only matching node"
            if len(matching) == 1
            else f"the smallest of the {len(matching)} matching nodes"
        )
        size = _in_mib(smallest.labels[GPU_MEMORY_LABEL])
        return smallest.gpu_memory, f"{GPU_MEMORY_LABEL} {size} on node {smallest.name}, {which}"
    if default is None:
        return None, "no GPU memory configured"
    return default, f"{gib(default)}, the configured GPU memory"

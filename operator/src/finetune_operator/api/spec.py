"""The FinetuneJob API: the one source of truth for the CRD schema, its defaults and its rules.

``crd.py`` turns these models into ``crds/finetunejob.yaml``; ``validation.py`` checks manifests with
the same models plus the CEL rules declared here (``__cel_rules__``), which the API server runs too.
Field names are the public API: they are camelCase aliases of the Python attribute names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from finetune_trainer.config import (
    ADAPTER_METHODS,
    CLASSIFICATION_METRICS,
    FORMAT_COLUMNS,
    GENERATION_FORMATS,
    GENERATION_METRICS,
    NO_CONTROL_CHARACTERS,
    S3_BUCKET_WORDS,
    S3_DATA_FILE_PATTERN,
    S3_PREFIX_PATTERN,
    TRAIN_METRICS,
    AnswerMatch,
    DatasetFormat,
    GateMetric,
    LrScheduler,
    MethodType,
    Offload,
    Precision,
    S3DataFile,
    S3Prefix,
    UriRules,
)
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError, core_schema

from finetune_operator import API_VERSION, KIND
from finetune_operator.api.deepspeed_overrides import check_deepspeed_overrides
from finetune_operator.api.kube_schemas import (
    LABEL_VALUE,
    LABEL_VALUE_WORDS,
    MAX_QUALIFIED_NAME_LENGTH,
    QUALIFIED_NAME_OR_EMPTY,
    QUALIFIED_NAME_WORDS,
    map_keys_rule,
    prefix_length_rule,
    schema_problems,
)
from finetune_operator.api.kube_schemas_generated import AFFINITY_SCHEMA
from finetune_operator.api.naming import MAX_JOB_NAME_LENGTH, MAX_NODES


@dataclass(frozen=True)
class CelRule:
    """One ``x-kubernetes-validations`` entry. ``rule`` refers to ``oldSelf`` for transition rules."""

    rule: str
    message: str = ""
    message_expression: str = ""
    field_path: str = ""
    reason: str = ""

    @property
    def is_transition_rule(self) -> bool:
        return "oldSelf" in self.rule


DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1123_SUBDOMAIN_OR_EMPTY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"
# A Kubernetes resource quantity ("32", "500m", "512Gi", "1.5").
QUANTITY = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[munkMGTPE]|[KMGTPE]i)?$"
# No '@' before the path: credentials (http://user:password@host) would land in the job's ConfigMap.
HTTP_URL_OR_EMPTY = r"^(https?://[^\s/@]+(/\S*)?)?$"
REGION_OR_EMPTY = r"^([a-z0-9][a-z0-9-]{0,62})?$"
NO_WHITESPACE = r"^\S*$"
# The largest integer quantity (bytes of memory, CPUs): within int64, and a float64 that prints as itself,
# as the API server keeps and serves a schema's maximum (2**63 - 1 would come back as 9223372036854775808).
MAX_INTEGER_QUANTITY = 10**18
# The longest duration a time limit may name: 10 years (365-day years) in seconds, far within what a
# datetime holds (year 9999) whenever it is added to the present.
MAX_DURATION_SECONDS = 10 * 365 * 24 * 3600
# The most optimizer steps a job can train for (hyperparameters.maxSteps), and so any step interval.
MAX_STEPS = 100_000_000

# What each pattern allows, in words, for error messages (the CRD carries the patterns themselves).
PATTERN_HINTS: dict[str, str] = {}


def _hint(pattern: str, words: str) -> None:
    PATTERN_HINTS[pattern] = words


_hint(S3_PREFIX_PATTERN, f"an S3 location s3://<bucket>/<prefix> ({S3_BUCKET_WORDS})")
_hint(
    S3_DATA_FILE_PATTERN,
    f"an S3 object s3://<bucket>/<key> whose key ends in .jsonl or .parquet ({S3_BUCKET_WORDS})",
)
_hint(DNS_1123_SUBDOMAIN_OR_EMPTY, "empty, or a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')")
_hint(QUANTITY, "a Kubernetes quantity such as 32, 500m or 512Gi")
_hint(
    HTTP_URL_OR_EMPTY,
    "empty, or an http:// or https:// URL such as http://minio.storage:9000, without user:password@ "
    "(credentials in the endpoint would land in a ConfigMap; use storage.credentialsSecret)",
)
_hint(REGION_OR_EMPTY, "empty, or a region name such as us-east-1")
_hint(NO_WHITESPACE, "an image reference without whitespace")
_hint(QUALIFIED_NAME_OR_EMPTY, f"empty, or {QUALIFIED_NAME_WORDS}")
_hint(LABEL_VALUE, LABEL_VALUE_WORDS)


def _non_finite(value: Any) -> str | None:
    """Where, in a free-form JSON value, a number is NaN or infinite ("x.y[2]"), or None. Iterative, so
    that no depth of nesting makes it recurse."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return f"{where or '(the value)'} is {json.dumps(node)}"
        if isinstance(node, dict):
            stack += [(f"{where}.{key}" if where else str(key), child) for key, child in node.items()]
        elif isinstance(node, list):
            stack += [(f"{where}[{index}]", child) for index, child in enumerate(node)]
    return None


class FiniteNumbers:
    """``Annotated`` metadata for a free-form JSON field: every number in it is finite. (The API server
    needs no rule for it: JSON has no NaN or Infinity; YAML's .nan and .inf are what this catches.)"""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    @staticmethod
    def _check(value: Any) -> Any:
        found = _non_finite(value)
        if found is not None:
            words = "must hold only finite numbers, not NaN or Infinity: {found}"
            raise PydanticCustomError("finite_number", words, {"found": found})
        return value


@dataclass(frozen=True, eq=False)
class KubeSchema:
    """``Annotated`` metadata for a field that is a Kubernetes type: its structural schema (derived from
    Kubernetes' own, see ``kube_schemas.py``) is the field's CRD schema, and pydantic checks values
    against it. The CEL rules in it run with the rest of the CRD's."""

    schema: dict[str, Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def _check(self, value: Any) -> Any:
        problems = schema_problems(self.schema, value)
        if problems:
            raise PydanticCustomError("kube_schema", "{problems}", {"problems": "; ".join(problems)})
        return value


FreeFormJson = Annotated[dict[str, Any], FiniteNumbers()]
Affinity = Annotated[dict[str, Any], FiniteNumbers(), KubeSchema(AFFINITY_SCHEMA)]
Quantity = (
    Annotated[int, Field(ge=0, le=MAX_INTEGER_QUANTITY)]
    | Annotated[str, Field(pattern=QUANTITY, max_length=64)]
)
DnsSubdomainOrEmpty = Annotated[str, Field(pattern=DNS_1123_SUBDOMAIN_OR_EMPTY, max_length=253)]
ShortName = Annotated[str, Field(min_length=1, max_length=256)]


class SpecModel(BaseModel):
    """Strict like the API server: no type coercion, no unknown fields, camelCase names."""

    model_config = ConfigDict(
        extra="forbid", strict=True, alias_generator=to_camel, validate_by_name=False, allow_inf_nan=False
    )
    __cel_rules__: ClassVar[tuple[CelRule, ...]] = ()


def _immutable(field: str) -> CelRule:
    return CelRule(
        rule="self == oldSelf",
        message=f"spec.{field} is immutable once the job is created; create a new FinetuneJob instead",
    )


class ModelSpec(SpecModel):
    """The base model to fine-tune."""

    __cel_rules__ = (_immutable("model"),)

    uri: S3Prefix = Field(
        description="S3 location of the base model: a directory in Hugging Face format (config.json, "
        "tokenizer files and safetensors weights), e.g. s3://models/llama-3.1-8b/."
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model directory's own Python code to run (transformers trust_remote_code). "
        "Only for models whose code you have reviewed.",
    )
    adapter: S3Prefix | None = Field(
        default=None,
        description="S3 location of a LoRA adapter written by an earlier FinetuneJob on the same base "
        "(its model/ prefix): training continues that adapter on this job's data instead of starting a "
        "new one. Needs method lora or qlora with the adapter's r, alpha and target modules.",
    )


def _columns_rule() -> CelRule:
    by_format = " : ".join(
        f"self.format == '{fmt}' ? k in {list(cols)!r}" for fmt, cols in FORMAT_COLUMNS.items()
    )
    allowed = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    return CelRule(
        rule=f"!has(self.columns) || self.columns.all(k, {by_format} : false)",
        message=f"spec.dataset.columns may only rename the columns the format reads ({allowed})",
        field_path=".columns",
    )


class DatasetSpec(SpecModel):
    """Training (and optional evaluation) data and how to turn it into token sequences."""

    __cel_rules__ = (
        _immutable("dataset"),
        CelRule(
            rule="!(has(self.eval) && has(self.evalSplit))",
            message="spec.dataset.eval and spec.dataset.evalSplit are mutually exclusive: give an "
            "evaluation file or a fraction of the training data, not both",
            field_path=".evalSplit",
        ),
        _columns_rule(),
    )

    train: S3DataFile = Field(
        description="S3 object with the training data, JSON Lines (.jsonl) or Parquet (.parquet)."
    )
    eval: S3DataFile | None = Field(
        default=None,
        description="S3 object with evaluation data in the same format as train. Mutually exclusive with "
        "evalSplit.",
    )
    eval_split: Annotated[float, Field(gt=0, le=0.5)] | None = Field(
        default=None,
        description="Fraction of the training rows held out for evaluation (seeded, 0 < x <= 0.5). "
        "Mutually exclusive with eval.",
    )
    format: DatasetFormat = Field(
        default="chat",
        description="Row format. chat: a messages list of {role, content}; instruction: instruction, "
        "input and output (alpaca); completion: text; classification: text and label.",
    )
    columns: dict[str, Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=dict,
        max_length=8,
        description="Renames from the format's column names to the names in your data, e.g. "
        "{messages: conversations}.",
    )
    max_seq_length: Annotated[int, Field(ge=16, le=1_048_576)] = Field(
        default=2048, description="Longest token sequence; longer examples are truncated."
    )
    packing: bool = Field(
        default=False,
        description="Pack several short examples into each sequence of maxSeqLength tokens (faster on "
        "short data; loss stays on each example's own response, attention spans the packed sequence).",
    )


class LoraSpec(SpecModel):
    """Low-rank adapter settings (peft LoraConfig)."""

    r: Annotated[int, Field(ge=1, le=1024)] = Field(default=16, description="Rank of the adapter matrices.")
    alpha: Annotated[float, Field(gt=0, le=4096)] = Field(
        default=32, description="Scaling numerator: the update is scaled by alpha / r."
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.05, description="Dropout on the adapter input (0 <= dropout < 1)."
    )
    target_modules: list[ShortName] = Field(
        default_factory=list,
        max_length=64,
        description="Module names to adapt, e.g. [q_proj, v_proj]. Empty: every linear projection "
        "except the output head.",
    )


class FreezeSpec(SpecModel):
    """Partial fine-tuning: everything is frozen except the top blocks, the final norm and the head."""

    trainable_layers: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=2, description="Number of top transformer blocks that train."
    )


class MethodSpec(SpecModel):
    """Which parameters train."""

    __cel_rules__ = (
        _immutable("method"),
        CelRule(
            rule=f"!has(self.lora) || self.type in {list(ADAPTER_METHODS)!r}",
            message="spec.method.lora is only allowed when spec.method.type is lora or qlora",
            field_path=".lora",
        ),
        CelRule(
            rule="!has(self.freeze) || self.type == 'freeze'",
            message="spec.method.freeze is only allowed when spec.method.type is freeze",
            field_path=".freeze",
        ),
    )

    type: MethodType = Field(
        default="lora",
        description="full: every weight trains. lora: low-rank adapters (peft). qlora: lora on a 4-bit "
        "quantized base (bitsandbytes, needs GPUs). freeze: only the top blocks and the head train.",
    )
    lora: LoraSpec | None = Field(
        default=None, description="LoRA settings; only with type lora or qlora (defaults apply when omitted)."
    )
    freeze: FreezeSpec | None = Field(
        default=None, description="Freeze settings; only with type freeze (defaults apply when omitted)."
    )


class EarlyStoppingSpec(SpecModel):
    """Stop when the evaluation loss has not improved for a while."""

    patience: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=3, description="Evaluations without an improvement of the eval loss before training stops."
    )


class HyperparametersSpec(SpecModel):
    """Optimisation settings. Training length is epochs or maxSteps (neither: 1 epoch)."""

    __cel_rules__ = (
        CelRule(
            rule="!(has(self.epochs) && has(self.maxSteps))",
            message="spec.hyperparameters.epochs and spec.hyperparameters.maxSteps are mutually exclusive",
            field_path=".maxSteps",
        ),
    )

    epochs: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        default=None, description="Passes over the training data. Mutually exclusive with maxSteps."
    )
    max_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        default=None, description="Optimizer steps to train for. Mutually exclusive with epochs."
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] = Field(
        default=2.0e-4, description="Peak learning rate (0 < lr <= 1)."
    )
    batch_size_per_device: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=4, description="Sequences per device per micro-step."
    )
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=1,
        description="Micro-steps per optimizer step. Global batch = batchSizePerDevice x "
        "gradientAccumulationSteps x nodes x GPUs per node.",
    )
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.03, description="Fraction of the steps spent warming the learning rate up from 0."
    )
    weight_decay: Annotated[float, Field(ge=0, le=10)] = Field(default=0.0, description="AdamW weight decay.")
    lr_scheduler: LrScheduler = Field(default="cosine", description="Learning-rate decay after warmup.")
    precision: Precision = Field(
        default="bf16", description="Training precision: bf16 (Ampere and newer GPUs), fp16 or fp32."
    )
    gradient_checkpointing: bool = Field(
        default=True,
        description="Recompute activations in the backward pass: less memory, ~30% more compute.",
    )
    seed: Annotated[int, Field(ge=0, le=4_294_967_295)] = Field(
        default=42, description="Seed for weight init of adapters, data order and the evaluation split."
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop early on the eval loss; needs dataset.eval or dataset.evalSplit."
    )


class DeepSpeedSpec(SpecModel):
    """DeepSpeed ZeRO settings; the trainer generates the rest of the DeepSpeed configuration."""

    __cel_rules__ = (
        CelRule(
            rule="self.offload == 'none' || self.zeroStage >= 1",
            message="spec.deepspeed.offload cpu needs spec.deepspeed.zeroStage 1, 2 or 3",
            field_path=".offload",
        ),
    )

    zero_stage: Annotated[int, Field(ge=0, le=3)] = Field(
        default=2,
        description="ZeRO stage: 0 data parallel, 1 shards optimizer state, 2 also gradients, 3 also "
        "parameters.",
    )
    offload: Offload = Field(
        default="none", description="Offload optimizer state (and parameters at stage 3) to CPU memory."
    )
    config: FreeFormJson = Field(
        default_factory=dict,
        max_length=64,
        description="Raw DeepSpeed configuration keys merged last over the generated configuration, "
        "e.g. {zero_optimization: {overlap_comm: true}}; only the keys listed in docs/api.md (none that "
        "imports code, writes files or contradicts a spec field).",
    )

    @field_validator("config")
    @classmethod
    def _allowed_overrides(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Only documented DeepSpeed keys of the right type (deepspeed_overrides.py says why)."""
        issues = check_deepspeed_overrides(config, path="")
        if issues:
            problems = "; ".join(f"{path.lstrip('.')}: {message}" for path, message in issues)
            raise PydanticCustomError("deepspeed_config", "{problems}", {"problems": problems})
        return config


class Toleration(SpecModel):
    """A Kubernetes toleration (core/v1 Toleration), checked as Kubernetes checks a pod's."""

    __cel_rules__ = (
        CelRule(
            rule="self.operator != 'Exists' || self.value == ''",
            message="spec.resources.tolerations[].value must be empty when operator is Exists (Exists "
            "matches every value)",
            field_path=".value",
        ),
        CelRule(
            rule="!has(self.tolerationSeconds) || self.effect == 'NoExecute'",
            message="spec.resources.tolerations[].tolerationSeconds needs effect NoExecute (only "
            "NoExecute taints evict pods)",
            field_path=".tolerationSeconds",
        ),
        CelRule(
            rule="self.key != '' || self.operator == 'Exists'",
            message="spec.resources.tolerations[] with an empty key matches every taint and needs operator "
            "Exists",
            field_path=".operator",
        ),
        CelRule(
            rule=prefix_length_rule("self.key"),
            message="spec.resources.tolerations[].key has a prefix before '/' of at most 253 characters",
            field_path=".key",
        ),
    )

    key: Annotated[str, Field(max_length=MAX_QUALIFIED_NAME_LENGTH, pattern=QUALIFIED_NAME_OR_EMPTY)] = Field(
        default="", description="Taint key (a label key); empty matches all keys, with operator Exists."
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)] = Field(
        default="", description="Taint value for Equal (a label value); empty for Exists."
    )
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = Field(
        default="", description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: Annotated[int, Field(ge=0, le=MAX_DURATION_SECONDS)] | None = Field(
        default=None,
        description="How long a NoExecute taint is tolerated before the pod is evicted (only with effect "
        "NoExecute; at most 10 years).",
    )


class ResourcesSpec(SpecModel):
    """The gang: how many nodes, what each worker pod asks for and where it may run."""

    nodes: Annotated[int, Field(ge=1, le=MAX_NODES)] = Field(
        default=1, description="Worker pods, one per node; each runs gpusPerNode training processes."
    )
    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = Field(
        default=1,
        description="nvidia.com/gpu per worker pod and training processes per node. 0 trains on CPU "
        "with one process per node.",
    )
    cpu: Quantity | None = Field(default=None, description='CPU request per worker pod, e.g. "32".')
    memory: Quantity | None = Field(default=None, description="Memory request per worker pod, e.g. 512Gi.")
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels the worker pods require (label keys and values).",
        json_schema_extra={"x-kubernetes-validations": [map_keys_rule("spec.resources.nodeSelector")]},
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Taints the worker pods tolerate."
    )
    affinity: Affinity = Field(
        default_factory=dict,
        description="Pod affinity rules (core/v1 Affinity: nodeAffinity, podAffinity, podAntiAffinity), "
        "checked with Kubernetes' own schema for it.",
    )
    priority_class_name: DnsSubdomainOrEmpty = Field(default="", description="PriorityClass of the workers.")
    scheduler_name: DnsSubdomainOrEmpty = Field(
        default="",
        description="Scheduler for the workers, e.g. volcano or a coscheduling plugin for gang scheduling.",
    )
    service_account_name: DnsSubdomainOrEmpty = Field(
        default="",
        description="ServiceAccount of the workers, e.g. one bound to a cloud role for S3 (workload "
        "identity). The workers need no Kubernetes permissions.",
    )


class StorageSpec(SpecModel):
    """The S3-compatible object store holding the model, data and outputs."""

    endpoint: Annotated[
        str, Field(pattern=HTTP_URL_OR_EMPTY, max_length=512), UriRules((NO_CONTROL_CHARACTERS,))
    ] = Field(
        default="",
        description="S3 endpoint URL for MinIO, Ceph or any S3-compatible store; empty: AWS S3. No "
        "credentials in it (it is written to a ConfigMap): they go in credentialsSecret.",
    )
    region: Annotated[str, Field(pattern=REGION_OR_EMPTY, max_length=63)] = Field(
        default="", description="S3 region; empty: the environment's default."
    )
    credentials_secret: DnsSubdomainOrEmpty = Field(
        default="",
        description="Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
        "optionally AWS_SESSION_TOKEN). Empty: workload identity (e.g. IRSA via serviceAccountName).",
    )


class OutputSpec(SpecModel):
    """Where checkpoints and the fine-tuned model go."""

    uri: S3Prefix = Field(
        description="S3 prefix for checkpoints/, model/, metrics.json, config.json and README.md."
    )
    checkpoint_every_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = Field(
        default=500, description="Optimizer steps between checkpoints."
    )
    keep_checkpoints: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=3, description="Newest complete checkpoints kept in S3; older ones are deleted."
    )
    save_merged: bool = Field(
        default=False,
        description="For lora and qlora: also write the adapter merged into full weights to model/merged/.",
    )


class GenerationSpec(SpecModel):
    """Generation-based evaluation: answer accuracy on the evaluation rows."""

    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=32, description="Longest generated reply, in tokens (greedy decoding)."
    )
    match: AnswerMatch = Field(
        default="contains",
        description="contains: the reply contains the reference; exact: the reply is the reference. Both "
        "are compared after normalising case, whitespace and punctuation.",
    )


class GateSpec(SpecModel):
    """The final metric a job must reach to succeed."""

    __cel_rules__ = (
        CelRule(
            rule="has(self.min) != has(self.max)",
            message="spec.evaluation.gate needs exactly one of min and max",
        ),
    )

    metric: GateMetric = Field(
        description="The final metric to check: trainLoss, or with evaluation data evalLoss, perplexity or "
        "tokenAccuracy; classification data adds accuracy, precision, recall and f1; evaluation.generation "
        "adds answerAccuracy."
    )
    min: float | None = Field(default=None, description="Succeed only when metric >= min.")
    max: float | None = Field(default=None, description="Succeed only when metric <= max.")


class EvaluationSpec(SpecModel):
    """When evaluation runs (it needs dataset.eval or dataset.evalSplit), what it measures, and the gate a
    job must pass to succeed."""

    every_steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = Field(
        default=200,
        description="Optimizer steps between evaluations; one also runs before the first step (the base "
        "model) and one at the end.",
    )
    generation: GenerationSpec | None = Field(
        default=None,
        description="Also generate a reply to each evaluation row (chat and instruction data) and report "
        "answerAccuracy: the share of replies that match the row's reference reply (the last assistant "
        "turn, the output, or a reference column).",
    )
    gate: GateSpec | None = Field(
        default=None,
        description="At the end, the job is Succeeded only when this final metric holds; otherwise it is "
        "Failed with reason EvalGateNotMet and the model is written to <output>/rejected/ instead of "
        "<output>/model/.",
    )


class RunPolicySpec(SpecModel):
    """Retries, time limits, clean-up and suspension."""

    backoff_limit: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=3, description="Gang restarts after worker failures before the job is Failed."
    )
    active_deadline_seconds: Annotated[int, Field(ge=0, le=MAX_DURATION_SECONDS)] = Field(
        default=0,
        description="Seconds the job may run before it fails with DeadlineExceeded; 0: no limit. At most "
        "315360000 (10 years), so that the deadline is always a date.",
    )
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=MAX_DURATION_SECONDS)] = Field(
        default=0,
        description="Seconds after Succeeded or Failed before the job's pods, Service and ConfigMap are "
        "deleted (the FinetuneJob and its status stay); 0: keep them. At most 315360000 (10 years).",
    )
    suspend: bool = Field(
        default=False,
        description="true deletes the workers and keeps everything in S3; false resumes from the newest "
        "complete checkpoint. Queueing systems such as Kueue set this.",
    )
    stall_timeout_seconds: Annotated[int, Field(ge=0, le=7 * 24 * 3600)] = Field(
        default=0,
        description="Seconds without an optimizer step (or evaluation or checkpoint progress) after which "
        "every rank's stack is logged and the gang restarts with reason Stalled; 0: derived from the "
        "measured step time (ten times the slowest step, at least 10 minutes).",
    )
    non_finite_loss: Literal["fail", "restart"] = Field(
        default="fail",
        description="What a NaN or infinite training loss does (reason NonFiniteLoss; the newest good "
        "checkpoint is kept): fail the job, or restart the gang from the newest checkpoint.",
    )


class FinetuneJobSpec(SpecModel):
    """What to fine-tune, how, on what hardware and where the results go."""

    __cel_rules__ = (
        CelRule(
            rule="!has(self.hyperparameters.earlyStopping) || has(self.dataset.eval) || "
            "has(self.dataset.evalSplit)",
            message="spec.hyperparameters.earlyStopping needs evaluation data: set spec.dataset.eval or "
            "spec.dataset.evalSplit",
            field_path=".hyperparameters.earlyStopping",
        ),
        CelRule(
            rule="self.method.type != 'qlora' || self.resources.gpusPerNode >= 1",
            message="spec.method.type qlora needs GPUs: set spec.resources.gpusPerNode to 1 or more",
            field_path=".resources.gpusPerNode",
        ),
        CelRule(
            rule=f"!has(self.model.adapter) || self.method.type in {list(ADAPTER_METHODS)!r}",
            message="spec.model.adapter continues a LoRA adapter: it needs spec.method.type lora or qlora",
            field_path=".model.adapter",
        ),
        CelRule(
            rule="!has(self.evaluation.generation) || "
            "((has(self.dataset.eval) || has(self.dataset.evalSplit)) "
            f"&& self.dataset.format in {list(GENERATION_FORMATS)!r})",
            message="spec.evaluation.generation needs chat or instruction data (spec.dataset.format) and "
            "evaluation data (spec.dataset.eval or spec.dataset.evalSplit)",
            field_path=".evaluation.generation",
        ),
        CelRule(
            rule=f"!has(self.evaluation.gate) || self.evaluation.gate.metric in {list(TRAIN_METRICS)!r} || "
            "has(self.dataset.eval) || has(self.dataset.evalSplit)",
            message="spec.evaluation.gate.metric other than trainLoss needs evaluation data: set "
            "spec.dataset.eval or spec.dataset.evalSplit",
            field_path=".evaluation.gate.metric",
        ),
        CelRule(
            rule="!has(self.evaluation.gate) || "
            f"!(self.evaluation.gate.metric in {list(GENERATION_METRICS)!r}) || "
            "has(self.evaluation.generation)",
            message="spec.evaluation.gate.metric answerAccuracy needs spec.evaluation.generation",
            field_path=".evaluation.gate.metric",
        ),
        CelRule(
            rule="!has(self.evaluation.gate) || "
            f"!(self.evaluation.gate.metric in {list(CLASSIFICATION_METRICS)!r}) || "
            "self.dataset.format == 'classification'",
            message="spec.evaluation.gate.metric accuracy, precision, recall and f1 need "
            "spec.dataset.format classification",
            field_path=".evaluation.gate.metric",
        ),
        CelRule(
            rule=f"!self.output.saveMerged || self.method.type in {list(ADAPTER_METHODS)!r}",
            message="spec.output.saveMerged only applies to spec.method.type lora or qlora",
            field_path=".output.saveMerged",
        ),
        CelRule(
            # Kueue admits a suspended job by setting node selectors as it unsuspends it, and stops one
            # by suspending it and restoring them, in one update each.
            rule="oldSelf.runPolicy.suspend || self.runPolicy.suspend || self.resources == oldSelf.resources",
            message="spec.resources can only change while the job is suspended, or in the update that "
            "suspends it (spec.runPolicy.suspend: true)",
            field_path=".resources",
        ),
    )

    image: Annotated[str, Field(pattern=NO_WHITESPACE, max_length=512)] = Field(
        default="", description="Trainer image; empty: the operator's configured default."
    )
    model: ModelSpec = Field(description="The base model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training and evaluation data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="Which parameters train.")
    hyperparameters: HyperparametersSpec = Field(
        default_factory=HyperparametersSpec, description="Optimisation settings."
    )
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO settings.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Nodes, GPUs and pod placement of the workers."
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="The S3-compatible store.")
    output: OutputSpec = Field(description="Where checkpoints and the fine-tuned model go.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="When evaluation runs.")
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Retries, time limits, clean-up and suspension."
    )


Phase = Literal["Pending", "Initializing", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class StatusModel(BaseModel):
    """Status is written by the operator; unknown keys are kept rather than rejected."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, validate_by_name=True)


class Condition(StatusModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(
        description="Condition type: Running, Succeeded, Failed, Suspended, ChildrenDeleted, ReconcileError, "
        "MemoryFit (the GPU memory estimate per rank against one GPU's memory; False fails the job with "
        "InsufficientGPUMemory before any pod), and Stalled or NonFiniteLoss when the trainer reported one."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        description="CamelCase reason, e.g. Unschedulable, BackoffLimitExceeded or (Failed) EvalGateNotMet.",
    )
    message: str = Field(default="", description="Human-readable details.")
    last_transition_time: str = Field(default="", description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The generation this reflects.")


class WorkersStatus(StatusModel):
    """Worker pods of the current attempt."""

    total: int = Field(default=0, description="Worker pods the job needs.")
    ready: int = Field(default=0, description="Worker pods running.")


class ProgressStatus(StatusModel):
    """Training progress reported by global rank 0."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Optimizer steps planned.")
    epoch: float = Field(default=0, description="Epochs done (fractional).")
    percent: int = Field(default=0, description="step / totalSteps, in percent.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds to completion.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput, all ranks.")


class CheckpointStatus(StatusModel):
    """A complete checkpoint in S3."""

    step: int = Field(description="Optimizer step of the checkpoint.")
    uri: str = Field(description="S3 prefix of the checkpoint.")
    eval_loss: float | None = Field(default=None, description="Eval loss at that step, when evaluated.")
    time: str = Field(default="", description="When it was completed (RFC 3339).")


class FinetuneJobStatus(StatusModel):
    """What the operator observed; written only by the operator."""

    phase: Phase | None = Field(default=None, description="Lifecycle phase of the job.")
    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    conditions: list[Condition] = Field(default_factory=list, description="Current conditions.")
    start_time: str | None = Field(default=None, description="When the first worker started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job finished (RFC 3339).")
    restarts: int = Field(default=0, description="Gang restarts after worker failures.")
    workers: WorkersStatus | None = Field(default=None, description="Worker pods of the current attempt.")
    progress: ProgressStatus | None = Field(default=None, description="Training progress.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Latest metrics: trainLoss, evalLoss, perplexity, tokenAccuracy; classification adds "
        "accuracy, precision, recall and f1; evaluation.generation adds answerAccuracy. The final ones once "
        "the job has finished (also when an eval gate failed it).",
    )
    base_metrics: dict[str, float] = Field(
        default_factory=dict,
        description="The base model's evaluation metrics, before the first optimizer step (same names as "
        "metrics, without trainLoss): what the fine-tune is compared with.",
    )
    checkpoints: list[CheckpointStatus] = Field(default_factory=list, description="Complete checkpoints.")
    output_model: str = Field(
        default="",
        description="S3 location of the fine-tuned model once Succeeded (never set for a Failed job: a model "
        "an eval gate rejected is under <output>/rejected/).",
    )
    message: str = Field(default="", description="Why the job is in its phase, for people.")

    def to_api(self) -> dict[str, Any]:
        """The status as the API stores it: camelCase, only the fields read or set, None as absent (a
        default never written stays unwritten, so a status read back compares equal to the one sent)."""
        return self.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)


class ObjectMeta(BaseModel):
    """The parts of metadata a manifest sets; the API server validates the rest itself."""

    model_config = ConfigDict(extra="allow", strict=True)

    name: str | None = None
    generate_name: str | None = Field(default=None, alias="generateName")
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


_NAME_RULES = (
    CelRule(
        rule=f"!has(self.metadata.name) || self.metadata.name.matches('{DNS_1035_LABEL}')",
        message="metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with a "
        "letter and ending with a letter or digit",
        message_expression="'metadata.name \"' + self.metadata.name + '\" must be a DNS-1035 label: "
        "lowercase letters, digits and \\'-\\', starting with a letter and ending with a letter or digit'",
    ),
    CelRule(
        rule=f"!has(self.metadata.name) || size(self.metadata.name) <= {MAX_JOB_NAME_LENGTH}",
        message=f"metadata.name must be at most {MAX_JOB_NAME_LENGTH} characters so that the names of its "
        "worker pods stay within 63",
        # No string(size(...)) here: the API server estimates its cost beyond the budget and refuses
        # the CRD (kube-apiserver 1.36).
        message_expression="'metadata.name \"' + self.metadata.name + '\" is longer than "
        f"{MAX_JOB_NAME_LENGTH} characters, the most allowed so that the names of its worker pods stay "
        "within 63'",
    ),
)


class FinetuneJob(BaseModel):
    """A fine-tuning run, as users write it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    __cel_rules__: ClassVar[tuple[CelRule, ...]] = _NAME_RULES

    api_version: Literal[API_VERSION] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal[KIND] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FinetuneJobSpec
    status: FreeFormJson | None = Field(
        default=None, description="Written by the operator; ignored in manifests."
    )

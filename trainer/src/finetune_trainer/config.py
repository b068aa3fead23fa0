"""The worker contract: everything a trainer process needs, with every default already applied.

The operator resolves a FinetuneJob into this model and writes it as JSON into the job's ConfigMap;
``finetune run`` writes the same JSON for local ranks; the trainer reads it with
:func:`load_trainer_config`. It imports nothing heavier than pydantic so that the operator (which has
no torch) can build and validate it.

The FinetuneJob's CEL rules already hold each rule between fields for the API server; the validators here
re-check only the ones whose breach would start a wrong or hanging run (each says what it guards), so a
skewed operator or a hand-written config fails at load instead of mid-training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError, core_schema

CONFIG_SCHEMA_VERSION = 1

# An S3 bucket name as S3 defines it (general purpose buckets): dot-separated labels of lowercase letters,
# digits and '-', each starting and ending with a letter or digit, so no '..', '.-' or '-.'. The rules a
# regular expression without look-around cannot say (3-63 characters; not an IP address; no reserved
# prefix or suffix) are S3_BUCKET_RULES below, checked here and by the CRD's CEL rules alike.
S3_BUCKET = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
S3_PREFIX_PATTERN = rf"^s3://{S3_BUCKET}(/.*)?$"
S3_DATA_FILE_PATTERN = rf"^s3://{S3_BUCKET}/.+\.(jsonl|parquet)$"
# What the patterns say, in words, for error messages.
S3_BUCKET_WORDS = (
    "bucket: 3-63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit, "
    "no '..', '.-' or '-.', not an IP address, not starting with xn-- or sthree-, not ending in "
    "-s3alias or --ol-s3"
)


@dataclass(frozen=True)
class UriRule:
    """One rule on a URI string: ``pattern`` (RE2 syntax, the same in Python's ``re`` and in CEL's
    ``matches``) must match (``must_match``) or must not; ``words`` say what the rule wants."""

    pattern: str
    must_match: bool
    words: str

    def holds(self, text: str) -> bool:
        return (re.search(self.pattern, text) is not None) == self.must_match

    @property
    def cel(self) -> str:
        """The rule as a CEL expression on ``self`` (for the CRD's x-kubernetes-validations). Backslashes
        are escaped for the CEL string literal, except ``\\uXXXX``, which CEL itself turns into the
        character (RE2 has no ``\\u`` escape)."""
        literal = re.sub(r"\\(?!u[0-9a-f]{4})", r"\\\\", self.pattern).replace("'", "\\'")
        return f"self.matches('{literal}')" if self.must_match else f"!self.matches('{literal}')"


# C0 and C1 control characters and the bidirectional embeddings, overrides and isolates (U+202A-U+202E,
# U+2066-U+2069), which make a URI display as something other than what it is. Written as regular
# expression escapes of Python's re (the CEL rule hands U+202A and the like to RE2 as characters).
_CONTROL_OR_BIDI = r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
NO_CONTROL_CHARACTERS = UriRule(
    _CONTROL_OR_BIDI,
    False,
    "must not contain control characters or bidirectional overrides (U+202A-U+202E, U+2066-U+2069)",
)
S3_BUCKET_RULES = (
    UriRule(r"^s3://[^/]{3,63}(/|$)", True, "the bucket name must be 3 to 63 characters long"),
    UriRule(
        r"^s3://[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+(/|$)",
        False,
        "the bucket name must not be an IP address such as 192.168.5.4",
    ),
    UriRule(r"^s3://(xn--|sthree-)", False, "the bucket name must not start with xn-- or sthree- (reserved)"),
    UriRule(
        r"^s3://[^/]*(-s3alias|--ol-s3)(/|$)",
        False,
        "the bucket name must not end in -s3alias or --ol-s3 (reserved for access point aliases)",
    ),
)


@dataclass(frozen=True)
class UriRules:
    """``Annotated`` metadata: the rules a URI string obeys besides its pattern. pydantic checks them
    here; the operator's CRD generator turns each into a CEL rule, so the API server checks them too."""

    rules: tuple[UriRule, ...]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> Any:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def _check(self, text: str) -> str:
        for rule in self.rules:
            if not rule.holds(text):
                raise PydanticCustomError("uri_rule", "{words}", {"words": rule.words})
        return text


S3_URI_RULES = UriRules((NO_CONTROL_CHARACTERS, *S3_BUCKET_RULES))

S3Prefix = Annotated[str, Field(pattern=S3_PREFIX_PATTERN, max_length=1024), S3_URI_RULES]
S3DataFile = Annotated[str, Field(pattern=S3_DATA_FILE_PATTERN, max_length=1024), S3_URI_RULES]

DatasetFormat = Literal["chat", "instruction", "completion", "classification"]
MethodType = Literal["full", "lora", "qlora", "freeze"]
LrScheduler = Literal["cosine", "linear", "constant"]
Precision = Literal["bf16", "fp16", "fp32"]
Offload = Literal["none", "cpu"]
# What a loss that is NaN or infinite does: fail the job (a restart would diverge the same way from the
# same checkpoint) or restart the gang from the newest checkpoint (for runs that diverge by chance).
NonFiniteLossPolicy = Literal["fail", "restart"]

# The methods that train adapters (and so have lora settings); the CRD's CEL rules are written from it.
ADAPTER_METHODS: tuple[MethodType, ...] = ("lora", "qlora")

# The columns each dataset format reads, in its canonical names (``dataset.columns`` renames them).
# ``reference`` (optional) is the answer generation-based evaluation compares a reply with; without it,
# the last assistant turn or the output.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "chat": ("messages", "reference"),
    "instruction": ("instruction", "input", "output", "reference"),
    "completion": ("text",),
    "classification": ("text", "label"),
}

# The metrics an evaluation reports, by what produces them: the trainer's evaluation writes these names, the
# eval gate may test any of them that the job produces (metrics_produced), and the CRD's rules say so.
TRAIN_METRICS = ("trainLoss",)
LANGUAGE_MODEL_METRICS = ("evalLoss", "perplexity", "tokenAccuracy")
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")
GENERATION_METRICS = ("answerAccuracy",)
GATE_METRICS = (*TRAIN_METRICS, *LANGUAGE_MODEL_METRICS, *CLASSIFICATION_METRICS, *GENERATION_METRICS)
GateMetric = Literal[GATE_METRICS]  # a tuple subscript is the Literal of its items
# Generation-based evaluation compares a reply with a reference reply: formats that have one.
GENERATION_FORMATS: tuple[DatasetFormat, ...] = ("chat", "instruction")
# How a generated reply is compared with the reference, both normalised (case, whitespace, punctuation).
AnswerMatch = Literal["contains", "exact"]


def metrics_produced(dataset_format: str, has_eval: bool, generation: bool) -> tuple[str, ...]:
    """The metric names a run's final metrics hold (what an eval gate may test)."""
    if not has_eval:
        return TRAIN_METRICS
    produced = (*TRAIN_METRICS, *LANGUAGE_MODEL_METRICS)
    if dataset_format == "classification":
        produced += CLASSIFICATION_METRICS
    if generation:
        produced += GENERATION_METRICS
    return produced


# The port on global rank 0 that serves /progress and /metrics to the operator.
PROGRESS_PORT = 29600
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"


class ContractModel(BaseModel):
    """Strict, immutable, camelCase JSON: the same spelling as the FinetuneJob fields it comes from."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, validate_by_name=True, validate_by_alias=True
    )


class JobIdentity(ContractModel):
    name: str
    namespace: str


class ModelSource(ContractModel):
    uri: S3Prefix
    trust_remote_code: bool
    # A LoRA adapter written by an earlier job on the same base: training continues it.
    adapter: S3Prefix | None = None


class DatasetConfig(ContractModel):
    train: S3DataFile
    eval: S3DataFile | None
    eval_split: Annotated[float, Field(gt=0, le=0.5)] | None
    format: DatasetFormat
    columns: dict[str, str]
    max_seq_length: Annotated[int, Field(ge=16)]
    packing: bool

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetConfig:
        # Guards the data loader: with both it would have to pick one evaluation set silently.
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("eval and evalSplit are mutually exclusive")
        return self

    @property
    def has_eval(self) -> bool:
        return self.eval is not None or self.eval_split is not None


class LoraConfig(ContractModel):
    r: Annotated[int, Field(ge=1)]
    alpha: Annotated[float, Field(gt=0)]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    # "all-linear" (peft's spelling) when the user named no modules: every linear projection but the head.
    target_modules: list[str] | Literal["all-linear"]


class FreezeConfig(ContractModel):
    trainable_layers: Annotated[int, Field(ge=1)]


class MethodConfig(ContractModel):
    type: MethodType
    lora: LoraConfig | None
    freeze: FreezeConfig | None

    @model_validator(mode="after")
    def _settings_match_type(self) -> MethodConfig:
        # Guards model setup: it reads the settings of the method it builds and would fail on None.
        if (self.lora is not None) != (self.type in ADAPTER_METHODS):
            raise ValueError("lora settings are present exactly when the method is lora or qlora")
        if (self.freeze is not None) != (self.type == "freeze"):
            raise ValueError("freeze settings are present exactly when the method is freeze")
        return self


class HyperparametersConfig(ContractModel):
    epochs: Annotated[int, Field(ge=1)] | None
    max_steps: Annotated[int, Field(ge=1)] | None
    learning_rate: Annotated[float, Field(gt=0, le=1)]
    batch_size_per_device: Annotated[int, Field(ge=1)]
    gradient_accumulation_steps: Annotated[int, Field(ge=1)]
    warmup_ratio: Annotated[float, Field(ge=0, le=1)]
    weight_decay: Annotated[float, Field(ge=0)]
    lr_scheduler: LrScheduler
    precision: Precision
    gradient_checkpointing: bool
    gradient_clipping: Annotated[float, Field(ge=0)]
    seed: Annotated[int, Field(ge=0)]
    early_stopping_patience: Annotated[int, Field(ge=1)] | None

    @model_validator(mode="after")
    def _exactly_one_length(self) -> HyperparametersConfig:
        # Guards the schedule: the total step count comes from exactly one of the two.
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("exactly one of epochs and maxSteps is set")
        return self


class DeepSpeedSettings(ContractModel):
    zero_stage: Annotated[int, Field(ge=0, le=3)]
    offload: Offload
    # Raw DeepSpeed configuration keys, merged last over the generated configuration.
    overrides: dict[str, Any]


class S3StorageConfig(ContractModel):
    """Where S3 is; credentials never travel in the config (environment or workload identity)."""

    kind: Literal["s3"] = "s3"
    endpoint: str | None
    region: str | None


class FolderStorageConfig(ContractModel):
    """A folder as the store (``finetune run --store DIR``): s3://bucket/key is the file root/bucket/key.

    Local runs only: the operator never writes it, since pods share no folder.
    """

    kind: Literal["folder"]
    root: str

    @field_validator("root")
    @classmethod
    def _absolute(cls, root: str) -> str:
        # Ranks start in other working directories: a relative root would name another folder in each.
        if not Path(root).is_absolute():
            raise ValueError(f"storage.root must be an absolute path, not {root!r}")
        return root


def _storage_kind(document: Any) -> str:
    """Contracts written before the folder store carry no kind: they are S3."""
    if isinstance(document, dict):
        return document.get("kind", "s3")
    return getattr(document, "kind", "s3")


# Which store a worker reads from and writes to; the operator always writes S3.
StorageConfig = Annotated[
    Annotated[S3StorageConfig, Tag("s3")] | Annotated[FolderStorageConfig, Tag("folder")],
    Discriminator(_storage_kind),
]


class OutputConfig(ContractModel):
    uri: S3Prefix
    checkpoint_every_steps: Annotated[int, Field(ge=1)]
    keep_checkpoints: Annotated[int, Field(ge=1)]
    save_merged: bool


class GenerationConfig(ContractModel):
    """Generation-based evaluation: a greedy reply to each eval prompt, compared with its reference."""

    max_new_tokens: Annotated[int, Field(ge=1, le=4096)]
    match: AnswerMatch


class GateConfig(ContractModel):
    """The final metric the job must reach to succeed; otherwise the model goes to ``rejected/``."""

    metric: GateMetric
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> GateConfig:
        # Guards the final check: with neither bound every model would pass, with both it is ambiguous.
        if (self.min is None) == (self.max is None):
            raise ValueError("an eval gate has exactly one of min and max")
        return self

    def holds(self, value: float) -> bool:
        if self.min is not None:
            return value >= self.min
        assert self.max is not None
        return value <= self.max

    def words(self) -> str:
        """The threshold as people read it, e.g. ``answerAccuracy >= 0.8``."""
        return f"{self.metric} >= {self.min:g}" if self.min is not None else f"{self.metric} <= {self.max:g}"


class EvaluationConfig(ContractModel):
    # None when the job has no evaluation data: then no evaluation runs.
    every_steps: Annotated[int, Field(ge=1)] | None
    generation: GenerationConfig | None = None
    gate: GateConfig | None = None


class DistributedConfig(ContractModel):
    """The shape of the gang; the launcher passes ranks and the rendezvous address in the environment."""

    nodes: Annotated[int, Field(ge=1)]
    processes_per_node: Annotated[int, Field(ge=1)]
    uses_gpus: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


class RunPolicyConfig(ContractModel):
    """How a rank decides that its run is broken rather than slow."""

    # No optimizer step for this long: every rank's stack goes to its log and the run exits retryable
    # (reason Stalled). None: derived from the measured step time (see finetune_trainer.gang).
    stall_timeout_seconds: Annotated[int, Field(ge=1)] | None
    non_finite_loss: NonFiniteLossPolicy


class ReportingConfig(ContractModel):
    progress_port: Annotated[int, Field(ge=1, le=65535)]
    termination_message_path: str


class TrainerConfig(ContractModel):
    """The resolved configuration of one fine-tuning run."""

    schema_version: Literal[1] = CONFIG_SCHEMA_VERSION
    job: JobIdentity
    model: ModelSource
    dataset: DatasetConfig
    method: MethodConfig
    hyperparameters: HyperparametersConfig
    deepspeed: DeepSpeedSettings
    distributed: DistributedConfig
    storage: StorageConfig
    output: OutputConfig
    evaluation: EvaluationConfig
    run_policy: RunPolicyConfig
    reporting: ReportingConfig

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainerConfig:
        # Guards against a run that fails after loading the model (qlora on CPU), or never stops early
        # because no evaluation loss ever arrives.
        if self.method.type == "qlora" and not self.distributed.uses_gpus:
            raise ValueError("qlora needs GPUs (4-bit bitsandbytes kernels have no CPU implementation)")
        if self.hyperparameters.early_stopping_patience is not None and not self.dataset.has_eval:
            raise ValueError("early stopping needs evaluation data (dataset.eval or dataset.evalSplit)")
        # Guards a run that would train for hours and then fail on a metric it never computes.
        evaluation = self.evaluation
        if evaluation.generation is not None and (
            self.dataset.format not in GENERATION_FORMATS or not self.dataset.has_eval
        ):
            raise ValueError("evaluation.generation needs chat or instruction data and evaluation data")
        generates = evaluation.generation is not None
        produced = metrics_produced(self.dataset.format, self.dataset.has_eval, generates)
        if evaluation.gate is not None and evaluation.gate.metric not in produced:
            raise ValueError(
                f"evaluation.gate.metric {evaluation.gate.metric} is not produced by this job; it produces "
                f"{', '.join(produced)}"
            )
        if self.model.adapter is not None and self.method.type not in ADAPTER_METHODS:
            raise ValueError("model.adapter continues a LoRA adapter: it needs method lora or qlora")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def load_trainer_config(path: str | Path) -> TrainerConfig:
    """Reads and validates the JSON the operator (or ``finetune run``) wrote."""
    return TrainerConfig.model_validate(json.loads(Path(path).read_text()))

"""The CEL rules of the committed CRD (crds/finetunejob.yaml), proven against accepted and rejected objects.

The rules are read from the CRD file itself, not from spec.py, so that what is tested is exactly what the
API server will enforce. Every object is a full FinetuneJob with its defaults applied, as the API server
evaluates it. ``CASES`` is the heart: each row names the rule it is about, describes the object (or the
old/new pair of an update) and lists the rules it violates. ``test_every_rule_is_covered`` fails when a
rule in the CRD has no rejected and no accepted case, so a new rule cannot ship untested.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from finetune_operator.api.cel import RuleViolation, evaluate_rules
from finetune_operator.api.spec import FinetuneJob
from finetune_operator.api.validation import defaulted

REPO = Path(__file__).resolve().parents[1]
CRD_PATH = REPO / "crds" / "finetunejob.yaml"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

CRD_TEXT = CRD_PATH.read_text()
SCHEMA: dict[str, Any] = yaml.safe_load(CRD_TEXT)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

ANY = "*"  # a location part standing for any map key or list index


# --- The rules, as the CRD file has them ------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry of the CRD and where it sits in the schema."""

    location: tuple[str, ...]  # the object the rule is declared on; () is the root
    rule: str
    field_path: tuple[str, ...] = ()
    message: str = ""
    message_expression: str = ""

    @property
    def reported_path(self) -> tuple[str, ...]:
        """Where a violation is reported: the rule's location plus its fieldPath."""
        return self.location + self.field_path

    @property
    def is_transition(self) -> bool:
        return "oldSelf" in self.rule

    def __str__(self) -> str:
        return f"{'.'.join(self.location) or '<root>'}: {self.rule}"


def _collect_rules(node: Any, location: tuple[str, ...] = ()) -> Iterator[Rule]:
    """Every rule anywhere in a schema: under properties, additionalProperties, items, anyOf, allOf, ..."""
    if isinstance(node, list):
        for item in node:
            yield from _collect_rules(item, location)
        return
    if not isinstance(node, dict):
        return
    for entry in node.get("x-kubernetes-validations", []):
        yield Rule(
            location=location,
            rule=entry["rule"],
            field_path=tuple(part for part in entry.get("fieldPath", "").split(".") if part),
            message=entry.get("message", ""),
            message_expression=entry.get("messageExpression", ""),
        )
    for key, child in node.items():
        if key == "properties":
            for name, property_schema in child.items():
                yield from _collect_rules(property_schema, (*location, name))
        elif key in ("additionalProperties", "items"):
            yield from _collect_rules(child, (*location, ANY))
        elif key not in ("x-kubernetes-validations", "default", "example", "enum"):
            yield from _collect_rules(child, location)


ALL_RULES: tuple[Rule, ...] = tuple(_collect_rules(SCHEMA))


def _rule(location: str, containing: str) -> Rule:
    """The one rule declared at ``location`` (dotted; "" for the root) whose text contains ``containing``."""
    where = tuple(part for part in location.split(".") if part)
    found = [r for r in ALL_RULES if r.location == where and containing in r.rule]
    assert len(found) == 1, f"expected one rule at {location!r} containing {containing!r}, found {found}"
    return found[0]


NAME_FORMAT = _rule("", "matches(")
NAME_LENGTH = _rule("", "size(")
EARLY_STOPPING_NEEDS_EVAL = _rule("spec", "earlyStopping")
QLORA_NEEDS_GPUS = _rule("spec", "gpusPerNode")
SAVE_MERGED_ONLY_ADAPTERS = _rule("spec", "saveMerged")
RESOURCES_WHILE_SUSPENDED = _rule("spec", "oldSelf")
MODEL_IMMUTABLE = _rule("spec.model", "oldSelf")
DATASET_IMMUTABLE = _rule("spec.dataset", "oldSelf")
EVAL_XOR_EVAL_SPLIT = _rule("spec.dataset", "evalSplit")
COLUMNS_OF_FORMAT = _rule("spec.dataset", "columns")
METHOD_IMMUTABLE = _rule("spec.method", "oldSelf")
LORA_ONLY_LORA_QLORA = _rule("spec.method", "has(self.lora)")
FREEZE_ONLY_FREEZE = _rule("spec.method", "has(self.freeze)")
EPOCHS_XOR_MAX_STEPS = _rule("spec.hyperparameters", "maxSteps")
OFFLOAD_NEEDS_ZERO = _rule("spec.deepspeed", "offload")
ADAPTER_NEEDS_LORA = _rule("spec", "has(self.model.adapter)")
GENERATION_NEEDS_EVAL_AND_REPLIES = _rule("spec", "!has(self.evaluation.generation)")
GATE_METRIC_NEEDS_EVAL = _rule("spec", "['trainLoss']")
GATE_ANSWER_ACCURACY_NEEDS_GENERATION = _rule("spec", "['answerAccuracy']")
GATE_CLASSIFICATION_METRIC_NEEDS_CLASSIFICATION = _rule("spec", "['accuracy', 'precision'")
GATE_ONE_BOUND = _rule("spec.evaluation.gate", "has(self.min)")
GATE_RULES = (
    GATE_METRIC_NEEDS_EVAL,
    GATE_ANSWER_ACCURACY_NEEDS_GENERATION,
    GATE_CLASSIFICATION_METRIC_NEEDS_CLASSIFICATION,
    GATE_ONE_BOUND,
)

IMMUTABLE = (MODEL_IMMUTABLE, DATASET_IMMUTABLE, METHOD_IMMUTABLE)
TRANSITION_RULES = (*IMMUTABLE, RESOURCES_WHILE_SUSPENDED)


# --- Objects ----------------------------------------------------------------------------------------

BASE_MANIFEST: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FinetuneJob",
    "metadata": {"name": "demo-job", "namespace": "ml-team"},
    "spec": {
        "model": {"uri": "s3://models/llama-3.1-8b/"},
        "dataset": {"train": "s3://datasets/demo/train.jsonl"},
        "output": {"uri": "s3://checkpoints/demo-job/"},
    },
}
EVAL_FILE = "s3://datasets/demo/eval.jsonl"
ADAPTER = "s3://checkpoints/earlier-job/model/"

# Edits used by several cases (paths are under spec).
SUSPENDED = {"runPolicy.suspend": True}
RUNNING = {"runPolicy.suspend": False}
ON_A100_POOL = {"resources.nodeSelector": {"cloud.example.com/pool": "a100"}}
# A core/v1 Affinity that requires nodes of a pool.
POOL_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a100"]}]}
            ]
        }
    }
}


def _apply(spec: dict[str, Any], edits: tuple[dict[str, Any], ...]) -> None:
    for edit in edits:
        for dotted_path, value in edit.items():
            *parents, leaf = dotted_path.split(".")
            target = spec
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = copy.deepcopy(value)


def job(*edits: dict[str, Any], name: str = "demo-job", metadata: dict[str, Any] | None = None) -> dict:
    """The base manifest with ``edits`` ({"dataset.evalSplit": 0.1}: paths under spec), defaulted."""
    document = copy.deepcopy(BASE_MANIFEST)
    document["metadata"] = metadata if metadata is not None else {"name": name, "namespace": "ml-team"}
    _apply(document["spec"], edits)
    return defaulted(FinetuneJob.model_validate(document))


def raw(*edits: dict[str, Any]) -> dict:
    """For objects pydantic would reject: the defaulted base object with ``edits`` applied unchecked."""
    document = job()
    _apply(document["spec"], edits)
    return document


def _as_stored_by_the_api_server(obj: dict[str, Any]) -> dict[str, Any]:
    """JSON from the API server carries 32 for a number field that pydantic dumps as 32.0."""
    obj["spec"]["method"]["lora"]["alpha"] = 32
    return obj


def case(about: Rule | tuple[Rule, ...], description: str, obj: Any, violated: set[Rule], id: str) -> Any:
    """One row: the rule(s) the case is about, what it is, the object (or an (old, new) update)
    and the set of rules it violates (empty: accepted)."""
    about = about if isinstance(about, tuple) else (about,)
    return pytest.param(about, description, obj, violated, id=id)


NONE: set[Rule] = set()

CASES = [
    # metadata.name: a DNS-1035 label of at most 52 characters (so worker pod names stay within 63).
    case(NAME_FORMAT, "one letter", job(name="a"), NONE, id="name-one-letter"),
    case(NAME_FORMAT, "letters, digits and dashes", job(name="llama-3-sft-2"), NONE, id="name-dns-label"),
    case(NAME_FORMAT, "starts with a digit", job(name="9lives"), {NAME_FORMAT}, id="name-leading-digit"),
    case(NAME_FORMAT, "starts with a dash", job(name="-demo"), {NAME_FORMAT}, id="name-leading-dash"),
    case(NAME_FORMAT, "ends with a dash", job(name="demo-"), {NAME_FORMAT}, id="name-trailing-dash"),
    case(NAME_FORMAT, "upper case", job(name="Demo-job"), {NAME_FORMAT}, id="name-upper-case"),
    case(NAME_FORMAT, "a dot (subdomain, not label)", job(name="demo.job"), {NAME_FORMAT}, id="name-dot"),
    case(NAME_FORMAT, "an underscore", job(name="demo_job"), {NAME_FORMAT}, id="name-underscore"),
    case(NAME_FORMAT, "a trailing newline", job(name="demo\n"), {NAME_FORMAT}, id="name-newline"),
    case(NAME_LENGTH, "exactly 52 characters", job(name="a" * 52), NONE, id="name-52-chars"),
    case(NAME_LENGTH, "53 characters", job(name="a" * 53), {NAME_LENGTH}, id="name-53-chars"),
    case(
        (NAME_FORMAT, NAME_LENGTH),
        "generateName only: no name to check",
        job(metadata={"generateName": "demo-"}),
        NONE,
        id="name-absent-generate-name",
    ),
    case(
        (NAME_FORMAT, NAME_LENGTH),
        "53 characters ending with a dash",
        job(name="a" * 52 + "-"),
        {NAME_FORMAT, NAME_LENGTH},
        id="name-53-chars-trailing-dash",
    ),
    # spec: earlyStopping needs evaluation data.
    case(
        EARLY_STOPPING_NEEDS_EVAL,
        "earlyStopping without eval data",
        job({"hyperparameters.earlyStopping": {}}),
        {EARLY_STOPPING_NEEDS_EVAL},
        id="early-stopping-no-eval",
    ),
    case(
        EARLY_STOPPING_NEEDS_EVAL,
        "earlyStopping with evalSplit",
        job({"hyperparameters.earlyStopping": {"patience": 5}, "dataset.evalSplit": 0.1}),
        NONE,
        id="early-stopping-eval-split",
    ),
    case(
        EARLY_STOPPING_NEEDS_EVAL,
        "earlyStopping with an eval file",
        job({"hyperparameters.earlyStopping": {}, "dataset.eval": EVAL_FILE}),
        NONE,
        id="early-stopping-eval-file",
    ),
    # spec: qlora needs GPUs.
    case(
        QLORA_NEEDS_GPUS,
        "qlora on CPU",
        job({"method.type": "qlora", "resources.gpusPerNode": 0}),
        {QLORA_NEEDS_GPUS},
        id="qlora-0-gpus",
    ),
    case(
        QLORA_NEEDS_GPUS,
        "qlora with one GPU per node",
        job({"method.type": "qlora", "resources.gpusPerNode": 1}),
        NONE,
        id="qlora-1-gpu",
    ),
    case(
        QLORA_NEEDS_GPUS,
        "lora on CPU",
        job({"method.type": "lora", "resources.gpusPerNode": 0}),
        NONE,
        id="lora-0-gpus",
    ),
    # spec: saveMerged only for lora and qlora.
    case(
        SAVE_MERGED_ONLY_ADAPTERS,
        "saveMerged with lora",
        job({"output.saveMerged": True}),
        NONE,
        id="save-merged-lora",
    ),
    case(
        SAVE_MERGED_ONLY_ADAPTERS,
        "saveMerged with qlora",
        job({"output.saveMerged": True, "method.type": "qlora"}),
        NONE,
        id="save-merged-qlora",
    ),
    case(
        SAVE_MERGED_ONLY_ADAPTERS,
        "saveMerged with full",
        job({"output.saveMerged": True, "method.type": "full"}),
        {SAVE_MERGED_ONLY_ADAPTERS},
        id="save-merged-full",
    ),
    case(
        SAVE_MERGED_ONLY_ADAPTERS,
        "saveMerged with freeze",
        job({"output.saveMerged": True, "method.type": "freeze"}),
        {SAVE_MERGED_ONLY_ADAPTERS},
        id="save-merged-freeze",
    ),
    case(
        SAVE_MERGED_ONLY_ADAPTERS,
        "saveMerged false with full",
        job({"output.saveMerged": False, "method.type": "full"}),
        NONE,
        id="no-save-merged-full",
    ),
    # spec.dataset: eval and evalSplit are mutually exclusive.
    case(
        EVAL_XOR_EVAL_SPLIT,
        "evalSplit alone",
        job({"dataset.evalSplit": 0.5}),
        NONE,
        id="eval-split-alone",
    ),
    case(EVAL_XOR_EVAL_SPLIT, "eval alone", job({"dataset.eval": EVAL_FILE}), NONE, id="eval-alone"),
    case(EVAL_XOR_EVAL_SPLIT, "no evaluation data", job(), NONE, id="no-eval"),
    case(
        EVAL_XOR_EVAL_SPLIT,
        "eval and evalSplit",
        job({"dataset.eval": EVAL_FILE, "dataset.evalSplit": 0.1}),
        {EVAL_XOR_EVAL_SPLIT},
        id="eval-and-eval-split",
    ),
    # spec.dataset: columns may only rename what the format reads.
    case(COLUMNS_OF_FORMAT, "no renames", job({"dataset.columns": {}}), NONE, id="columns-empty"),
    case(
        COLUMNS_OF_FORMAT,
        "chat: messages",
        job({"dataset.columns": {"messages": "conversation"}}),
        NONE,
        id="columns-chat-messages",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "chat: label",
        job({"dataset.columns": {"label": "queue"}}),
        {COLUMNS_OF_FORMAT},
        id="columns-chat-label",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "classification: text and label",
        job({"dataset.format": "classification", "dataset.columns": {"text": "body", "label": "queue"}}),
        NONE,
        id="columns-classification-label",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "classification: messages",
        job({"dataset.format": "classification", "dataset.columns": {"messages": "chat"}}),
        {COLUMNS_OF_FORMAT},
        id="columns-classification-messages",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "instruction: instruction, input and output",
        job(
            {
                "dataset.format": "instruction",
                "dataset.columns": {"instruction": "q", "input": "ctx", "output": "a"},
            }
        ),
        NONE,
        id="columns-instruction-all",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "instruction: one allowed and one unknown",
        job({"dataset.format": "instruction", "dataset.columns": {"output": "a", "prompt": "q"}}),
        {COLUMNS_OF_FORMAT},
        id="columns-instruction-unknown",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "completion: text",
        job({"dataset.format": "completion", "dataset.columns": {"text": "body"}}),
        NONE,
        id="columns-completion-text",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "completion: input",
        job({"dataset.format": "completion", "dataset.columns": {"input": "body"}}),
        {COLUMNS_OF_FORMAT},
        id="columns-completion-input",
    ),
    case(
        COLUMNS_OF_FORMAT,
        "a format the rule does not know (the enum rejects it too): no column allowed",
        raw({"dataset.format": "tabular", "dataset.columns": {"text": "body"}}),
        {COLUMNS_OF_FORMAT},
        id="columns-unknown-format",
    ),
    # spec.method: lora settings only with lora or qlora, freeze settings only with freeze.
    case(
        LORA_ONLY_LORA_QLORA,
        "lora settings with lora",
        job({"method.lora": {"r": 8}}),
        NONE,
        id="lora-settings-lora",
    ),
    case(
        LORA_ONLY_LORA_QLORA,
        "lora settings with qlora",
        job({"method.type": "qlora", "method.lora": {}}),
        NONE,
        id="lora-settings-qlora",
    ),
    case(
        LORA_ONLY_LORA_QLORA,
        "lora settings with full",
        job({"method.type": "full", "method.lora": {}}),
        {LORA_ONLY_LORA_QLORA},
        id="lora-settings-full",
    ),
    case(
        (LORA_ONLY_LORA_QLORA, FREEZE_ONLY_FREEZE),
        "lora settings with freeze",
        job({"method.type": "freeze", "method.lora": {}}),
        {LORA_ONLY_LORA_QLORA},
        id="lora-settings-freeze",
    ),
    case(
        FREEZE_ONLY_FREEZE,
        "freeze settings with freeze",
        job({"method.type": "freeze", "method.freeze": {"trainableLayers": 4}}),
        NONE,
        id="freeze-settings-freeze",
    ),
    case(
        (FREEZE_ONLY_FREEZE, LORA_ONLY_LORA_QLORA),
        "freeze settings with lora",
        job({"method.type": "lora", "method.freeze": {}}),
        {FREEZE_ONLY_FREEZE},
        id="freeze-settings-lora",
    ),
    case(
        (FREEZE_ONLY_FREEZE, LORA_ONLY_LORA_QLORA),
        "lora and freeze settings with full",
        job({"method.type": "full", "method.lora": {}, "method.freeze": {}}),
        {LORA_ONLY_LORA_QLORA, FREEZE_ONLY_FREEZE},
        id="lora-and-freeze-settings-full",
    ),
    # spec.hyperparameters: epochs or maxSteps.
    case(EPOCHS_XOR_MAX_STEPS, "neither", job(), NONE, id="no-epochs-no-max-steps"),
    case(EPOCHS_XOR_MAX_STEPS, "epochs", job({"hyperparameters.epochs": 3}), NONE, id="epochs"),
    case(EPOCHS_XOR_MAX_STEPS, "maxSteps", job({"hyperparameters.maxSteps": 1000}), NONE, id="max-steps"),
    case(
        EPOCHS_XOR_MAX_STEPS,
        "epochs and maxSteps",
        job({"hyperparameters.epochs": 1, "hyperparameters.maxSteps": 1000}),
        {EPOCHS_XOR_MAX_STEPS},
        id="epochs-and-max-steps",
    ),
    # spec.deepspeed: offload cpu needs ZeRO stage 1 or more.
    case(
        OFFLOAD_NEEDS_ZERO,
        "offload cpu with ZeRO stage 0",
        job({"deepspeed.offload": "cpu", "deepspeed.zeroStage": 0}),
        {OFFLOAD_NEEDS_ZERO},
        id="offload-cpu-zero-0",
    ),
    case(
        OFFLOAD_NEEDS_ZERO,
        "offload cpu with ZeRO stage 1",
        job({"deepspeed.offload": "cpu", "deepspeed.zeroStage": 1}),
        NONE,
        id="offload-cpu-zero-1",
    ),
    case(
        OFFLOAD_NEEDS_ZERO,
        "offload cpu with the default ZeRO stage",
        job({"deepspeed.offload": "cpu"}),
        NONE,
        id="offload-cpu-zero-default",
    ),
    case(
        OFFLOAD_NEEDS_ZERO,
        "no offload with ZeRO stage 0",
        job({"deepspeed.offload": "none", "deepspeed.zeroStage": 0}),
        NONE,
        id="offload-none-zero-0",
    ),
    # spec.model.adapter continues a LoRA adapter: only with lora or qlora.
    case(ADAPTER_NEEDS_LORA, "adapter with lora", job({"model.adapter": ADAPTER}), NONE, id="adapter-lora"),
    case(
        ADAPTER_NEEDS_LORA,
        "adapter with qlora",
        job({"model.adapter": ADAPTER, "method.type": "qlora", "resources.gpusPerNode": 1}),
        NONE,
        id="adapter-qlora",
    ),
    case(
        ADAPTER_NEEDS_LORA,
        "adapter with full",
        job({"model.adapter": ADAPTER, "method.type": "full"}),
        {ADAPTER_NEEDS_LORA},
        id="adapter-full",
    ),
    case(
        ADAPTER_NEEDS_LORA,
        "adapter with freeze",
        job({"model.adapter": ADAPTER, "method.type": "freeze"}),
        {ADAPTER_NEEDS_LORA},
        id="adapter-freeze",
    ),
    case(
        ADAPTER_NEEDS_LORA, "no adapter with full", job({"method.type": "full"}), NONE, id="no-adapter-full"
    ),
    # spec.evaluation.generation needs chat or instruction data and evaluation data.
    case(
        GENERATION_NEEDS_EVAL_AND_REPLIES,
        "generation on chat data with evalSplit",
        job({"evaluation.generation": {}, "dataset.evalSplit": 0.1}),
        NONE,
        id="generation-chat-eval-split",
    ),
    case(
        GENERATION_NEEDS_EVAL_AND_REPLIES,
        "generation on instruction data with an eval file",
        job(
            {
                "evaluation.generation": {"match": "exact"},
                "dataset.format": "instruction",
                "dataset.eval": EVAL_FILE,
            }
        ),
        NONE,
        id="generation-instruction-eval-file",
    ),
    case(
        GENERATION_NEEDS_EVAL_AND_REPLIES,
        "generation without evaluation data",
        job({"evaluation.generation": {}}),
        {GENERATION_NEEDS_EVAL_AND_REPLIES},
        id="generation-no-eval",
    ),
    case(
        GENERATION_NEEDS_EVAL_AND_REPLIES,
        "generation on completion data (no reference reply)",
        job({"evaluation.generation": {}, "dataset.format": "completion", "dataset.evalSplit": 0.1}),
        {GENERATION_NEEDS_EVAL_AND_REPLIES},
        id="generation-completion",
    ),
    case(
        GENERATION_NEEDS_EVAL_AND_REPLIES,
        "generation on classification data",
        job({"evaluation.generation": {}, "dataset.format": "classification", "dataset.eval": EVAL_FILE}),
        {GENERATION_NEEDS_EVAL_AND_REPLIES},
        id="generation-classification",
    ),
    # spec.evaluation.gate: exactly one bound, and a metric the job produces.
    case(
        GATE_RULES,
        "trainLoss max without evaluation data",
        job({"evaluation.gate": {"metric": "trainLoss", "max": 1.5}}),
        NONE,
        id="gate-train-loss-no-eval",
    ),
    case(
        GATE_RULES,
        "evalLoss max with evalSplit",
        job({"evaluation.gate": {"metric": "evalLoss", "max": 2.0}, "dataset.evalSplit": 0.1}),
        NONE,
        id="gate-eval-loss-eval-split",
    ),
    case(
        GATE_ONE_BOUND,
        "a bound of zero is a bound",
        job({"evaluation.gate": {"metric": "trainLoss", "min": 0}}),
        NONE,
        id="gate-min-zero",
    ),
    case(
        GATE_ONE_BOUND,
        "neither min nor max",
        job({"evaluation.gate": {"metric": "trainLoss"}}),
        {GATE_ONE_BOUND},
        id="gate-no-bound",
    ),
    case(
        GATE_ONE_BOUND,
        "both min and max",
        job({"evaluation.gate": {"metric": "trainLoss", "min": 0.1, "max": 2.0}}),
        {GATE_ONE_BOUND},
        id="gate-both-bounds",
    ),
    case(
        GATE_METRIC_NEEDS_EVAL,
        "perplexity without evaluation data",
        job({"evaluation.gate": {"metric": "perplexity", "max": 10}}),
        {GATE_METRIC_NEEDS_EVAL},
        id="gate-perplexity-no-eval",
    ),
    case(
        GATE_METRIC_NEEDS_EVAL,
        "tokenAccuracy with an eval file",
        job({"evaluation.gate": {"metric": "tokenAccuracy", "min": 0.5}, "dataset.eval": EVAL_FILE}),
        NONE,
        id="gate-token-accuracy-eval-file",
    ),
    case(
        GATE_RULES,
        "answerAccuracy with generation",
        job(
            {
                "evaluation.gate": {"metric": "answerAccuracy", "min": 0.8},
                "evaluation.generation": {},
                "dataset.evalSplit": 0.1,
            }
        ),
        NONE,
        id="gate-answer-accuracy-generation",
    ),
    case(
        GATE_ANSWER_ACCURACY_NEEDS_GENERATION,
        "answerAccuracy without generation",
        job({"evaluation.gate": {"metric": "answerAccuracy", "min": 0.8}, "dataset.evalSplit": 0.1}),
        {GATE_ANSWER_ACCURACY_NEEDS_GENERATION},
        id="gate-answer-accuracy-no-generation",
    ),
    case(
        (GATE_ANSWER_ACCURACY_NEEDS_GENERATION, GATE_METRIC_NEEDS_EVAL),
        "answerAccuracy without generation or evaluation data",
        job({"evaluation.gate": {"metric": "answerAccuracy", "min": 0.8}}),
        {GATE_ANSWER_ACCURACY_NEEDS_GENERATION, GATE_METRIC_NEEDS_EVAL},
        id="gate-answer-accuracy-nothing",
    ),
    case(
        GATE_RULES,
        "f1 on classification data",
        job(
            {
                "evaluation.gate": {"metric": "f1", "min": 0.7},
                "dataset.format": "classification",
                "dataset.evalSplit": 0.1,
            }
        ),
        NONE,
        id="gate-f1-classification",
    ),
    case(
        GATE_CLASSIFICATION_METRIC_NEEDS_CLASSIFICATION,
        "accuracy on chat data",
        job({"evaluation.gate": {"metric": "accuracy", "min": 0.7}, "dataset.evalSplit": 0.1}),
        {GATE_CLASSIFICATION_METRIC_NEEDS_CLASSIFICATION},
        id="gate-accuracy-chat",
    ),
    case(
        (GATE_ONE_BOUND, GATE_CLASSIFICATION_METRIC_NEEDS_CLASSIFICATION, GATE_METRIC_NEEDS_EVAL),
        "recall on completion data, no evaluation data, no bound",
        job({"evaluation.gate": {"metric": "recall"}, "dataset.format": "completion"}),
        {GATE_ONE_BOUND, GATE_CLASSIFICATION_METRIC_NEEDS_CLASSIFICATION, GATE_METRIC_NEEDS_EVAL},
        id="gate-recall-everything-wrong",
    ),
    # Updates (old, new). spec.model, spec.dataset and spec.method are immutable.
    case(
        TRANSITION_RULES,
        "no-op update",
        (job(), job()),
        NONE,
        id="update-no-op",
    ),
    case(
        MODEL_IMMUTABLE,
        "model uri changed",
        (job(), job({"model.uri": "s3://models/other/"})),
        {MODEL_IMMUTABLE},
        id="update-model-uri",
    ),
    case(
        MODEL_IMMUTABLE,
        "model trustRemoteCode changed",
        (job(), job({"model.trustRemoteCode": True})),
        {MODEL_IMMUTABLE},
        id="update-model-trust-remote-code",
    ),
    case(
        MODEL_IMMUTABLE,
        "model adapter added",
        (job(), job({"model.adapter": ADAPTER})),
        {MODEL_IMMUTABLE},
        id="update-model-adapter",
    ),
    case(
        TRANSITION_RULES,
        "evaluation gate added to a running job",
        (job(), job({"evaluation.gate": {"metric": "trainLoss", "max": 1.0}})),
        NONE,
        id="update-evaluation-gate",
    ),
    case(
        MODEL_IMMUTABLE,
        "model uri changed while suspended",
        (job(SUSPENDED), job(SUSPENDED, {"model.uri": "s3://models/other/"})),
        {MODEL_IMMUTABLE},
        id="update-model-uri-suspended",
    ),
    case(
        DATASET_IMMUTABLE,
        "dataset train changed",
        (job(), job({"dataset.train": "s3://datasets/demo/v2.jsonl"})),
        {DATASET_IMMUTABLE},
        id="update-dataset-train",
    ),
    case(
        DATASET_IMMUTABLE,
        "dataset evalSplit added",
        (job(), job({"dataset.evalSplit": 0.1})),
        {DATASET_IMMUTABLE},
        id="update-dataset-eval-split",
    ),
    case(
        METHOD_IMMUTABLE,
        "method type changed",
        (job(), job({"method.type": "full"})),
        {METHOD_IMMUTABLE},
        id="update-method-type",
    ),
    case(
        METHOD_IMMUTABLE,
        "lora rank changed",
        (job({"method.lora": {"r": 8}}), job({"method.lora": {"r": 16}})),
        {METHOD_IMMUTABLE},
        id="update-method-lora-rank",
    ),
    case(
        TRANSITION_RULES,
        "learning rate changed on a running job",
        (job(), job({"hyperparameters.learningRate": 1e-5})),
        NONE,
        id="update-learning-rate",
    ),
    case(
        TRANSITION_RULES,
        "suspend a running job",
        (job(RUNNING), job(SUSPENDED)),
        NONE,
        id="update-suspend",
    ),
    case(
        TRANSITION_RULES,
        "resume a suspended job",
        (job(SUSPENDED), job(RUNNING)),
        NONE,
        id="update-resume",
    ),
    # spec.resources may change only while the old object is suspended.
    case(
        RESOURCES_WHILE_SUSPENDED,
        "Kueue sets a node selector on a suspended job",
        (job(SUSPENDED), job(SUSPENDED, ON_A100_POOL)),
        NONE,
        id="update-node-selector-suspended",
    ),
    case(
        RESOURCES_WHILE_SUSPENDED,
        "Kueue admits: node selector set and unsuspended in one update",
        (job(SUSPENDED), job(RUNNING, ON_A100_POOL)),
        NONE,
        id="update-node-selector-and-resume",
    ),
    case(
        RESOURCES_WHILE_SUSPENDED,
        "nodes changed on a suspended job",
        (job(SUSPENDED), job(SUSPENDED, {"resources.nodes": 4})),
        NONE,
        id="update-nodes-suspended",
    ),
    case(
        RESOURCES_WHILE_SUSPENDED,
        "Kueue stops: suspended and node selector restored in one update",
        (job(RUNNING, ON_A100_POOL), job(SUSPENDED)),
        NONE,
        id="update-suspend-and-restore-node-selector",
    ),
    case(
        METHOD_IMMUTABLE,
        "alpha stored as 32 and sent as 32.0 is the same number (a number field)",
        (
            _as_stored_by_the_api_server(job({"method.lora": {"alpha": 32.0}})),
            job({"method.lora": {"alpha": 32.0}}),
        ),
        NONE,
        id="update-number-int-vs-double",
    ),
    case(
        RESOURCES_WHILE_SUSPENDED,
        "node selector changed on a running job",
        (job(RUNNING), job(RUNNING, ON_A100_POOL)),
        {RESOURCES_WHILE_SUSPENDED},
        id="update-node-selector-running",
    ),
    case(
        RESOURCES_WHILE_SUSPENDED,
        "nodes changed on a running job",
        (job(RUNNING), job(RUNNING, {"resources.nodes": 4})),
        {RESOURCES_WHILE_SUSPENDED},
        id="update-nodes-running",
    ),
    case(
        RESOURCES_WHILE_SUSPENDED,
        "affinity changed on a running job",
        (job(), job({"resources.affinity": POOL_AFFINITY})),
        {RESOURCES_WHILE_SUSPENDED},
        id="update-affinity-running",
    ),
    case(
        TRANSITION_RULES,
        "model and nodes changed on a running job",
        (job(), job({"model.uri": "s3://models/other/", "resources.nodes": 2})),
        {MODEL_IMMUTABLE, RESOURCES_WHILE_SUSPENDED},
        id="update-model-and-nodes-running",
    ),
    # On create there is no old object: transition rules are skipped (they would not evaluate).
    case(
        TRANSITION_RULES,
        "create: running, with a node selector",
        job(ON_A100_POOL, {"resources.nodes": 2}),
        NONE,
        id="create-skips-transition-rules",
    ),
]


# --- Rules on URIs, tolerations, node selectors and affinity: one rejected and one accepted case each ---
# The URI rules (control characters, S3 bucket names) sit on every URI field; pydantic refuses the same
# values first, so the rejected objects are raw(). Affinity's rules come with Kubernetes' schema of it
# (label-key syntax): a case is built for each place the schema has one.

S3_URI_FIELDS = {  # field -> the URI with a given bucket (and key)
    "model.uri": "s3://{bucket}/{key}llama/",
    "model.adapter": "s3://{bucket}/{key}adapter/",
    "dataset.train": "s3://{bucket}/{key}train.jsonl",
    "dataset.eval": "s3://{bucket}/{key}eval.jsonl",
    "output.uri": "s3://{bucket}/{key}out/",
}
BAD_URI = {  # each URI rule, by the start of its text -> (bucket, key) that break it and no other rule
    "bidi": ("!self.matches('[", "models", "a\u202eb/"),
    "bucket-length": ("self.matches('^s3://[^/]{3,63}", "ab", ""),
    "bucket-ip": ("!self.matches('^s3://[0-9]+", "192.168.5.4", ""),
    "bucket-prefix": ("!self.matches('^s3://(xn--", "xn--bucket", ""),
    "bucket-suffix": ("!self.matches('^s3://[^/]*(-s3alias", "bucket--ol-s3", ""),
}
LONG_PREFIX_KEY = "a" * 254 + "/pool"  # a qualified name's syntax, but a prefix over 253 characters


def _uri_cases() -> list[Any]:
    cases = []
    for field, template in S3_URI_FIELDS.items():
        location = ("spec", *field.split("."))
        for name, (start, bucket, key) in BAD_URI.items():
            [rule] = [r for r in ALL_RULES if r.location == location and r.rule.startswith(start)]
            slug = f"{field}-{name}"
            good = job({field: template.format(bucket="models.example", key="v1/")})
            cases.append(case(rule, f"{field}: a good S3 URI", good, NONE, id=f"uri-ok-{slug}"))
            bad = raw({field: template.format(bucket=bucket, key=key)})
            cases.append(case(rule, f"{field}: {bucket}/{key}", bad, {rule}, id=f"uri-bad-{slug}"))
    [endpoint_rule] = [r for r in ALL_RULES if r.location == ("spec", "storage", "endpoint")]
    cases += [
        case(endpoint_rule, "endpoint without control characters",
             job({"storage.endpoint": "http://minio:9000"}), NONE, id="endpoint-ok"),
        case(endpoint_rule, "endpoint with a right-to-left override",
             raw({"storage.endpoint": "http://minio:9000/\u202e"}), {endpoint_rule}, id="endpoint-bidi"),
    ]  # fmt: skip
    return cases


TOLERATIONS = ("spec", "resources", "tolerations", ANY)
TOLERATION_VALUE_WITH_EXISTS = _rule("spec.resources.tolerations.*", "self.value")
TOLERATION_SECONDS_NEED_NO_EXECUTE = _rule("spec.resources.tolerations.*", "tolerationSeconds")
TOLERATION_EMPTY_KEY_NEEDS_EXISTS = _rule("spec.resources.tolerations.*", "self.key != ''")
TOLERATION_KEY_PREFIX = _rule("spec.resources.tolerations.*", "self.key.matches")
NODE_SELECTOR_KEYS = _rule("spec.resources.nodeSelector", "self.all(k")


def _tolerating(*tolerations: dict[str, Any]) -> dict:
    return job({"resources.tolerations": list(tolerations)})


def _placement_cases() -> list[Any]:
    gpu = {"key": "nvidia.com/gpu"}
    return [
        case(TOLERATION_VALUE_WITH_EXISTS, "Exists without a value",
             _tolerating({**gpu, "operator": "Exists"}), NONE, id="toleration-exists"),
        case(TOLERATION_VALUE_WITH_EXISTS, "Exists with a value",
             _tolerating({**gpu, "operator": "Exists", "value": "a100"}), {TOLERATION_VALUE_WITH_EXISTS},
             id="toleration-exists-with-value"),
        case(TOLERATION_SECONDS_NEED_NO_EXECUTE, "tolerationSeconds with NoExecute",
             _tolerating({**gpu, "effect": "NoExecute", "tolerationSeconds": 60}), NONE,
             id="toleration-seconds-no-execute"),
        case(TOLERATION_SECONDS_NEED_NO_EXECUTE, "tolerationSeconds with NoSchedule",
             _tolerating({**gpu, "effect": "NoSchedule", "tolerationSeconds": 60}),
             {TOLERATION_SECONDS_NEED_NO_EXECUTE}, id="toleration-seconds-no-schedule"),
        case(TOLERATION_EMPTY_KEY_NEEDS_EXISTS, "empty key with Exists: every taint",
             _tolerating({"operator": "Exists"}), NONE, id="toleration-every-taint"),
        case(TOLERATION_EMPTY_KEY_NEEDS_EXISTS, "empty key with Equal",
             _tolerating({"operator": "Equal", "value": "x"}), {TOLERATION_EMPTY_KEY_NEEDS_EXISTS},
             id="toleration-empty-key-equal"),
        case(TOLERATION_KEY_PREFIX, "a prefixed key", _tolerating({"key": "example.com/gpu"}), NONE,
             id="toleration-prefixed-key"),
        case(TOLERATION_KEY_PREFIX, "a key prefix of 254 characters", _tolerating({"key": LONG_PREFIX_KEY}),
             {TOLERATION_KEY_PREFIX}, id="toleration-long-prefix"),
        case(NODE_SELECTOR_KEYS, "a prefixed label key", job(ON_A100_POOL), NONE, id="node-selector-key"),
        case(NODE_SELECTOR_KEYS, "a key with a space", job({"resources.nodeSelector": {"gpu pool": "a"}}),
             {NODE_SELECTOR_KEYS}, id="node-selector-key-space"),
        case(NODE_SELECTOR_KEYS, "a key prefix of 254 characters",
             job({"resources.nodeSelector": {LONG_PREFIX_KEY: "a"}}), {NODE_SELECTOR_KEYS},
             id="node-selector-key-long-prefix"),
    ]  # fmt: skip


def _minimal(schema: dict[str, Any]) -> Any:
    """The smallest value the schema admits (its required fields filled in)."""
    kind = schema["type"]
    if kind == "object":
        properties = schema.get("properties", {})
        return {key: _minimal(properties[key]) for key in schema.get("required", [])}
    if kind == "array":
        return []
    if kind == "integer":
        return schema.get("minimum", 1)
    return schema["enum"][0] if "enum" in schema else "pool"


def _with_leaf(schema: dict[str, Any], location: tuple[str, ...], leaf: Any) -> Any:
    """A minimal value of ``schema`` holding ``leaf`` at ``location`` (ANY: the first list item)."""
    if not location:
        return leaf
    head, *rest = location
    if head == ANY:
        return [_with_leaf(schema["items"], tuple(rest), leaf)]
    value = _minimal(schema)
    value[head] = _with_leaf(schema["properties"][head], tuple(rest), leaf)
    return value


AFFINITY = ("spec", "resources", "affinity")
AFFINITY_SCHEMA = SCHEMA["properties"]["spec"]["properties"]["resources"]["properties"]["affinity"]
AFFINITY_RULES = tuple(r for r in ALL_RULES if r.location[:3] == AFFINITY)


def _affinity_cases() -> list[Any]:
    cases = []
    for rule in AFFINITY_RULES:
        where = ".".join(rule.location[3:])
        is_map = "self.all(k" in rule.rule
        good = {"example.com/pool": "a"} if is_map else "example.com/pool"
        bad = {"gpu pool": "a"} if is_map else LONG_PREFIX_KEY
        for leaf, violated, verdict in ((good, NONE, "ok"), (bad, {rule}, "bad")):
            affinity = _with_leaf(AFFINITY_SCHEMA, rule.location[3:], leaf)
            obj = job({"resources.affinity": affinity})
            cases.append(
                case(rule, f"affinity {where}: {verdict}", obj, violated, id=f"affinity-{verdict}-{where}")
            )
    return cases


CASES += _uri_cases() + _placement_cases() + _affinity_cases()


def _violations(obj: Any) -> list[RuleViolation]:
    if isinstance(obj, tuple):
        old, new = obj
        return evaluate_rules(SCHEMA, new, old)
    return evaluate_rules(SCHEMA, obj)


def _matches(pattern: tuple[str, ...], path: tuple[str | int, ...]) -> bool:
    return len(pattern) == len(path) and all(p in (ANY, q) for p, q in zip(pattern, path, strict=True))


def _rule_of(violation: RuleViolation) -> Rule:
    """The CRD rule behind a violation, matched by its text and the path it reports (location + fieldPath)."""
    found = [r for r in ALL_RULES if r.rule == violation.rule and _matches(r.reported_path, violation.path)]
    assert len(found) == 1, f"no single CRD rule reports {violation}; candidates: {found}"
    return found[0]


# --- The table --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("about", "description", "obj", "violated"), CASES)
def test_rules(about: tuple[Rule, ...], description: str, obj: Any, violated: set[Rule]) -> None:
    violations = _violations(obj)
    for violation in violations:
        assert not violation.message.startswith("rule could not be evaluated"), violation
    got = {_rule_of(v) for v in violations}
    assert got == violated, f"{description}: violated {sorted(map(str, got))}"
    assert len(violations) == len(got), "a rule was reported twice"
    if isinstance(obj, tuple) or violated:
        return
    # Accepted creates are also accepted as no-op updates.
    assert evaluate_rules(SCHEMA, obj, copy.deepcopy(obj)) == []


def test_every_rule_is_covered() -> None:
    """Every rule anywhere in the CRD has a case that it rejects and one (about it) that it accepts."""
    rejected: set[Rule] = set()
    accepted: set[Rule] = set()
    for param in CASES:
        about, _, _, violated = param.values
        rejected |= violated
        accepted |= set(about) - violated
    rules = set(ALL_RULES)
    assert rules - rejected == set(), f"rules without a rejected case: {sorted(map(str, rules - rejected))}"
    assert rules - accepted == set(), f"rules without an accepted case: {sorted(map(str, rules - accepted))}"


def test_every_rule_in_the_crd_is_collected() -> None:
    """The schema walk misses no x-kubernetes-validations list, and the named rules are all of them."""
    nodes_with_rules = {r.location for r in ALL_RULES}
    assert CRD_TEXT.count("x-kubernetes-validations:") == len(nodes_with_rules)
    assert len(ALL_RULES) == len(set(ALL_RULES))
    assert set(TRANSITION_RULES) == {r for r in ALL_RULES if r.is_transition}


def test_case_ids_are_unique() -> None:
    ids = [param.id for param in CASES]
    assert len(ids) == len(set(ids))


# --- Paths and messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        pytest.param(
            job({"dataset.eval": EVAL_FILE, "dataset.evalSplit": 0.1}),
            ("spec", "dataset", "evalSplit"),
            id="eval-split",
        ),
        pytest.param(job({"dataset.columns": {"label": "q"}}), ("spec", "dataset", "columns"), id="columns"),
        pytest.param(job({"method.type": "full", "method.lora": {}}), ("spec", "method", "lora"), id="lora"),
        pytest.param(
            job({"hyperparameters.earlyStopping": {}}),
            ("spec", "hyperparameters", "earlyStopping"),
            id="early-stopping",
        ),
        pytest.param(
            job({"method.type": "qlora", "resources.gpusPerNode": 0}),
            ("spec", "resources", "gpusPerNode"),
            id="gpus-per-node",
        ),
        pytest.param(
            job({"deepspeed.offload": "cpu", "deepspeed.zeroStage": 0}),
            ("spec", "deepspeed", "offload"),
            id="offload",
        ),
        pytest.param((job(), job({"resources.nodes": 2})), ("spec", "resources"), id="resources"),
        pytest.param(
            (job(), job({"model.uri": "s3://models/x/"})), ("spec", "model"), id="model-no-field-path"
        ),
        pytest.param(
            job({"model.adapter": ADAPTER, "method.type": "full"}), ("spec", "model", "adapter"), id="adapter"
        ),
        pytest.param(
            job({"evaluation.generation": {}}), ("spec", "evaluation", "generation"), id="generation"
        ),
        pytest.param(
            job({"evaluation.gate": {"metric": "evalLoss", "max": 1}}),
            ("spec", "evaluation", "gate", "metric"),
            id="gate-metric",
        ),
        pytest.param(
            job({"evaluation.gate": {"metric": "trainLoss"}}), ("spec", "evaluation", "gate"), id="gate-bound"
        ),
        pytest.param(job(name="Demo"), (), id="name-at-root"),
    ],
)
def test_violation_path_is_the_rules_field_path(obj: Any, path: tuple[str, ...]) -> None:
    [violation] = _violations(obj)
    assert violation.path == path


@pytest.mark.parametrize("param", [pytest.param(p, id=p.id) for p in CASES if p.values[3]])
def test_violation_message_is_the_rules_message(param: Any) -> None:
    # A messageExpression whose result has a line break (a name with one) gives way to the message,
    # as on the API server.
    broken_line = (
        "\n" in str(param.values[2].get("metadata", {}).get("name", ""))
        if isinstance(param.values[2], dict)
        else False
    )
    for violation in _violations(param.values[2]):
        rule = _rule_of(violation)
        if rule.message_expression and not broken_line:
            assert violation.message != rule.message and "failed rule" not in violation.message
        else:
            assert violation.message == rule.message
        assert violation.message.strip()


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        pytest.param("9lives", NAME_FORMAT, id="leading-digit"),
        pytest.param("demo-", NAME_FORMAT, id="trailing-dash"),
        pytest.param("a" * 53, NAME_LENGTH, id="53-chars"),
    ],
)
def test_name_message_names_the_name(name: str, rule: Rule) -> None:
    [violation] = _violations(job(name=name))
    assert _rule_of(violation) == rule
    assert f'"{name}"' in violation.message
    if rule == NAME_LENGTH:
        assert "52" in violation.message
        assert "is longer than 52 characters" in violation.message
    else:
        assert "DNS-1035" in violation.message


# --- Every rule on every example --------------------------------------------------------------------


def _example_jobs() -> list[Any]:
    params = []
    for path in EXAMPLES:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(document, dict) and document.get("kind") == "FinetuneJob":
                obj = defaulted(FinetuneJob.model_validate(document))
                params.append(pytest.param(obj, id=f"{path.stem}-{index}"))
    return params


EXAMPLE_JOBS = _example_jobs()
CEL = celpy.Environment()


def _values_at(obj: Any, location: tuple[str, ...]) -> list[Any]:
    """The values at a rule's location (every map value or list item where the location says ANY)."""
    if not location:
        return [obj]
    head, *rest = location
    if head == ANY:
        children = obj.values() if isinstance(obj, dict) else obj
        return [value for child in children for value in _values_at(child, tuple(rest))]
    if head not in obj:
        return []  # an optional field the object leaves out (affinity, dataset.eval, ...)
    return _values_at(obj[head], tuple(rest))


def _evaluate(expression: str, value: Any, old: Any) -> Any:
    activation = {"self": celpy.json_to_cel(value), "oldSelf": celpy.json_to_cel(old)}
    return CEL.program(CEL.compile(expression)).evaluate(activation)


def test_examples_exist() -> None:
    assert len(EXAMPLE_JOBS) >= 4


@pytest.mark.parametrize("rule", ALL_RULES, ids=str)
def test_every_rule_compiles(rule: Rule) -> None:
    CEL.compile(rule.rule)
    if rule.message_expression:
        CEL.compile(rule.message_expression)


@pytest.mark.parametrize("obj", EXAMPLE_JOBS)
def test_every_rule_evaluates_true_on_the_example(obj: dict) -> None:
    """Each rule, at its location, evaluates to true, with old == new for the transition rules; and each
    messageExpression evaluates to a string."""
    for rule in ALL_RULES:
        values = _values_at(obj, rule.location)
        for value in values:
            result = _evaluate(rule.rule, value, copy.deepcopy(value))
            assert isinstance(result, celpy.celtypes.BoolType) and bool(result), f"{rule}: {result!r}"
            if rule.message_expression:
                message = _evaluate(rule.message_expression, value, value)
                assert isinstance(message, str) and message, f"{rule}: {message!r}"


@pytest.mark.parametrize("obj", EXAMPLE_JOBS)
def test_example_passes_all_rules(obj: dict) -> None:
    assert evaluate_rules(SCHEMA, obj) == []  # create: transition rules skipped
    assert evaluate_rules(SCHEMA, obj, copy.deepcopy(obj)) == []  # no-op update: transition rules pass


@pytest.mark.parametrize("obj", EXAMPLE_JOBS)
def test_transition_rules_need_an_old_object(obj: dict) -> None:
    """Why they are skipped on create: without oldSelf a transition rule cannot be evaluated at all."""
    for rule in TRANSITION_RULES:
        [value] = _values_at(obj, rule.location)
        with pytest.raises(celpy.CELEvalError, match="oldSelf"):
            CEL.program(CEL.compile(rule.rule)).evaluate({"self": celpy.json_to_cel(value)})

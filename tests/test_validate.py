"""`finetune validate`: every mistake in a FinetuneJob manifest is reported by field path, value and rule.

The heart of this file is CASES: each row is a valid base manifest with one small mutation, the dotted
field path the report must name and the words it must contain. The structural rows are also checked
against the committed CRD's openAPIV3Schema, and the CEL rows against the CRD's own CEL rules, so the
CLI and the API server agree on what is wrong; tests/test_apiserver.py sends every row, and every
ACCEPTED variant, to the real API server as well.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from finetune_operator.api.cel import evaluate_rules
from finetune_operator.api.spec import FinetuneJob
from finetune_operator.api.validation import defaulted, dotted, parse_finetune_job
from finetune_operator.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD_PATH = ROOT / "crds" / "finetunejob.yaml"

BASE: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FinetuneJob",
    "metadata": {"name": "base-job", "namespace": "ml"},
    "spec": {
        "model": {"uri": "s3://models/llama-3.1-8b/"},
        "dataset": {"train": "s3://datasets/chat/train.jsonl", "evalSplit": 0.1, "format": "chat"},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "hyperparameters": {
            "epochs": 1,
            "learningRate": 2.0e-4,
            "lrScheduler": "cosine",
            "precision": "bf16",
        },
        "deepspeed": {"zeroStage": 2, "offload": "none"},
        "resources": {
            "nodes": 1,
            "gpusPerNode": 1,
            "cpu": "8",
            "memory": "64Gi",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "output": {"uri": "s3://checkpoints/ml/base-job/"},
        "runPolicy": {"backoffLimit": 3},
    },
}

# A mutation turns a manifest dict into a new manifest dict, or into YAML text for what a dict cannot hold.
Mutation = Callable[[dict[str, Any]], "dict[str, Any] | str"]


def _parts(path: str) -> list[str | int]:
    """kubectl's dotted path as keys and indexes: "tolerations[0].effect" -> ["tolerations", 0, "effect"]."""
    return [int(index) if index else key for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]


def with_field(path: str, value: Any) -> Mutation:
    def mutate(document: dict[str, Any]) -> dict[str, Any]:
        document = copy.deepcopy(document)
        *parents, last = _parts(path)
        holder: Any = document
        for part in parents:
            holder = holder.setdefault(part, {}) if isinstance(part, str) else holder[part]
        holder[last] = value
        return document

    return mutate


def without_field(path: str) -> Mutation:
    def mutate(document: dict[str, Any]) -> dict[str, Any]:
        document = copy.deepcopy(document)
        *parents, last = _parts(path)
        holder: Any = document
        for part in parents:
            holder = holder[part]
        del holder[last]
        return document

    return mutate


def combined(*mutations: Mutation) -> Mutation:
    def mutate(document: dict[str, Any]) -> dict[str, Any] | str:
        for mutation in mutations:
            document = mutation(document)  # type: ignore[assignment]
        return document

    return mutate


def with_duplicate_key(path: str, value: Any) -> Mutation:
    """YAML text in which the mapping holding ``path`` has its last key twice (the second with ``value``)."""

    def mutate(document: dict[str, Any]) -> str:
        parts = _parts(path)
        key_line = f"{'  ' * (len(parts) - 1)}{parts[-1]}:"
        lines = to_yaml(document).splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(key_line))
        lines.insert(at + 1, f"{key_line} {value}")
        return "\n".join(lines) + "\n"

    return mutate


def to_yaml(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False)


# Categories: the structural ones are what the CRD's openAPIV3Schema itself rejects.
REQUIRED, PATTERN, TYPE, RANGE, ENUM = "required", "pattern", "type", "range", "enum"
STRUCTURAL = {REQUIRED, PATTERN, TYPE, RANGE, ENUM}
UNKNOWN, CEL, IDENTITY, YAML = "unknown-field", "cel", "identity", "yaml"
# What the API server checks besides the schema: ObjectMeta, and numbers as it decodes them.
METADATA, DECODING = "metadata", "decoding"

LONG_NAME = "a" * 53
ADAPTER = "s3://checkpoints/ml/earlier-job/model/"  # an earlier job's LoRA adapter
CASES = [
    # Required fields: no defaults exist for what to train, on what and where to write.
    pytest.param(without_field("spec.model.uri"), "spec.model.uri", ["required field is missing"], REQUIRED,
                 id="missing-model-uri"),
    pytest.param(without_field("spec.dataset.train"), "spec.dataset.train", ["required field is missing"],
                 REQUIRED, id="missing-dataset-train"),
    pytest.param(without_field("spec.output.uri"), "spec.output.uri", ["required field is missing"], REQUIRED,
                 id="missing-output-uri"),
    pytest.param(without_field("spec"), "spec", ["required field is missing"], REQUIRED, id="missing-spec"),
    # Patterns: S3 locations, quantities, DNS names, URLs, image references.
    pytest.param(with_field("spec.model.uri", "s3:///llama/"), "spec.model.uri",
                 ['got "s3:///llama/"', "s3://<bucket>/<prefix>"], PATTERN, id="s3-no-bucket"),
    pytest.param(with_field("spec.output.uri", "gs://checkpoints/x/"), "spec.output.uri",
                 ['got "gs://checkpoints/x/"', "an S3 location"], PATTERN, id="s3-wrong-scheme"),
    pytest.param(with_field("spec.dataset.train", "s3://datasets/chat/train.csv"), "spec.dataset.train",
                 ['got "s3://datasets/chat/train.csv"', "ends in .jsonl or .parquet"], PATTERN,
                 id="dataset-not-jsonl-or-parquet"),
    pytest.param(with_field("spec.model.uri", "s3://Models/llama/"), "spec.model.uri",
                 ['got "s3://Models/llama/"', "lowercase letters"], PATTERN, id="s3-uppercase-bucket"),
    pytest.param(with_field("spec.resources.cpu", "lots"), "spec.resources.cpu",
                 ['got "lots"', "a Kubernetes quantity such as 32, 500m or 512Gi"], PATTERN, id="cpu-lots"),
    pytest.param(with_field("spec.resources.memory", "-1Gi"), "spec.resources.memory",
                 ['got "-1Gi"', "a Kubernetes quantity"], PATTERN, id="memory-negative-quantity"),
    pytest.param(with_field("spec.resources.schedulerName", "Volcano_Gang"), "spec.resources.schedulerName",
                 ['got "Volcano_Gang"', "DNS-1123 subdomain"], PATTERN, id="scheduler-name-not-dns"),
    pytest.param(with_field("spec.storage.endpoint", "ftp://minio:9000"), "spec.storage.endpoint",
                 ['got "ftp://minio:9000"', "http:// or https:// URL"], PATTERN, id="endpoint-not-http"),
    pytest.param(with_field("spec.image", "trainer image:1"), "spec.image",
                 ['got "trainer image:1"', "without whitespace"], PATTERN, id="image-with-space"),
    # Unknown fields are rejected at every level, with a hint when the name is close to a real one.
    pytest.param(with_field("spec.hyperparameters.learningrate", 1e-4), "spec.hyperparameters.learningrate",
                 ["got 0.0001", 'unknown field (did you mean "learningRate"?)', "allowed here are: epochs,"],
                 UNKNOWN, id="unknown-learningrate-hint"),
    pytest.param(with_field("specs", {"nodes": 2}), "specs",
                 ['unknown field (did you mean "spec"?)', "apiVersion, kind, metadata, spec, status"],
                 UNKNOWN, id="unknown-top-level-specs"),
    pytest.param(with_field("spec.method.lora.rank", 8), "spec.method.lora.rank",
                 ["got 8", "unknown field; the fields allowed here are: r, alpha, dropout, targetModules"],
                 UNKNOWN, id="unknown-lora-rank"),
    pytest.param(with_field("spec.resources.tolerations[0].seconds", 60),
                 "spec.resources.tolerations[0].seconds", ["unknown field", "tolerationSeconds"], UNKNOWN,
                 id="unknown-in-toleration"),
    pytest.param(with_field("spec.resource", {"nodes": 2}), "spec.resource",
                 ['unknown field (did you mean "resources"?)'], UNKNOWN, id="unknown-spec-resource"),
    # Wrong types: no coercion, as on the API server.
    pytest.param(with_field("spec.resources.nodes", "2"), "spec.resources.nodes",
                 ['got "2"', "must be an integer"], TYPE, id="string-for-integer"),
    pytest.param(with_field("spec.hyperparameters.epochs", True), "spec.hyperparameters.epochs",
                 ["got true", "must be an integer"], TYPE, id="bool-for-integer"),
    pytest.param(with_field("spec.hyperparameters.seed", 1.5), "spec.hyperparameters.seed",
                 ["got 1.5", "must be an integer"], TYPE, id="float-for-integer"),
    pytest.param(with_field("spec.resources.tolerations", [None]), "spec.resources.tolerations[0]",
                 ["got null", "must be a mapping"], TYPE, id="null-toleration"),
    pytest.param(with_field("spec.resources", [{"nodes": 2}]), "spec.resources",
                 ['got [{"nodes": 2}]', "must be a mapping"], TYPE, id="list-for-mapping"),
    pytest.param(with_field("spec.resources.tolerations", {"key": "gpu"}), "spec.resources.tolerations",
                 ['got {"key": "gpu"}', "must be a list"], TYPE, id="mapping-for-list"),
    pytest.param(with_field("spec.hyperparameters.learningRate", "fast"), "spec.hyperparameters.learningRate",
                 ['got "fast"', "must be a number"], TYPE, id="string-for-number"),
    pytest.param(with_field("spec.dataset.packing", "yes"), "spec.dataset.packing",
                 ['got "yes"', "must be true or false"], TYPE, id="string-for-bool"),
    pytest.param(with_field("spec.resources.cpu", 1.5), "spec.resources.cpu",
                 ["got 1.5", "must be an integer or a string"], TYPE, id="float-for-int-or-string"),
    # Out-of-range numbers: each bound, inclusive or exclusive, as the CRD states it.
    pytest.param(with_field("spec.hyperparameters.learningRate", 0), "spec.hyperparameters.learningRate",
                 ["got 0", "must be greater than 0"], RANGE, id="learning-rate-0"),
    pytest.param(with_field("spec.hyperparameters.learningRate", 1.5), "spec.hyperparameters.learningRate",
                 ["got 1.5", "must be less than or equal to 1"], RANGE, id="learning-rate-1.5"),
    pytest.param(with_field("spec.dataset.evalSplit", 0), "spec.dataset.evalSplit",
                 ["got 0", "must be greater than 0"], RANGE, id="eval-split-0"),
    pytest.param(with_field("spec.dataset.evalSplit", 0.6), "spec.dataset.evalSplit",
                 ["got 0.6", "must be less than or equal to 0.5"], RANGE, id="eval-split-0.6"),
    pytest.param(with_field("spec.method.lora.dropout", 1.0), "spec.method.lora.dropout",
                 ["got 1.0", "must be less than 1"], RANGE, id="lora-dropout-1"),
    pytest.param(with_field("spec.method.lora.r", 0), "spec.method.lora.r",
                 ["got 0", "must be greater than or equal to 1"], RANGE, id="lora-r-0"),
    pytest.param(with_field("spec.deepspeed.zeroStage", 4), "spec.deepspeed.zeroStage",
                 ["got 4", "must be less than or equal to 3"], RANGE, id="zero-stage-4"),
    pytest.param(with_field("spec.resources.nodes", 0), "spec.resources.nodes",
                 ["got 0", "must be greater than or equal to 1"], RANGE, id="nodes-0"),
    pytest.param(with_field("spec.resources.nodes", 513), "spec.resources.nodes",
                 ["got 513", "must be less than or equal to 512"], RANGE, id="nodes-513"),
    pytest.param(with_field("spec.runPolicy.backoffLimit", -1), "spec.runPolicy.backoffLimit",
                 ["got -1", "must be greater than or equal to 0"], RANGE, id="backoff-limit-negative"),
    pytest.param(with_field("spec.resources.gpusPerNode", 17), "spec.resources.gpusPerNode",
                 ["got 17", "must be less than or equal to 16"], RANGE, id="gpus-per-node-17"),
    pytest.param(with_field("spec.resources.memory", -1), "spec.resources.memory",
                 ["got -1", "must be greater than or equal to 0"], RANGE, id="memory-negative-integer"),
    # Enums: the message lists every allowed value.
    pytest.param(with_field("spec.method.type", "adapter"), "spec.method.type",
                 ['got "adapter"', "must be one of 'full', 'lora', 'qlora' or 'freeze'"], ENUM,
                 id="method-type"),
    pytest.param(with_field("spec.dataset.format", "sharegpt"), "spec.dataset.format",
                 ['got "sharegpt"', "'chat', 'instruction', 'completion' or 'classification'"], ENUM,
                 id="dataset-format"),
    pytest.param(with_field("spec.hyperparameters.precision", "fp8"), "spec.hyperparameters.precision",
                 ['got "fp8"', "must be one of 'bf16', 'fp16' or 'fp32'"], ENUM, id="precision"),
    pytest.param(with_field("spec.hyperparameters.lrScheduler", "cos"), "spec.hyperparameters.lrScheduler",
                 ['got "cos"', "must be one of 'cosine', 'linear' or 'constant'"], ENUM, id="lr-scheduler"),
    pytest.param(with_field("spec.deepspeed.offload", "nvme"), "spec.deepspeed.offload",
                 ['got "nvme"', "must be one of 'none' or 'cpu'"], ENUM, id="offload"),
    pytest.param(with_field("spec.resources.tolerations[0].effect", "NoRun"),
                 "spec.resources.tolerations[0].effect",
                 ['got "NoRun"', "'', 'NoSchedule', 'PreferNoSchedule' or 'NoExecute'"], ENUM,
                 id="toleration-effect"),
    # Job names: CEL rules on the whole object, so the message itself names metadata.name.
    pytest.param(with_field("metadata.name", "Base-Job"), "(document)",
                 ['metadata.name "Base-Job" must be a DNS-1035 label'], CEL, id="name-uppercase"),
    pytest.param(with_field("metadata.name", "base_job"), "(document)",
                 ['metadata.name "base_job" must be a DNS-1035 label'], CEL, id="name-underscore"),
    pytest.param(with_field("metadata.name", LONG_NAME), "(document)",
                 [f'metadata.name "{LONG_NAME}" is longer than 52 characters, the most allowed'], CEL,
                 id="name-53-characters"),
    # Cross-field CEL rules: reported at the rule's fieldPath with the value found there.
    pytest.param(with_field("spec.method.type", "full"), "spec.method.lora",
                 ["only allowed when spec.method.type is lora or qlora"], CEL, id="lora-with-full"),
    pytest.param(with_field("spec.method.freeze", {"trainableLayers": 2}), "spec.method.freeze",
                 ['got {"trainableLayers": 2}', "only allowed when spec.method.type is freeze"], CEL,
                 id="freeze-with-lora"),
    pytest.param(with_field("spec.dataset.eval", "s3://datasets/chat/eval.jsonl"), "spec.dataset.evalSplit",
                 ["got 0.1", "spec.dataset.eval and spec.dataset.evalSplit are mutually exclusive"], CEL,
                 id="eval-and-eval-split"),
    pytest.param(with_field("spec.hyperparameters.maxSteps", 1000), "spec.hyperparameters.maxSteps",
                 ["got 1000", "epochs and spec.hyperparameters.maxSteps are mutually exclusive"], CEL,
                 id="epochs-and-max-steps"),
    pytest.param(combined(without_field("spec.dataset.evalSplit"),
                          with_field("spec.hyperparameters.earlyStopping", {"patience": 2})),
                 "spec.hyperparameters.earlyStopping", ["earlyStopping needs evaluation data"], CEL,
                 id="early-stopping-without-eval"),
    pytest.param(combined(with_field("spec.method.type", "qlora"),
                          with_field("spec.resources.gpusPerNode", 0)),
                 "spec.resources.gpusPerNode", ["got 0", "qlora needs GPUs"], CEL, id="qlora-without-gpus"),
    pytest.param(combined(with_field("spec.method", {"type": "full"}),
                          with_field("spec.output.saveMerged", True)),
                 "spec.output.saveMerged", ["got true", "only applies to spec.method.type lora or qlora"],
                 CEL,
                 id="save-merged-with-full"),
    pytest.param(combined(with_field("spec.deepspeed.offload", "cpu"),
                          with_field("spec.deepspeed.zeroStage", 0)),
                 "spec.deepspeed.offload", ['got "cpu"', "needs spec.deepspeed.zeroStage 1, 2 or 3"], CEL,
                 id="offload-cpu-zero-stage-0"),
    pytest.param(with_field("spec.dataset.columns", {"text": "body"}), "spec.dataset.columns",
                 ['got {"text": "body"}', "may only rename the columns the format reads", "chat: messages"],
                 CEL, id="columns-not-read-by-format"),
    # evaluation.generation, evaluation.gate and model.adapter: each rule names the field, the value and what
    # is allowed.
    pytest.param(combined(with_field("spec.method", {"type": "full"}),
                          with_field("spec.model.adapter", ADAPTER)),
                 "spec.model.adapter", [f'got "{ADAPTER}"', "needs spec.method.type lora or qlora"], CEL,
                 id="adapter-with-full"),
    pytest.param(with_field("spec.model.adapter", "gs://checkpoints/ml/earlier-job/model/"),
                 "spec.model.adapter",
                 ['got "gs://checkpoints/ml/earlier-job/model/"', "an S3 location"], PATTERN,
                 id="adapter-not-s3"),
    pytest.param(combined(with_field("spec.dataset.format", "completion"),
                          with_field("spec.evaluation.generation", {})),
                 "spec.evaluation.generation", ["needs chat or instruction data (spec.dataset.format)"], CEL,
                 id="generation-on-completion"),
    pytest.param(combined(without_field("spec.dataset.evalSplit"),
                          with_field("spec.evaluation.generation", {"maxNewTokens": 16})),
                 "spec.evaluation.generation",
                 ['"maxNewTokens": 16', "evaluation data (spec.dataset.eval or spec.dataset.evalSplit)"], CEL,
                 id="generation-without-eval"),
    pytest.param(with_field("spec.evaluation.generation", {"maxNewTokens": 0}),
                 "spec.evaluation.generation.maxNewTokens", ["got 0", "must be greater than or equal to 1"],
                 RANGE, id="generation-max-new-tokens-0"),
    pytest.param(with_field("spec.evaluation.generation", {"match": "fuzzy"}),
                 "spec.evaluation.generation.match",
                 ['got "fuzzy"', "must be one of 'contains' or 'exact'"], ENUM, id="generation-match"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "evalLoss"}), "spec.evaluation.gate",
                 ['got {"metric": "evalLoss"}', "needs exactly one of min and max"], CEL, id="gate-no-bound"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "evalLoss", "min": 0.1, "max": 2.0}),
                 "spec.evaluation.gate", ['"min": 0.1', "needs exactly one of min and max"], CEL,
                 id="gate-both-bounds"),
    pytest.param(with_field("spec.evaluation.gate", {"max": 2.0}), "spec.evaluation.gate.metric",
                 ["required field is missing"], REQUIRED, id="gate-without-metric"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "bleu", "min": 0.5}),
                 "spec.evaluation.gate.metric",
                 ['got "bleu"', "must be one of 'trainLoss', 'evalLoss',", "'f1' or 'answerAccuracy'"], ENUM,
                 id="gate-metric-unknown"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "evalLoss", "maximum": 2.0}),
                 "spec.evaluation.gate.maximum",
                 ['unknown field (did you mean "max"?)', "the fields allowed here are: metric, min, max"],
                 UNKNOWN,
                 id="gate-unknown-maximum"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "evalLoss", "max": "2"}),
                 "spec.evaluation.gate.max",
                 ['got "2"', "must be a number"], TYPE, id="gate-string-bound"),
    pytest.param(combined(without_field("spec.dataset.evalSplit"),
                          with_field("spec.evaluation.gate", {"metric": "evalLoss", "max": 2.0})),
                 "spec.evaluation.gate.metric",
                 ['got "evalLoss"', "other than trainLoss needs evaluation data",
                  "spec.dataset.eval or spec.dataset.evalSplit"], CEL, id="gate-eval-loss-without-eval"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "answerAccuracy", "min": 0.8}),
                 "spec.evaluation.gate.metric", ['got "answerAccuracy"', "needs spec.evaluation.generation"],
                 CEL,
                 id="gate-answer-accuracy-without-generation"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "f1", "min": 0.8}),
                 "spec.evaluation.gate.metric",
                 ['got "f1"', "need spec.dataset.format classification"], CEL, id="gate-f1-on-chat"),
    # apiVersion and kind: the CRD serves one version of one kind.
    pytest.param(with_field("apiVersion", "finetune.dev/v1beta1"), "apiVersion",
                 ['got "finetune.dev/v1beta1"', "must be one of 'finetune.dev/v1alpha1'"], IDENTITY,
                 id="wrong-api-version"),
    pytest.param(with_field("kind", "FinetuneJobs"), "kind",
                 ['got "FinetuneJobs"', "must be one of 'FinetuneJob'"], IDENTITY, id="wrong-kind"),
    pytest.param(without_field("apiVersion"), "apiVersion", ["required field is missing"], IDENTITY,
                 id="missing-api-version"),
    pytest.param(without_field("kind"), "kind", ["required field is missing"], IDENTITY, id="missing-kind"),
    # metadata, as the API server's ObjectMeta validation has it.
    pytest.param(without_field("metadata.name"), "metadata.name",
                 ["required field is missing (or metadata.generateName)"], METADATA, id="missing-name"),
    pytest.param(with_field("metadata", {"generateName": "9job-"}), "metadata.generateName",
                 ['got "9job-"', 'metadata.name "9job-xxxxx" must be a DNS-1035 label',
                  "5 random characters"], METADATA, id="generate-name-leading-digit"),
    pytest.param(with_field("metadata", {"generateName": "a" * 48}), "metadata.generateName",
                 [f'metadata.name "{"a" * 48}xxxxx" is longer than 52 characters'], METADATA,
                 id="generate-name-48-characters"),
    pytest.param(with_field("metadata.generateName", "Base_"), "metadata.generateName",
                 ['got "Base_"', "must be the start of a DNS-1123 subdomain"], METADATA,
                 id="generate-name-not-a-subdomain"),
    pytest.param(with_field("metadata.labels", {"team name": "ml"}), "metadata.labels",
                 ['got "team name"', "label keys must be a qualified name"], METADATA, id="label-key-space"),
    pytest.param(with_field("metadata.labels", {"team": "x" * 64}), "metadata.labels.team",
                 ["must be empty, or at most 63 letters"], METADATA, id="label-value-64-characters"),
    pytest.param(with_field("metadata.annotations", {"owner/": "ml"}), "metadata.annotations",
                 ['got "owner/"', "annotation keys must be a qualified name"], METADATA,
                 id="annotation-key-empty-name"),
    pytest.param(with_field("metadata.colour", "red"), "metadata.colour",
                 ["unknown field", "the fields allowed here are: name, generateName, namespace"], UNKNOWN,
                 id="unknown-metadata-field"),
    pytest.param(with_field("status", {"phases": ["Running"]}), "status.phases",
                 ['unknown field (did you mean "phase"?)', "allowed here are: phase, observedGeneration"],
                 UNKNOWN, id="unknown-status-field"),
    # A whole number such as 1.0 passes as an integer, but a CEL rule that reads it cannot evaluate.
    pytest.param(combined(with_field("spec.deepspeed.offload", "cpu"),
                          with_field("spec.deepspeed.zeroStage", 1.0)),
                 "spec.deepspeed.offload",
                 ["rule could not be evaluated", "got float64 (spec.deepspeed.zeroStage is 1.0)"], DECODING,
                 id="integral-float-read-by-a-rule"),
    # YAML that plain loading would silently accept: a duplicate key (the last one would win).
    pytest.param(with_duplicate_key("spec.hyperparameters.epochs", 2), "(document)",
                 ["YAML error at line", "duplicate key 'epochs'"], YAML, id="duplicate-key"),
]  # fmt: skip

# Valid variants of BASE, each a point where the API server accepts what may not look valid.
ACCEPTED = [
    pytest.param(with_field("spec.hyperparameters.seed", 1.0), id="integral-float-for-integer"),
    pytest.param(with_field("spec.resources.cpu", 8.0), id="integral-float-for-int-or-string"),
    pytest.param(with_field("spec.method", None), id="null-for-defaulted-object"),
    pytest.param(with_field("spec.resources.tolerations", None), id="null-for-list"),
    pytest.param(with_field("spec.resources.nodeSelector", {"pool": None}), id="null-map-value"),
    pytest.param(with_field("spec.deepspeed.config", {"zero_optimization": {"overlap_comm": None}}),
                 id="null-kept-in-free-form"),
    pytest.param(with_field("metadata.labels", None), id="null-labels"),
    pytest.param(with_field("metadata", {"generateName": "base-"}), id="generate-name"),
    pytest.param(with_field("metadata.labels", {"example.com/team": "ml", "tier": ""}), id="qualified-label"),
    pytest.param(with_field("status", {"phase": "Walking"}), id="status-value-ignored"),
    pytest.param(with_field("spec.model.adapter", ADAPTER), id="adapter-with-lora"),
    pytest.param(combined(with_field("spec.evaluation.generation", {"maxNewTokens": 64, "match": "exact"}),
                          with_field("spec.evaluation.gate", {"metric": "answerAccuracy", "min": 0.8})),
                 id="gate-on-answer-accuracy"),
    pytest.param(combined(without_field("spec.dataset.evalSplit"),
                          with_field("spec.evaluation.gate", {"metric": "trainLoss", "max": 1.5})),
                 id="gate-on-train-loss-without-eval"),
    pytest.param(combined(with_field("spec.dataset.format", "classification"),
                          with_field("spec.evaluation.gate", {"metric": "f1", "min": 0})),
                 id="gate-on-f1-classification"),
    pytest.param(with_field("spec.evaluation.gate", {"metric": "evalLoss", "max": 2}),
                 id="gate-integer-bound"),
]  # fmt: skip

# Header lines of the CLI's report: `FILE: document N (FinetuneJob "name"): VERDICT`.
HEADER = re.compile(
    r'^(?P<source>.+?): document (?P<index>\d+)(?: \(FinetuneJob "(?P<name>[^"]*)"\))?: (?P<verdict>.+)$'
)


def sections(output: str) -> dict[int, tuple[str, list[str]]]:
    """{document number: (verdict, issue lines)} from the report of one file."""
    found: dict[int, tuple[str, list[str]]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("  ") and current is not None:
            found[current][1].append(line.strip())
        elif match := HEADER.match(line):
            current = int(match["index"])
            found[current] = (match["verdict"], [])
        else:
            current = None
    return found


def write(tmp_path: Path, document: dict[str, Any] | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else to_yaml(document), encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`finetune ARGV...` in this process: (exit code, stdout and stderr)."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def validate(capsys: pytest.CaptureFixture[str], *files: str | Path) -> tuple[int, str]:
    return run_cli(capsys, "validate", *map(str, files))


def console_script() -> str:
    beside = Path(sys.executable).parent / "finetune"
    found = str(beside) if beside.exists() else shutil.which("finetune")
    assert found, "the finetune console script is not installed"
    return found


def run_console(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script(), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


# --- The examples and the base manifest are valid -------------------------------------------------------


def test_base_manifest_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = validate(capsys, write(tmp_path, BASE))
    assert code == 0, output
    assert sections(output)[1] == ("valid", [])


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_is_valid(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = validate(capsys, example)
    assert code == 0, output
    assert sections(output)[1][0] == "valid"
    assert output.splitlines()[-1] == "1 FinetuneJob(s) checked: 1 valid, 0 invalid"


@pytest.mark.parametrize("mutation", ACCEPTED)
def test_accepted_variant_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mutation: Mutation
) -> None:
    code, output = validate(capsys, write(tmp_path, mutation(BASE)))
    assert code == 0, output
    assert sections(output)[1][0] == "valid"


def test_integral_float_is_stored_as_an_integer() -> None:
    job = parse_finetune_job(with_field("spec.hyperparameters.seed", 1.0)(BASE))
    assert defaulted(job)["spec"]["hyperparameters"]["seed"] == 1
    assert type(job.spec.hyperparameters.seed) is int


def test_console_script_validates_every_example() -> None:
    assert len(EXAMPLES) >= 4
    result = run_console("validate", *map(str, EXAMPLES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert "Traceback" not in result.stdout
    for example in EXAMPLES:
        assert re.search(
            rf'^{re.escape(str(example))}: document 1 \(FinetuneJob "[a-z0-9-]+"\): valid$',
            result.stdout,
            re.MULTILINE,
        ), result.stdout
    assert (
        result.stdout.splitlines()[-1]
        == f"{len(EXAMPLES)} FinetuneJob(s) checked: {len(EXAMPLES)} valid, 0 invalid"
    )


# --- Every bad manifest names its field, the value and the rule -------------------------------------------


@pytest.mark.parametrize(("mutation", "path", "expected", "category"), CASES)
def test_bad_manifest_is_reported(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mutation: Mutation,
    path: str,
    expected: list[str],
    category: str,
) -> None:
    file = write(tmp_path, mutation(BASE))
    code, output = validate(capsys, file)
    assert code == 1, output
    assert "Traceback" not in output
    verdict, issues = sections(output)[1]
    assert verdict == "1 error", output  # one mistake, one error: nothing else is blamed
    (issue,) = issues
    assert issue.startswith(f"{path}: "), issue
    for words in expected:
        assert words in issue, issue
    assert output.splitlines()[-1] == "1 FinetuneJob(s) checked: 0 valid, 1 invalid"


def test_every_error_of_a_document_is_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    many = combined(
        without_field("spec.model.uri"),
        with_field("spec.resources.nodes", 0),
        with_field("spec.hyperparameters.precision", "fp8"),
        with_field("spec.method.lora.rank", 8),
    )
    code, output = validate(capsys, write(tmp_path, many(BASE)))
    assert code == 1
    verdict, issues = sections(output)[1]
    assert verdict == "4 errors"
    assert sorted(issue.split(":")[0] for issue in issues) == [
        "spec.hyperparameters.precision",
        "spec.method.lora.rank",
        "spec.model.uri",
        "spec.resources.nodes",
    ]


# --- Multi-document files ---------------------------------------------------------------------------------

SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"}, "stringData": {"a": "b"}}


def test_multi_document_file_reports_each_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first_bad = combined(
        with_field("metadata.name", "bad-one"),
        with_field("spec.resources.nodes", 0),
        with_field("spec.hyperparameters.lrScheduler", "cos"),
    )
    second_bad = combined(
        with_field("metadata.name", "bad-two"), with_field("spec.hyperparameters.maxSteps", 9)
    )
    text = "---\n".join(
        [
            to_yaml(SECRET),
            to_yaml(BASE),
            to_yaml(first_bad(BASE)),
            "",
            to_yaml(second_bad(BASE)),
            "# only a comment\n",
        ]
    )
    file = write(tmp_path, text)
    code, output = validate(capsys, file)
    assert code == 1
    assert "Traceback" not in output
    docs = sections(output)
    assert docs == {
        1: ("skipped, not a FinetuneJob (v1, Secret)", []),
        2: ("valid", []),
        3: (
            "2 errors",
            [
                'spec.hyperparameters.lrScheduler: got "cos"; '
                "must be one of 'cosine', 'linear' or 'constant'",
                "spec.resources.nodes: got 0; must be greater than or equal to 1",
            ],
        ),
        4: ("skipped, empty document", []),
        5: (
            "1 error",
            [
                "spec.hyperparameters.maxSteps: got 9; spec.hyperparameters.epochs and "
                "spec.hyperparameters.maxSteps are mutually exclusive"
            ],
        ),
        6: ("skipped, empty document", []),
    }
    assert f'{file}: document 2 (FinetuneJob "base-job"): valid' in output.splitlines()
    assert f'{file}: document 3 (FinetuneJob "bad-one"): 2 errors' in output.splitlines()
    assert output.splitlines()[-1] == "3 FinetuneJob(s) checked: 1 valid, 2 invalid"


def test_several_files_are_all_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, BASE, "good.yaml")
    bad = write(tmp_path, with_field("spec.resources.gpusPerNode", 17)(BASE), "bad.yaml")
    code, output = validate(capsys, good, bad, *EXAMPLES)
    assert code == 1
    assert f'{good}: document 1 (FinetuneJob "base-job"): valid' in output
    assert f'{bad}: document 1 (FinetuneJob "base-job"): 1 error' in output
    assert (
        output.splitlines()[-1]
        == f"{2 + len(EXAMPLES)} FinetuneJob(s) checked: {1 + len(EXAMPLES)} valid, 1 invalid"
    )


def test_file_without_finetune_jobs_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = validate(capsys, write(tmp_path, SECRET))
    assert code == 1  # nothing was checked: most likely the wrong file
    assert output.splitlines()[-1] == "0 FinetuneJob(s) checked: 0 valid, 0 invalid"


# --- YAML syntax errors, unreadable files and stdin -------------------------------------------------------


def test_yaml_syntax_error_names_document_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = to_yaml(BASE).replace("  output:\n", "  output:\n    uri: s3://a/b: c\n", 1)
    text = to_yaml(BASE) + "---\n" + broken
    error_line = text.splitlines().index("    uri: s3://a/b: c") + 1
    code, output = validate(capsys, write(tmp_path, text))
    assert code == 1
    assert "Traceback" not in output
    docs = sections(output)
    assert docs[1][0] == "valid"
    verdict, (issue,) = docs[2]
    assert verdict == "1 error"
    assert issue.startswith(f"(document): YAML error at line {error_line}, column "), issue
    assert "mapping values are not allowed here" in issue


def test_duplicate_key_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = with_duplicate_key("spec.hyperparameters.epochs", 2)(BASE)
    line = text.splitlines().index("    epochs: 2") + 1
    code, output = validate(capsys, write(tmp_path, text))
    assert code == 1
    assert f"(document): YAML error at line {line}, column 5: duplicate key 'epochs'" in output


def test_missing_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    code, output = validate(capsys, missing, EXAMPLES[0])
    assert code == 1
    assert f"{missing}: cannot read: No such file or directory" in output.splitlines()
    assert "Traceback" not in output


def test_stdin_with_dash() -> None:
    good = run_console("validate", "-", stdin=to_yaml(BASE))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.splitlines()[0] == '-: document 1 (FinetuneJob "base-job"): valid'

    bad = run_console("validate", "-", stdin=to_yaml(with_field("spec.deepspeed.zeroStage", 4)(BASE)))
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[:2] == [
        '-: document 1 (FinetuneJob "base-job"): 1 error',
        "  spec.deepspeed.zeroStage: got 4; must be less than or equal to 3",
    ]
    assert "Traceback" not in bad.stdout + bad.stderr


# --- The committed CRD agrees: its schema rejects the structural cases, its CEL rules the rest ------------


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def crd_validator(crd_schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 keeps draft 4's boolean exclusiveMinimum/exclusiveMaximum.
    jsonschema.Draft4Validator.check_schema(crd_schema)
    return jsonschema.Draft4Validator(crd_schema)


def as_stored(document: dict[str, Any]) -> dict[str, Any]:
    """The manifest with every default applied, as the API server validates and stores it."""
    return defaulted(FinetuneJob.model_validate(document))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_crd_schema_accepts_example(example: Path, crd_validator: jsonschema.Draft4Validator) -> None:
    document = yaml.safe_load(example.read_text(encoding="utf-8"))
    assert list(crd_validator.iter_errors(as_stored(document))) == []
    assert list(crd_validator.iter_errors(document)) == []  # before defaulting too


@pytest.mark.parametrize(
    ("mutation", "path", "expected", "category"), [case for case in CASES if case.values[3] in STRUCTURAL]
)
def test_crd_schema_rejects_structural_case(
    crd_validator: jsonschema.Draft4Validator,
    mutation: Mutation,
    path: str,
    expected: list[str],
    category: str,
) -> None:
    # Defaults first, then the mistake: what the API server validates after its defaulting.
    document = mutation(as_stored(BASE))
    blamed = {dotted(tuple(error.absolute_path)) for error in crd_validator.iter_errors(document)}
    # A missing field is reported on the object that should hold it.
    where = path.rpartition(".")[0] if category == REQUIRED else path
    assert blamed == {where}


@pytest.mark.parametrize(
    ("mutation", "path", "expected", "category"), [case for case in CASES if case.values[3] == CEL]
)
def test_crd_cel_rules_reject_cel_case(
    crd_schema: dict[str, Any],
    crd_validator: jsonschema.Draft4Validator,
    mutation: Mutation,
    path: str,
    expected: list[str],
    category: str,
) -> None:
    document = as_stored(mutation(BASE))  # structurally valid: only a CEL rule rejects it
    assert list(crd_validator.iter_errors(document)) == []
    violations = evaluate_rules(crd_schema, document)
    assert [dotted(violation.path) or "(document)" for violation in violations] == [path]
    assert expected[-1] in violations[0].message


# --- YAML as kubectl reads it ---


def test_unhashable_key_is_a_yaml_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = validate(capsys, write(tmp_path, "? [a, b]\n: 1\n"))
    assert code == 1
    assert "(document): YAML error at line 1" in output


def test_exponent_without_dot_is_a_number(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = to_yaml(BASE).replace("learningRate: 0.0002", "learningRate: 1e-4")
    assert "learningRate: 1e-4" in text
    code, output = validate(capsys, write(tmp_path, text))
    assert code == 0, output


def test_integer_and_boolean_keys_are_not_duplicates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 and true are equal in Python; they are different YAML keys (and both wrong here)."""
    code, output = validate(capsys, write(tmp_path, to_yaml(BASE) + "extra: {1: a, true: b}\n"))
    assert code == 1
    assert "duplicate key" not in output

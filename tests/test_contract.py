"""The worker contract: resolving a FinetuneJob into the trainer's configuration, and its boundaries."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api import spec
from finetune_operator.api.resolve import OPERATOR_ONLY, RENAMED, resolve_trainer_config
from finetune_operator.api.validation import defaulted, parse_finetune_job
from finetune_trainer import config as contract
from finetune_trainer.config import FolderStorageConfig, S3StorageConfig, TrainerConfig, load_trainer_config
from pydantic import BaseModel, ValidationError

from tests.manifests import minimal_manifest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
RESOLVED = Path(__file__).resolve().parent / "data" / "resolved"

BASE = minimal_manifest()


def _job(**spec_overrides: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(BASE)
    for section, value in spec_overrides.items():
        manifest["spec"][section] = {**manifest["spec"].get(section, {}), **value}
    return manifest


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_round_trip_through_the_model(path: Path) -> None:
    job = parse_finetune_job(yaml.safe_load(path.read_text()))
    again = parse_finetune_job(defaulted(job))
    assert again == job
    assert defaulted(again) == defaulted(job)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_resolved_config_round_trips_through_json(path: Path, tmp_path: Path) -> None:
    config = resolve_trainer_config(parse_finetune_job(yaml.safe_load(path.read_text())))
    written = tmp_path / "config.json"
    written.write_text(config.to_json())
    assert load_trainer_config(written) == config


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_resolved_config_of_each_example_is_pinned(path: Path) -> None:
    """Any change to what a worker receives shows up here; regenerate tests/data/resolved/ on purpose."""
    config = resolve_trainer_config(parse_finetune_job(yaml.safe_load(path.read_text())))
    assert json.loads(config.to_json()) == json.loads((RESOLVED / f"{path.stem}.json").read_text())


def test_every_example_has_a_pinned_config() -> None:
    assert sorted(p.stem for p in RESOLVED.glob("*.json")) == [p.stem for p in EXAMPLES]


# Each spec section and the trainer section resolve_trainer_config builds from it.
MAPPED_SECTIONS: list[tuple[type[spec.SpecModel], type[BaseModel]]] = [
    (spec.FinetuneJobSpec, contract.TrainerConfig),
    (spec.ModelSpec, contract.ModelSource),
    (spec.DatasetSpec, contract.DatasetConfig),
    (spec.MethodSpec, contract.MethodConfig),
    (spec.LoraSpec, contract.LoraConfig),
    (spec.FreezeSpec, contract.FreezeConfig),
    (spec.HyperparametersSpec, contract.HyperparametersConfig),
    (spec.DeepSpeedSpec, contract.DeepSpeedSettings),
    (spec.ResourcesSpec, contract.DistributedConfig),
    (spec.StorageSpec, contract.S3StorageConfig),
    (spec.OutputSpec, contract.OutputConfig),
    (spec.EvaluationSpec, contract.EvaluationConfig),
    (spec.RunPolicySpec, contract.RunPolicyConfig),
]


@pytest.mark.parametrize(("spec_section", "trainer_section"), MAPPED_SECTIONS, ids=lambda s: s.__name__)
def test_every_spec_field_reaches_the_trainer_or_is_operator_only(
    spec_section: type[spec.SpecModel], trainer_section: type[BaseModel]
) -> None:
    """A new spec field fails here until the trainer declares it (same name or RENAMED) or it is listed
    in OPERATOR_ONLY, so none is dropped silently on its way to the workers."""
    renamed = RENAMED.get(spec_section, {})
    operator_only = OPERATOR_ONLY.get(spec_section, frozenset())
    dropped = [
        name
        for name in spec_section.model_fields
        if renamed.get(name, name) not in trainer_section.model_fields and name not in operator_only
    ]
    assert dropped == []
    # The tables name real fields, and an operator-only field is not one the trainer reads after all.
    assert set(renamed) | operator_only <= set(spec_section.model_fields)
    assert set(renamed.values()) <= set(trainer_section.model_fields)
    assert not operator_only & set(trainer_section.model_fields)


def test_every_spec_section_the_trainer_reads_has_its_fields_checked() -> None:
    """A new spec section fails here until MAPPED_SECTIONS pairs it with its trainer section."""
    operator_only = OPERATOR_ONLY[spec.FinetuneJobSpec]
    read = {
        info.annotation
        for name, info in spec.FinetuneJobSpec.model_fields.items()
        if name not in operator_only
    }
    assert read <= {spec_section for spec_section, _ in MAPPED_SECTIONS}
    assert set(RENAMED) | set(OPERATOR_ONLY) <= {spec_section for spec_section, _ in MAPPED_SECTIONS}


def _get(config: TrainerConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


RESOLUTION_CASES = [
    pytest.param({}, "hyperparameters.epochs", 1, id="no-length-means-one-epoch"),
    pytest.param(
        {"hyperparameters": {"maxSteps": 50}}, "hyperparameters.epochs", None, id="max-steps-no-epochs"
    ),
    pytest.param({"hyperparameters": {"maxSteps": 50}}, "hyperparameters.max_steps", 50, id="max-steps-kept"),
    pytest.param({}, "method.lora.r", 16, id="lora-defaults-when-omitted"),
    pytest.param({}, "method.lora.target_modules", "all-linear", id="empty-targets-mean-all-linear"),
    pytest.param(
        {"method": {"lora": {"targetModules": ["q_proj", "v_proj"]}}},
        "method.lora.target_modules",
        ["q_proj", "v_proj"],
        id="explicit-targets",
    ),
    pytest.param({"method": {"type": "full"}}, "method.lora", None, id="full-has-no-lora"),
    pytest.param({"method": {"type": "freeze"}}, "method.freeze.trainable_layers", 2, id="freeze-default"),
    pytest.param(
        {"resources": {"gpusPerNode": 0}}, "distributed.processes_per_node", 1, id="cpu-one-process"
    ),
    pytest.param({"resources": {"gpusPerNode": 0}}, "distributed.uses_gpus", False, id="cpu-no-gpus"),
    pytest.param(
        {"resources": {"nodes": 2, "gpusPerNode": 8}},
        "distributed.world_size",
        16,
        id="world-size-nodes-x-gpus",
    ),
    pytest.param({}, "evaluation.every_steps", None, id="no-eval-data-no-evaluation"),
    pytest.param({"dataset": {"evalSplit": 0.1}}, "evaluation.every_steps", 200, id="eval-split-evaluates"),
    pytest.param(
        {"dataset": {"evalSplit": 0.1}, "hyperparameters": {"earlyStopping": {}}},
        "hyperparameters.early_stopping_patience",
        3,
        id="early-stopping-default-patience",
    ),
    pytest.param({}, "storage.endpoint", None, id="empty-endpoint-is-aws"),
    pytest.param(
        {"storage": {"endpoint": "http://minio:9000"}}, "storage.endpoint", "http://minio:9000", id="endpoint"
    ),
    pytest.param(
        {"deepspeed": {"config": {"gradient_clipping": 0.5}}},
        "deepspeed.overrides",
        {"gradient_clipping": 0.5},
        id="raw-overrides-passed-through",
    ),
    pytest.param({}, "job.namespace", "team", id="identity"),
    pytest.param({}, "reporting.progress_port", 29600, id="fixed-progress-port"),
]


@pytest.mark.parametrize(("overrides", "field", "expected"), RESOLUTION_CASES)
def test_resolution(overrides: dict[str, Any], field: str, expected: Any) -> None:
    config = resolve_trainer_config(parse_finetune_job(_job(**overrides)))
    assert _get(config, field) == expected


def test_credentials_never_enter_the_config() -> None:
    config = resolve_trainer_config(parse_finetune_job(_job(storage={"credentialsSecret": "s3-creds"})))
    assert "s3-creds" not in config.to_json()
    assert "credentials" not in config.to_json().lower()


def json_ready(config: TrainerConfig) -> dict[str, Any]:
    return config.model_dump(by_alias=True, mode="json")


INCONSISTENT_CONFIGS = [
    pytest.param(("method", "type"), "full", "lora settings", id="lora-settings-with-full"),
    pytest.param(
        ("hyperparameters", "maxSteps"), 10, "exactly one of epochs and maxSteps", id="both-lengths"
    ),
    pytest.param(("dataset", "evalSplit"), 0.1, "mutually exclusive", id="eval-and-split"),
    pytest.param(("method", "type"), "qlora", "qlora needs GPUs", id="qlora-on-cpu"),
    pytest.param(("hyperparameters", "learningRat"), 0.1, "Extra inputs", id="unknown-key"),
]


@pytest.mark.parametrize(("where", "value", "message"), INCONSISTENT_CONFIGS)
def test_trainer_config_rejects_inconsistent_contracts(
    where: tuple[str, str], value: Any, message: str
) -> None:
    """The trainer re-checks what the operator promised, so a skewed operator cannot start a bad run."""
    manifest = _job(dataset={"eval": "s3://data/eval.jsonl"}, resources={"gpusPerNode": 0})
    document = json_ready(resolve_trainer_config(parse_finetune_job(manifest)))
    document[where[0]][where[1]] = value
    with pytest.raises(ValidationError, match=message):
        TrainerConfig.model_validate(document)


def test_the_operator_always_writes_s3_storage() -> None:
    document = json_ready(resolve_trainer_config(parse_finetune_job(_job())))
    assert document["storage"] == {"kind": "s3", "endpoint": None, "region": None}


def test_a_folder_store_round_trips_through_json(tmp_path: Path) -> None:
    document = json_ready(resolve_trainer_config(parse_finetune_job(_job())))
    document["storage"] = {"kind": "folder", "root": str(tmp_path)}
    written = tmp_path / "config.json"
    written.write_text(TrainerConfig.model_validate(document).to_json())
    assert load_trainer_config(written).storage == FolderStorageConfig(kind="folder", root=str(tmp_path))


def test_a_contract_without_a_storage_kind_is_s3() -> None:
    """ConfigMaps written before the folder store existed still load."""
    document = json_ready(resolve_trainer_config(parse_finetune_job(_job())))
    document["storage"] = {"endpoint": "http://minio:9000", "region": None}
    storage = TrainerConfig.model_validate(document).storage
    assert storage == S3StorageConfig(endpoint="http://minio:9000", region=None)


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        pytest.param(
            {"kind": "folder", "root": "store"}, "storage.root must be an absolute path", id="relative"
        ),
        pytest.param({"kind": "folder"}, "Field required", id="no-root"),
        pytest.param(
            {"kind": "nfs", "root": "/x"}, "'nfs' .* does not match any of the expected tags", id="kind"
        ),
        pytest.param({"kind": "folder", "root": "/x", "endpoint": "http://m"}, "Extra inputs", id="mixed"),
    ],
)
def test_bad_storage_is_refused_by_name(storage: dict[str, Any], message: str) -> None:
    document = json_ready(resolve_trainer_config(parse_finetune_job(_job())))
    document["storage"] = storage
    with pytest.raises(ValidationError, match=message):
        TrainerConfig.model_validate(document)


def test_trainer_config_imports_without_torch_or_the_operator() -> None:
    code = (
        "import sys, finetune_trainer.config\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert not any(m.startswith('finetune_operator') for m in sys.modules), 'operator imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trainer_package_never_imports_the_operator() -> None:
    sources = (ROOT / "trainer" / "src").rglob("*.py")
    offenders = [str(p) for p in sources if "finetune_operator" in p.read_text()]
    assert offenders == []


def test_nothing_shadows_the_standard_operator_module() -> None:
    import operator

    assert not (ROOT / "operator" / "__init__.py").exists()
    assert Path(operator.__file__).parent == Path(sysconfig.get_paths()["stdlib"])

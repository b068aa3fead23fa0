"""The one function that turns a FinetuneJob into the trainer's configuration (the worker contract).

The operator writes its result into the job's ConfigMap, ``finetune run`` hands it to local ranks, and
the trainer reads it: every default and every derived value is decided here, once.

A trainer section is copied from its spec section by field name (:func:`_copy`), so a new spec field
reaches the trainer once the trainer declares it; only what the trainer spells or computes differently is
written out below. ``tests/test_contract.py`` checks that every spec field is copied, renamed or listed in
:data:`OPERATOR_ONLY`. The rules between fields live in the CEL rules of ``spec.py`` (operator side) and
the validators of ``finetune_trainer.config`` (worker side), not here.
"""

from __future__ import annotations

from typing import Any, TypeVar

from finetune_trainer.config import (
    ADAPTER_METHODS,
    DEFAULT_TERMINATION_MESSAGE_PATH,
    PROGRESS_PORT,
    ContractModel,
    DatasetConfig,
    DeepSpeedSettings,
    DistributedConfig,
    EvaluationConfig,
    FreezeConfig,
    GateConfig,
    GenerationConfig,
    HyperparametersConfig,
    JobIdentity,
    LoraConfig,
    MethodConfig,
    ModelSource,
    OutputConfig,
    ReportingConfig,
    RunPolicyConfig,
    S3StorageConfig,
    TrainerConfig,
)

from finetune_operator.api.spec import (
    DeepSpeedSpec,
    FinetuneJob,
    FinetuneJobSpec,
    FreezeSpec,
    HyperparametersSpec,
    LoraSpec,
    ResourcesSpec,
    RunPolicySpec,
    SpecModel,
    StorageSpec,
)

# Gradient-norm clipping; a job can change it through spec.deepspeed.config.gradient_clipping.
DEFAULT_GRADIENT_CLIPPING = 1.0

# Spec fields the trainer declares under another name: {spec field: trainer field}. The value is copied as
# it is, unless resolve_trainer_config derives that trainer field itself.
RENAMED: dict[type[SpecModel], dict[str, str]] = {
    FinetuneJobSpec: {"resources": "distributed"},
    HyperparametersSpec: {"early_stopping": "early_stopping_patience"},
    DeepSpeedSpec: {"config": "overrides"},
    ResourcesSpec: {"gpus_per_node": "processes_per_node"},
}

# Spec fields the trainer never sees: they choose, place and authorise the pods and the job's lifecycle,
# not what a training process does (and credentials must never be written into the config).
OPERATOR_ONLY: dict[type[SpecModel], frozenset[str]] = {
    FinetuneJobSpec: frozenset({"image"}),
    RunPolicySpec: frozenset(
        {"backoff_limit", "active_deadline_seconds", "ttl_seconds_after_finished", "suspend"}
    ),
    ResourcesSpec: frozenset(
        {
            "cpu",
            "memory",
            "node_selector",
            "tolerations",
            "affinity",
            "priority_class_name",
            "scheduler_name",
            "service_account_name",
        }
    ),
    StorageSpec: frozenset({"credentials_secret"}),
}

Section = TypeVar("Section", bound=ContractModel)


def _copy(target: type[Section], source: SpecModel, **derived: Any) -> Section:
    """``target`` from every ``source`` field it declares (by name or through RENAMED), then ``derived``.

    A spec field the trainer does not declare is not passed, so the trainer's strict models stay closed.
    """
    renamed = RENAMED.get(type(source), {})
    copied = {renamed.get(name, name): getattr(source, name) for name in type(source).model_fields}
    known = {name: value for name, value in copied.items() if name in target.model_fields}
    return target.model_validate({**known, **derived})


def _method(job: FinetuneJob) -> MethodConfig:
    method = job.spec.method
    lora = None
    if method.type in ADAPTER_METHODS:
        spec = method.lora or LoraSpec()
        # No modules named: every linear projection, in peft's spelling.
        lora = _copy(LoraConfig, spec, target_modules=list(spec.target_modules) or "all-linear")
    freeze = None
    if method.type == "freeze":
        freeze = _copy(FreezeConfig, method.freeze or FreezeSpec())
    return _copy(MethodConfig, method, lora=lora, freeze=freeze)


def resolve_trainer_config(
    job: FinetuneJob,
    termination_message_path: str = DEFAULT_TERMINATION_MESSAGE_PATH,
    progress_port: int = PROGRESS_PORT,
) -> TrainerConfig:
    """Everything a worker needs, with every default applied; raises if the job is inconsistent.

    ``progress_port`` is where global rank 0 serves /progress: the operator's setting, not the job's."""
    spec = job.spec
    hp = spec.hyperparameters
    dataset = _copy(DatasetConfig, spec.dataset)
    gpus = spec.resources.gpus_per_node
    generation, gate = spec.evaluation.generation, spec.evaluation.gate
    return TrainerConfig(
        job=JobIdentity(name=job.metadata.name or "", namespace=job.metadata.namespace or "default"),
        model=_copy(ModelSource, spec.model),
        dataset=dataset,
        method=_method(job),
        hyperparameters=_copy(
            HyperparametersConfig,
            hp,
            # Neither epochs nor maxSteps: one epoch.
            epochs=1 if hp.epochs is None and hp.max_steps is None else hp.epochs,
            gradient_clipping=DEFAULT_GRADIENT_CLIPPING,
            early_stopping_patience=hp.early_stopping.patience if hp.early_stopping else None,
        ),
        deepspeed=_copy(DeepSpeedSettings, spec.deepspeed),
        # CPU training (0 GPUs) runs one process per node.
        distributed=_copy(
            DistributedConfig, spec.resources, processes_per_node=max(gpus, 1), uses_gpus=gpus > 0
        ),
        # The spec's empty strings mean "the environment's default", which the trainer spells None.
        storage=_copy(
            S3StorageConfig,
            spec.storage,
            endpoint=spec.storage.endpoint or None,
            region=spec.storage.region or None,
        ),
        output=_copy(OutputConfig, spec.output),
        evaluation=_copy(
            EvaluationConfig,
            spec.evaluation,
            every_steps=spec.evaluation.every_steps if dataset.has_eval else None,
            generation=generation and _copy(GenerationConfig, generation),
            gate=gate and _copy(GateConfig, gate),
        ),
        run_policy=_copy(
            RunPolicyConfig,
            spec.run_policy,
            stall_timeout_seconds=spec.run_policy.stall_timeout_seconds or None,
        ),
        reporting=ReportingConfig(
            progress_port=progress_port, termination_message_path=termination_message_path
        ),
    )

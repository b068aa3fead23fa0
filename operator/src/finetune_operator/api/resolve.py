"""The one function that turns a FinetuneJob into the trainer's configuration (the worker contract).

The operator writes its result into the job's ConfigMap, ``finetune run`` hands it to local ranks, and
the trainer reads it: every default and every derived value is decided here, once.
"""

from __future__ import annotations

from finetune_trainer.config import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    PROGRESS_PORT,
    DatasetConfig,
    DeepSpeedSettings,
    DistributedConfig,
    EvaluationConfig,
    FreezeConfig,
    HyperparametersConfig,
    JobIdentity,
    LoraConfig,
    MethodConfig,
    ModelSource,
    OutputConfig,
    ReportingConfig,
    S3StorageConfig,
    TrainerConfig,
)

from finetune_operator.api.spec import FinetuneJob, FreezeSpec, LoraSpec

# Gradient-norm clipping; a job can change it through spec.deepspeed.config.gradient_clipping.
DEFAULT_GRADIENT_CLIPPING = 1.0


def _method(job: FinetuneJob) -> MethodConfig:
    method = job.spec.method
    lora = None
    if method.type in ("lora", "qlora"):
        spec = method.lora or LoraSpec()
        lora = LoraConfig(
            r=spec.r,
            alpha=spec.alpha,
            dropout=spec.dropout,
            target_modules=list(spec.target_modules) or "all-linear",
        )
    freeze = None
    if method.type == "freeze":
        freeze = FreezeConfig(trainable_layers=(method.freeze or FreezeSpec()).trainable_layers)
    return MethodConfig(type=method.type, lora=lora, freeze=freeze)


def resolve_trainer_config(
    job: FinetuneJob, termination_message_path: str = DEFAULT_TERMINATION_MESSAGE_PATH
) -> TrainerConfig:
    """Everything a worker needs, with every default applied; raises if the job is inconsistent."""
    spec = job.spec
    hp = spec.hyperparameters
    has_eval = spec.dataset.eval is not None or spec.dataset.eval_split is not None
    # Neither epochs nor maxSteps: one epoch.
    epochs = 1 if hp.epochs is None and hp.max_steps is None else hp.epochs
    return TrainerConfig(
        job=JobIdentity(name=job.metadata.name or "", namespace=job.metadata.namespace or "default"),
        model=ModelSource(uri=spec.model.uri, trust_remote_code=spec.model.trust_remote_code),
        dataset=DatasetConfig(
            train=spec.dataset.train,
            eval=spec.dataset.eval,
            eval_split=spec.dataset.eval_split,
            format=spec.dataset.format,
            columns=dict(spec.dataset.columns),
            max_seq_length=spec.dataset.max_seq_length,
            packing=spec.dataset.packing,
        ),
        method=_method(job),
        hyperparameters=HyperparametersConfig(
            epochs=epochs,
            max_steps=hp.max_steps,
            learning_rate=hp.learning_rate,
            batch_size_per_device=hp.batch_size_per_device,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            warmup_ratio=hp.warmup_ratio,
            weight_decay=hp.weight_decay,
            lr_scheduler=hp.lr_scheduler,
            precision=hp.precision,
            gradient_checkpointing=hp.gradient_checkpointing,
            gradient_clipping=DEFAULT_GRADIENT_CLIPPING,
            seed=hp.seed,
            early_stopping_patience=hp.early_stopping.patience if hp.early_stopping else None,
        ),
        deepspeed=DeepSpeedSettings(
            zero_stage=spec.deepspeed.zero_stage,
            offload=spec.deepspeed.offload,
            overrides=dict(spec.deepspeed.config),
        ),
        distributed=DistributedConfig(
            nodes=spec.resources.nodes,
            processes_per_node=max(spec.resources.gpus_per_node, 1),
            uses_gpus=spec.resources.gpus_per_node > 0,
        ),
        storage=S3StorageConfig(endpoint=spec.storage.endpoint or None, region=spec.storage.region or None),
        output=OutputConfig(
            uri=spec.output.uri,
            checkpoint_every_steps=spec.output.checkpoint_every_steps,
            keep_checkpoints=spec.output.keep_checkpoints,
            save_merged=spec.output.save_merged,
        ),
        evaluation=EvaluationConfig(every_steps=spec.evaluation.every_steps if has_eval else None),
        reporting=ReportingConfig(
            progress_port=PROGRESS_PORT, termination_message_path=termination_message_path
        ),
    )

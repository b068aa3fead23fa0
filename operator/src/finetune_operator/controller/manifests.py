"""Builds the Kubernetes objects of one FinetuneJob: pure functions from the spec, no I/O.

Workers are bare Pods, one per node, not an Indexed Job:

- Gang restarts are ours to run: any failure tears down every worker and recreates the gang at the
  next attempt, resuming from the newest complete checkpoint. A batch/v1 Job restarts single pods
  (``backoffLimitPerIndex``), which a DeepSpeed gang cannot survive, and adding a Job controller
  between the operator and the pods only delays what the operator must decide anyway.
- Queueing stays at the FinetuneJob level: ``runPolicy.suspend`` is the one switch (Kueue-style
  admission sets it, and may change ``resources`` while it is set), so there is no second,
  Job-level suspend to keep consistent.
- Gang schedulers (Volcano, the coscheduling plugin) schedule pods by ``schedulerName`` and
  pod-group labels whichever controller made them; bare pods with stable names also give the
  stable hostnames (``hostname`` + ``subdomain``) the rendezvous needs without a Job controller.

Every object is owned by the FinetuneJob (ownerReferences), so deleting the job removes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_trainer import worker_env
from finetune_trainer.config import PROGRESS_PORT

from finetune_operator import API_VERSION, KIND
from finetune_operator.api.naming import (
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_NODE_RANK,
    child_labels,
    config_map_name,
    service_name,
    worker_name,
)
from finetune_operator.api.resolve import resolve_trainer_config
from finetune_operator.api.spec import FinetuneJob

# The trainer image of this release; the operator's --default-image (Helm: trainerImage) overrides it.
DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-operator/trainer:0.1.0"
# Worker 0's torchrun store (MASTER_PORT); the operator's --rendezvous-port overrides it.
DEFAULT_RENDEZVOUS_PORT = 29500
CONFIG_DIR = "/etc/finetune"
CONFIG_FILE = "config.json"
WORKSPACE = worker_env.DEFAULT_WORKSPACE
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# Placeholder for `finetune render`, which runs before the API server has assigned a uid.
UNASSIGNED_UID = "assigned-by-the-api-server"


@dataclass(frozen=True)
class WorkerSettings:
    """The operator's own configuration that shapes worker pods."""

    default_image: str
    # Time between SIGTERM and SIGKILL: the trainer saves a checkpoint in it when it can.
    termination_grace_seconds: int = 300
    # Minutes before a collective operation gives up (DEEPSPEED_TIMEOUT); slow image pulls on other
    # nodes must not kill the ranks that started first.
    process_group_timeout_minutes: int = worker_env.DEFAULT_PROCESS_GROUP_TIMEOUT_MINUTES
    # Seconds the launcher waits for worker 0's DNS name and torchrun's rendezvous waits for peers.
    rendezvous_timeout_seconds: int = worker_env.DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS
    run_as_user: int = 1000
    # Worker 0's rendezvous port (torchrun's store) and global rank 0's /progress and /metrics port:
    # container ports, the Service, the readiness probe, MASTER_PORT and the trainer's configuration.
    rendezvous_port: int = DEFAULT_RENDEZVOUS_PORT
    progress_port: int = PROGRESS_PORT

    def __post_init__(self) -> None:
        for name in ("rendezvous_port", "progress_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be a port number (1-65535), got {getattr(self, name)}")
        if self.rendezvous_port == self.progress_port:
            raise ValueError(f"the rendezvous and progress ports must differ (both are {self.progress_port})")

    @property
    def stop_grace_seconds(self) -> int:
        """What the trainer may take for a stop: the grace period less the margin it keeps for
        ending itself before the kubelet's SIGKILL (at least a second)."""
        return max(1, self.termination_grace_seconds - worker_env.STOP_GRACE_MARGIN_SECONDS)


def owner_reference(job: FinetuneJob, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FinetuneJob, uid: str, name: str, extra_labels: dict[str, str]) -> dict[str, Any]:
    assert job.metadata.name is not None
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": {**child_labels(job.metadata.name), **extra_labels},
        "ownerReferences": [owner_reference(job, uid)],
    }


def build_service(job: FinetuneJob, uid: str, settings: WorkerSettings) -> dict[str, Any]:
    """Headless, publishing not-ready pods, so that worker 0's DNS name exists before it is ready."""
    assert job.metadata.name is not None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, uid, service_name(job.metadata.name), {LABEL_COMPONENT: "rendezvous"}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {**child_labels(job.metadata.name), LABEL_COMPONENT: "worker"},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": settings.rendezvous_port,
                    "targetPort": settings.rendezvous_port,
                }
            ],
        },
    }


def build_config_map(job: FinetuneJob, uid: str, settings: WorkerSettings) -> dict[str, Any]:
    """The resolved trainer configuration, validated by the trainer's own model."""
    assert job.metadata.name is not None
    config = resolve_trainer_config(
        job, termination_message_path=TERMINATION_MESSAGE_PATH, progress_port=settings.progress_port
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, uid, config_map_name(job.metadata.name), {LABEL_COMPONENT: "config"}),
        "data": {CONFIG_FILE: config.to_json()},
    }


def _credentials_env(secret: str) -> list[dict[str, Any]]:
    """S3 credentials as references to the job's own Secret: never values, never another namespace."""

    def ref(name: str, optional: bool) -> dict[str, Any]:
        key_ref: dict[str, Any] = {"name": secret, "key": name}
        if optional:
            key_ref["optional"] = True
        return {"name": name, "valueFrom": {"secretKeyRef": key_ref}}

    return [ref(name, False) for name in worker_env.CREDENTIALS] + [
        ref(name, True) for name in worker_env.OPTIONAL_CREDENTIALS
    ]


def _env(job: FinetuneJob, node_rank: int, settings: WorkerSettings) -> list[dict[str, Any]]:
    assert job.metadata.name is not None
    resources = job.spec.resources
    values = worker_env.worker_environment(
        config_path=f"{CONFIG_DIR}/{CONFIG_FILE}",
        nnodes=resources.nodes,
        node_rank=node_rank,
        nproc_per_node=max(resources.gpus_per_node, 1),
        master_addr=master_address(job.metadata.name),
        master_port=settings.rendezvous_port,
        termination_message_path=TERMINATION_MESSAGE_PATH,
        workspace=WORKSPACE,
        scratch_in_workspace=True,
        rendezvous_timeout_seconds=settings.rendezvous_timeout_seconds,
        process_group_timeout_minutes=settings.process_group_timeout_minutes,
        stop_grace_seconds=settings.stop_grace_seconds,
    )
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in values.items()]
    env.append({"name": worker_env.POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    if job.spec.storage.credentials_secret:
        env += _credentials_env(job.spec.storage.credentials_secret)
    return env


def master_address(job_name: str) -> str:
    """Worker 0's DNS name under the headless Service (resolved through the namespace's search path)."""
    return f"{worker_name(job_name, 0)}.{service_name(job_name)}"


def _resources(job: FinetuneJob) -> dict[str, Any]:
    spec = job.spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if spec.cpu is not None:
        requests["cpu"] = str(spec.cpu)
    if spec.memory is not None:
        requests["memory"] = limits["memory"] = str(spec.memory)
    if spec.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    result: dict[str, Any] = {}
    if requests:
        result["requests"] = requests
    if limits:
        result["limits"] = limits
    return result


def build_worker_pod(
    job: FinetuneJob, uid: str, node_rank: int, attempt: int, settings: WorkerSettings
) -> dict[str, Any]:
    """One node of the gang: the launcher waits for worker 0's DNS name, then runs torchrun."""
    assert job.metadata.name is not None
    spec = job.spec
    resources = spec.resources
    container: dict[str, Any] = {
        "name": "trainer",
        "image": spec.image or settings.default_image,
        # An argv list: nothing from the spec reaches a shell.
        "command": ["python", "-m", "finetune_trainer.launch"],
        "env": _env(job, node_rank, settings),
        "ports": [
            {"name": "rendezvous", "containerPort": settings.rendezvous_port},
            {"name": "progress", "containerPort": settings.progress_port},
        ],
        "resources": _resources(job),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "workspace", "mountPath": WORKSPACE},
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if node_rank == 0:
        # Global rank 0 answers /progress once training runs: Ready means the job is Running.
        container["readinessProbe"] = {
            "httpGet": {"path": "/progress", "port": settings.progress_port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": worker_name(job.metadata.name, node_rank),
        "subdomain": service_name(job.metadata.name),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job.metadata.name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "workspace", "emptyDir": {}},
        ],
    }
    for key, value in (
        ("nodeSelector", dict(resources.node_selector)),
        ("tolerations", [t.model_dump(by_alias=True, exclude_none=True) for t in resources.tolerations]),
        ("affinity", dict(resources.affinity)),
        ("priorityClassName", resources.priority_class_name),
        ("schedulerName", resources.scheduler_name),
        ("serviceAccountName", resources.service_account_name),
    ):
        if value:
            pod_spec[key] = value
    labels = {LABEL_COMPONENT: "worker", LABEL_NODE_RANK: str(node_rank), LABEL_ATTEMPT: str(attempt)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(job, uid, worker_name(job.metadata.name, node_rank), labels),
        "spec": pod_spec,
    }


def build_gang(job: FinetuneJob, uid: str, attempt: int, settings: WorkerSettings) -> list[dict[str, Any]]:
    """Everything one attempt needs, in creation order: Service, ConfigMap, then one pod per node."""
    return [
        build_service(job, uid, settings),
        build_config_map(job, uid, settings),
        *(build_worker_pod(job, uid, rank, attempt, settings) for rank in range(job.spec.resources.nodes)),
    ]

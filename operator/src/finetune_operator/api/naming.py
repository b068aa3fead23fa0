"""Deterministic names of the objects one FinetuneJob owns, and the name-length limit they imply.

Names are derived from the job's name alone so that a restarted operator finds the children it made
instead of creating duplicates.
"""

# Kubernetes labels, Service names and pod hostnames are DNS labels of at most 63 characters.
DNS_LABEL_MAX = 63
MAX_NODES = 512
_WORKER_SUFFIX = "-worker-"
_LONGEST_CHILD_SUFFIX = f"{_WORKER_SUFFIX}{MAX_NODES - 1}"

# The longest job name whose every child name stays a valid DNS label.
MAX_JOB_NAME_LENGTH = DNS_LABEL_MAX - len(_LONGEST_CHILD_SUFFIX)


def worker_name(job_name: str, node_rank: int) -> str:
    """The pod (and hostname) of one node of the gang."""
    return f"{job_name}{_WORKER_SUFFIX}{node_rank}"


def service_name(job_name: str) -> str:
    """The headless Service that gives each worker a stable DNS name."""
    return f"{job_name}-workers"


def config_map_name(job_name: str) -> str:
    """The ConfigMap holding the resolved trainer configuration."""
    return f"{job_name}-config"


# Labels on every child; the operator finds a job's pods by LABEL_JOB.
LABEL_JOB = "finetune.dev/job-name"
LABEL_NODE_RANK = "finetune.dev/node-rank"
# The gang's attempt (status.restarts when it was created), so that pods of an attempt being torn
# down are never mistaken for the current one.
LABEL_ATTEMPT = "finetune.dev/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"


def child_labels(job_name: str) -> dict[str, str]:
    """Labels shared by every object one job owns."""
    return {LABEL_JOB: job_name, LABEL_MANAGED_BY: MANAGED_BY}

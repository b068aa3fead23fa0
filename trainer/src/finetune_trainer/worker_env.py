"""The environment of one worker node: the other half of the worker contract, next to config.py.

The operator puts it into each worker pod's env and ``finetune run`` into its local launcher's, both
through :func:`worker_environment`, and the launcher and the trainer read it by these names, so no
name is spelled in two places. Like config.py it imports nothing heavy: the operator has no torch.
"""

from __future__ import annotations

# What the launcher passes to torchrun (all required: launch.py refuses to start without them).
FINETUNE_CONFIG = "FINETUNE_CONFIG"
NNODES = "NNODES"
NODE_RANK = "NODE_RANK"
NPROC_PER_NODE = "NPROC_PER_NODE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
REQUIRED = (NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT, FINETUNE_CONFIG)

RENDEZVOUS_TIMEOUT_SECONDS = "RENDEZVOUS_TIMEOUT_SECONDS"
DEEPSPEED_TIMEOUT = "DEEPSPEED_TIMEOUT"
TERMINATION_MESSAGE_PATH = "TERMINATION_MESSAGE_PATH"
FINETUNE_WORKSPACE = "FINETUNE_WORKSPACE"
# The seconds a stop (SIGTERM) may take: a rank still running after them ends itself (see gang.py),
# so it is the pod's terminationGracePeriodSeconds less a margin for the kubelet.
STOP_GRACE_SECONDS = "STOP_GRACE_SECONDS"
# Only in pods, whose root filesystem is read-only: the scratch folders under the workspace.
SCRATCH_DIRS = {"HOME": "home", "TMPDIR": "tmp", "HF_HOME": "hf"}
# Only in pods, as Kubernetes references rather than values (the downward API, the job's Secret).
POD_NAME = "POD_NAME"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_CREDENTIALS = ("AWS_SESSION_TOKEN",)

DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS = 1800
DEFAULT_PROCESS_GROUP_TIMEOUT_MINUTES = 30
DEFAULT_WORKSPACE = "/workspace"
DEFAULT_STOP_GRACE_SECONDS = 300
# What a rank keeps of the grace period for ending itself after a stop it could not finish.
STOP_GRACE_MARGIN_SECONDS = 10


def worker_environment(
    *,
    config_path: str,
    nnodes: int,
    node_rank: int,
    nproc_per_node: int,
    master_addr: str,
    master_port: int,
    termination_message_path: str,
    workspace: str,
    scratch_in_workspace: bool = False,
    rendezvous_timeout_seconds: int = DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS,
    process_group_timeout_minutes: int = DEFAULT_PROCESS_GROUP_TIMEOUT_MINUTES,
    stop_grace_seconds: int = DEFAULT_STOP_GRACE_SECONDS,
) -> dict[str, str]:
    """The plain-valued variables of one node, the same names wherever it runs."""
    env = {
        FINETUNE_CONFIG: config_path,
        NNODES: str(nnodes),
        NODE_RANK: str(node_rank),
        NPROC_PER_NODE: str(nproc_per_node),
        MASTER_ADDR: master_addr,
        MASTER_PORT: str(master_port),
        RENDEZVOUS_TIMEOUT_SECONDS: str(rendezvous_timeout_seconds),
        DEEPSPEED_TIMEOUT: str(process_group_timeout_minutes),
        # A rank that sees a peer's NCCL failure aborts instead of hanging until the timeout.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        TERMINATION_MESSAGE_PATH: termination_message_path,
        STOP_GRACE_SECONDS: str(stop_grace_seconds),
        FINETUNE_WORKSPACE: workspace,
        # Models come from the job's storage, never from the Hub.
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if scratch_in_workspace:
        env.update({name: f"{workspace}/{folder}" for name, folder in SCRATCH_DIRS.items()})
    return env

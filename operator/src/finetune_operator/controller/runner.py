"""``finetune-operator``: runs the operator with production kopf settings.

Watch scope (namespaces or the whole cluster), peering for several replicas, a liveness endpoint,
Prometheus metrics, JSON logs and the default trainer image are all flags (or environment
variables, for the Helm chart).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections.abc import Sequence

import kopf
from finetune_trainer.config import PROGRESS_PORT
from prometheus_client import start_http_server

from finetune_operator.api.memory_fit import parse_memory
from finetune_operator.controller.handlers import OperatorContext, build_registry, post_event
from finetune_operator.controller.kube import KubeApi, load_api_client
from finetune_operator.controller.manifests import (
    DEFAULT_RENDEZVOUS_PORT,
    DEFAULT_TRAINER_IMAGE,
    WorkerSettings,
)
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.progress import ProgressPoller
from finetune_operator.controller.reconciler import Reconciler


def _priority(value: str) -> int:
    if value == "random":
        return random.SystemRandom().randint(1, 2**31 - 1)
    return int(value)


def _gpu_memory(text: str) -> int | None:
    """Bytes of one GPU from "80GiB", "81559MiB" or a bare number of MiB; empty: unknown."""
    if not text.strip():
        return None
    try:
        return parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _boolean(text: str) -> bool:
    """true or false, as the chart writes a boolean into the environment; anything else is argparse's
    usage error at startup (it converts a string default with ``type``, as for --gpu-memory)."""
    word = text.strip().lower()
    if word not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return word == "true"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="finetune-operator", description="Runs the FinetuneJob operator.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        action="append",
        default=[n for n in env("FINETUNE_NAMESPACES", "").split(",") if n],
        help="namespace to watch (repeat for several; glob patterns allowed). Default: the whole cluster",
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace (the default)")
    parser.add_argument(
        "--default-image",
        default=env("FINETUNE_DEFAULT_IMAGE", DEFAULT_TRAINER_IMAGE),
        help="trainer image for jobs that name none (env FINETUNE_DEFAULT_IMAGE)",
    )
    parser.add_argument(
        "--peering",
        default=env("FINETUNE_PEERING", ""),
        help="kopf peering name: replicas with the same name elect one active operator. Default: standalone",
    )
    parser.add_argument(
        "--priority",
        type=_priority,
        default=_priority(env("FINETUNE_PRIORITY", "0")),
        help="peering priority; 'random' gives each replica its own (kopf pauses peers of equal priority)",
    )
    parser.add_argument("--liveness-port", type=int, default=int(env("FINETUNE_LIVENESS_PORT", "8080")))
    parser.add_argument("--metrics-port", type=int, default=int(env("FINETUNE_METRICS_PORT", "9090")))
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(env("FINETUNE_RESYNC_SECONDS", "30")),
        help="look at every job at least this often, even without events",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=float(env("FINETUNE_PROGRESS_INTERVAL", "10")),
        help="seconds between polls of a running job's /progress",
    )
    parser.add_argument(
        "--progress-rate",
        type=float,
        default=float(env("FINETUNE_PROGRESS_RATE", "50")),
        help="polls per second across all jobs, so that many jobs cannot flood the API server",
    )
    parser.add_argument(
        "--termination-grace-seconds",
        type=int,
        default=int(env("FINETUNE_TERMINATION_GRACE_SECONDS", "300")),
        help="workers' time between SIGTERM and SIGKILL, to save a checkpoint",
    )
    parser.add_argument(
        "--rendezvous-port",
        type=int,
        default=int(env("FINETUNE_RENDEZVOUS_PORT", str(DEFAULT_RENDEZVOUS_PORT))),
        help="worker 0's rendezvous port (torchrun's MASTER_PORT) in every job",
    )
    parser.add_argument(
        "--progress-port",
        type=int,
        default=int(env("FINETUNE_PROGRESS_PORT", str(PROGRESS_PORT))),
        help="worker 0's /progress and /metrics port in every job (its readiness probe; polled here)",
    )
    parser.add_argument(
        "--gpu-memory",
        type=_gpu_memory,
        default=env("FINETUNE_GPU_MEMORY", ""),
        metavar="SIZE",
        help="memory of one GPU (80GiB, 81559MiB) for the MemoryFit check of jobs that declare their model's "
        "shape; a job's nodeSelector on nvidia.com/gpu.memory, or the nodes it matches, override it. "
        "Default: unknown (no check)",
    )
    parser.add_argument(
        "--gpu-memory-from-nodes",
        action=argparse.BooleanOptionalAction,
        default=env("FINETUNE_GPU_MEMORY_FROM_NODES", "true"),
        type=_boolean,
        help="read the GPU memory of the nodes a job's nodeSelector matches from their nvidia.com/gpu.memory "
        "labels (the smallest); needs list and watch on nodes cluster-wide (env "
        "FINETUNE_GPU_MEMORY_FROM_NODES). Default: on",
    )
    parser.add_argument("--log-format", choices=["json", "plain"], default=env("FINETUNE_LOG_FORMAT", "json"))
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def operator_memo(
    api: KubeApi,
    settings: WorkerSettings,
    metrics: OperatorMetrics,
    poller: ProgressPoller,
    resync_seconds: float,
    gpu_memory: int | None = None,
) -> kopf.Memo:
    """What the kopf handlers run on: the reconciler over the API. The tests build the operator
    through this too, so that what they run is what this runner runs."""
    reconciler = Reconciler(api, settings, metrics, post_event, poller, gpu_memory=gpu_memory)
    return kopf.Memo(context=OperatorContext(reconciler=reconciler, resync_seconds=resync_seconds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = WorkerSettings(
            default_image=args.default_image,
            termination_grace_seconds=args.termination_grace_seconds,
            rendezvous_port=args.rendezvous_port,
            progress_port=args.progress_port,
        )
    except ValueError as error:
        parser.error(str(error))
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    registry = build_registry(gpu_memory_from_nodes=args.gpu_memory_from_nodes)
    # In-cluster service account or kubeconfig, as the kubernetes client finds them.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    metrics = OperatorMetrics()
    start_http_server(args.metrics_port, registry=metrics.registry)
    poller = ProgressPoller(
        interval=args.progress_interval, rate=args.progress_rate, port=settings.progress_port
    )
    memo = operator_memo(
        KubeApi(load_api_client()), settings, metrics, poller, args.resync_seconds, args.gpu_memory
    )
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                memo=memo,
                namespaces=args.namespace,  # empty with clusterwide: kopf wants a collection, never None
                clusterwide=not args.namespace,
                standalone=not args.peering,
                peering_name=args.peering or None,
                priority=args.priority,
                liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The operator at scale on the real control plane: time from `kubectl apply` of 20 two-node FinetuneJobs
to their 40 worker pods, and the API requests the operator makes per job.

Why: what a user waits for after `kubectl apply` is the operator's share (see each job, create its
Service, ConfigMap and pods) before the scheduler can place the gang, and what the API server pays for
a job is every request the operator makes for it. The tests' emulated API answers in microseconds and
has no admission, etcd, RBAC or scheduler, so neither figure would mean much there; here both come from
the real kube-apiserver, etcd and kube-scheduler (tests/kube/controlplane.py).

Set up once: a fresh control plane with the API server's audit log on, the CRD, 8-GPU nodes (the tests'
four, plus as many as one round's pods need), and the Helm chart's RBAC granted to the chart's
ServiceAccount: the default values (cluster-wide), or with ``--watch namespace`` the chart's namespaced
mode (``watchNamespaces``: every round's namespace, created up front). Each round, in a fresh namespace:
1. ``finetune-operator`` starts as a real process, logged in with the ServiceAccount's kubeconfig, JSON
   logs to a file: ``--all-namespaces`` as the chart's default Deployment runs it, or ``--namespace``
   the round's. It is restarted every round, so its startup is measured every round, and it is ready
   when its liveness endpoint answers 200 and the audit log shows its watches of FinetuneJobs and pods.
2. One multi-document YAML of the jobs is applied with the real kubectl (client-side apply), while a
   watch (from a list's resourceVersion taken before the apply, so nothing is missed) records when
   each worker pod first appears and when the scheduler binds it.
3. After ``--settle`` more seconds, with the operator still running (its finalizers must come off),
   `kubectl delete` the jobs, then the namespace, a node agent completing the pods' graceful
   deletion; then the operator stops.

Figures, all from the start of `kubectl apply`: the last pod created and bound as the watch saw them,
the last pod's create as the audit log has it (the API server's own clock: no watch delay), per job
the time to its last pod (p50/p90/max), and the operator's requests from the audit log by verb and
resource (``AuditLog`` says how a request is counted) in four windows: startup (operator start to the
apply), apply (to the last pod seen), settle (the ``--settle`` seconds after it) and teardown (the
jobs' and the namespace's deletion); failed requests (4xx/5xx) are listed apart. Also: the operator's
time to ready, kubectl's own time, the operator's CPU seconds, and how long the API server took over
the operator's requests (audit: stageTimestamp - requestReceivedTimestamp).

    .venv/bin/python benchmarks/operator_scale.py --repeat 3 --json operator-scale.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tests' control plane and cluster helpers, when run as a script

from finetune_operator.api.naming import LABEL_JOB  # noqa: E402

from tests.kube.cluster import GPU_NODES, GPUS_PER_NODE, Identity, RealCluster, chart_rbac, set_up  # noqa: E402
from tests.kube.controlplane import ControlPlane, running_control_plane  # noqa: E402
from tests.kube.nodes import NodeAgent, register_node  # noqa: E402
from tests.kube.operator_process import OperatorProcess  # noqa: E402
from tests.kube.semantics import FINETUNEJOBS  # noqa: E402
from tests.test_chart import render  # noqa: E402
from tests.test_operator import manifest  # noqa: E402

NODES_PER_JOB = 2  # manifest()'s default: 2 nodes x 1 GPU
READY_TIMEOUT = 120.0  # seconds for the operator to start
TEARDOWN_TIMEOUT = 120.0  # seconds for a round's namespace to go
STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL for the operator
WINDOWS = ("startup", "apply", "settle", "teardown")
PER_ROUND = ("startup",)  # windows counted per round; the others per job
DISCOVERY = "discovery (/api, /apis/...)"
Key = tuple[str, ...]  # (verb, resource), or (verb, resource, code) for failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20, help="FinetuneJobs per round (2 nodes x 1 GPU each)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each in a fresh namespace")
    parser.add_argument(
        "--watch",
        choices=["cluster", "namespace"],
        default="cluster",
        help="the chart's default, cluster-wide (--all-namespaces), or its namespaced mode (--namespace)",
    )
    parser.add_argument("--settle", type=float, default=5.0, help="seconds counted after the last pod")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a round may take to bind")
    parser.add_argument("--json", type=Path, help="write the JSON summary here too")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (logs, audit log)")
    return parser.parse_args(argv)


# --- The audit log -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One API request, from its audit event."""

    user: str
    verb: str
    resource: str  # "pods", "finetunejobs/status", DISCOVERY, or another non-resource path ("/version")
    namespace: str  # "" for cluster-scoped and cluster-wide requests
    code: int
    received: float  # epoch seconds: when the request arrived (requestReceivedTimestamp)
    answered: float  # epoch seconds: when the event's stage was reached (stageTimestamp)


def _epoch(timestamp: str) -> float:
    return datetime.datetime.fromisoformat(timestamp).timestamp()


def _request(event: dict[str, Any]) -> Request:
    ref = event.get("objectRef") or {}
    if ref.get("resource"):
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    else:  # a non-resource URL: discovery (one request a group version), /version, /healthz
        path = event["requestURI"].split("?", 1)[0]
        resource = DISCOVERY if path.startswith(("/api/", "/apis/")) or path in ("/api", "/apis") else path
    return Request(
        user=event["user"]["username"],
        verb=event["verb"],
        resource=resource,
        namespace=ref.get("namespace", ""),
        code=int((event.get("responseStatus") or {}).get("code", 0)),
        received=_epoch(event["requestReceivedTimestamp"]),
        answered=_epoch(event["stageTimestamp"]),
    )


@dataclasses.dataclass
class AuditLog:
    """The API server's audit log (JSON lines), read as it grows, every request counted once.

    The counting rule. With ``tests.kube.controlplane.AUDIT_POLICY`` (stage RequestReceived omitted), a
    request writes one event once the API server has answered it, at stage ResponseComplete; a
    long-running request, a watch, writes one more before that, at ResponseStarted, when the server
    sends the headers and the stream begins, and its ResponseComplete only when the watch ends, minutes
    later or after the log was read. So a watch counts at its ResponseStarted event and every other
    request at its ResponseComplete, each once, placed in time by requestReceivedTimestamp (when it
    arrived). A watch that the client reopens counts again, as the API server serves it again.
    """

    path: Path
    requests: list[Request] = dataclasses.field(default_factory=list)
    _offset: int = 0

    def read(self) -> list[Request]:
        """The requests logged since the last read (whole lines only), also kept in ``requests``."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as log:
            log.seek(self._offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        new = []
        for line in complete.splitlines():
            event = json.loads(line)
            if event["stage"] == ("ResponseStarted" if event["verb"] == "watch" else "ResponseComplete"):
                new.append(_request(event))
        self.requests.extend(new)
        return new

    def of(self, user: str, start: float, end: float) -> list[Request]:
        """The user's requests that arrived in [start, end)."""
        return [r for r in self.requests if r.user == user and start <= r.received < end]


# --- Processes ---------------------------------------------------------------------------------------


def cpu_seconds(operator: OperatorProcess) -> float:
    """User and system CPU time the operator has used so far (/proc)."""
    fields = Path(f"/proc/{operator.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_running(operator: OperatorProcess, doing: str) -> None:
    if operator.process.poll() is not None:
        raise RuntimeError(f"the operator exited {operator.process.returncode} {doing}:\n{operator.tail()}")


@contextlib.contextmanager
def operator_process(kubeconfig: Path, scope: str, log: Path) -> Iterator[OperatorProcess]:
    """``finetune-operator`` as the kubeconfig's user, ``scope`` its watch flag; stopped at exit."""
    log.unlink(missing_ok=True)
    operator = OperatorProcess(kubeconfig, scope, log)
    try:
        yield operator
    finally:
        operator.stop(STOP_GRACE)


def wait_until_ready(
    operator: OperatorProcess, audit: AuditLog, user: str, since: float, namespace: str
) -> None:
    """Liveness answers 200 and the operator watches FinetuneJobs and pods (in ``namespace``, "" for all)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        check_running(operator, "at startup")
        audit.read()
        watching = {
            r.resource
            for r in audit.of(user, since, math.inf)
            if r.verb == "watch" and r.namespace == namespace
        }
        if {"finetunejobs", "pods"} <= watching and operator.healthy():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the operator was not ready in {READY_TIMEOUT} s (watching {watching}):\n{operator.tail()}"
            )
        time.sleep(0.05)


def kubectl(plane: ControlPlane, *args: str) -> float:
    """The real kubectl as the admin, with the cluster's discovery cache; returns when it ended (epoch s)."""
    command = [
        str(plane.bin_dir / "kubectl"),
        f"--kubeconfig={plane.kubeconfig_path}",
        f"--cache-dir={plane.directory / 'kubectl-cache'}",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return time.time()


# --- Watching the pods -------------------------------------------------------------------------------


@dataclasses.dataclass
class PodTimes:
    job: str
    created: float  # epoch seconds: when the watch first saw the pod
    bound: float | None = None  # ... first saw it on a node


def list_resource_version(core: kubernetes.client.CoreV1Api, namespace: str) -> str:
    answer = core.list_namespaced_pod(namespace, label_selector=LABEL_JOB, _preload_content=False)
    return json.loads(answer.data)["metadata"]["resourceVersion"]


def follow_pods(
    core: kubernetes.client.CoreV1Api, namespace: str, resource_version: str, expected: int, deadline: float
) -> dict[str, PodTimes]:
    """Watch the namespace's worker pods from ``resource_version`` until ``expected`` of them are bound."""
    pods: dict[str, PodTimes] = {}
    watch = kubernetes.watch.Watch()

    def done() -> bool:
        return len(pods) >= expected and all(p.bound is not None for p in pods.values())

    while not done():
        remaining = deadline - time.time()
        if remaining <= 0:
            bound = sum(p.bound is not None for p in pods.values())
            raise TimeoutError(f"{len(pods)} of {expected} pods created, {bound} bound, in {namespace}")
        stream = watch.stream(
            core.list_namespaced_pod,
            namespace,
            label_selector=LABEL_JOB,
            resource_version=resource_version,
            timeout_seconds=max(int(remaining), 1),
            deserialize=False,  # plain dicts: the client's models cost milliseconds an event
        )
        for event in stream:
            now = time.time()
            meta, spec = event["object"]["metadata"], event["object"]["spec"]
            resource_version = meta["resourceVersion"]
            times = pods.setdefault(meta["name"], PodTimes(meta["labels"][LABEL_JOB], now))
            if times.bound is None and spec.get("nodeName"):
                times.bound = now
            if done():
                watch.stop()
    return pods


# --- One round ---------------------------------------------------------------------------------------


def jobs_yaml(namespace: str, jobs: int) -> str:
    """One multi-document YAML of ``jobs`` two-node FinetuneJobs, as a user would write it."""
    documents = []
    for index in range(jobs):
        job = manifest(f"job-{index:02d}")
        job["metadata"]["namespace"] = namespace
        documents.append(yaml.safe_dump(job, sort_keys=False))
    return "---\n".join(documents)


@dataclasses.dataclass
class Round:
    """What one round saw; times in epoch seconds."""

    namespace: str
    started: float  # the operator's start
    applied: float  # the start of kubectl apply
    kubectl_ended: float
    pods: dict[str, PodTimes]
    settled: float  # the end of the settle window, when the teardown began
    torn_down: float  # the jobs and the namespace gone
    audit_created: float  # the API server's answer to the last pod create
    operator_cpu: float  # CPU seconds the operator used from its start to the end of the settle window

    @property
    def last_created(self) -> float:
        return max(p.created for p in self.pods.values())

    @property
    def last_bound(self) -> float:
        return max(p.bound or math.inf for p in self.pods.values())

    def job_latencies(self) -> list[float]:
        """Per job: from the apply to its last pod seen."""
        last: dict[str, float] = {}
        for pod in self.pods.values():
            last[pod.job] = max(last.get(pod.job, 0.0), pod.created)
        return [at - self.applied for at in last.values()]

    def windows(self) -> dict[str, tuple[float, float]]:
        return {
            "startup": (self.started, self.applied),
            "apply": (self.applied, self.last_created),
            "settle": (self.last_created, self.settled),
            "teardown": (self.settled, self.torn_down),
        }


@dataclasses.dataclass
class Setup:
    cluster: RealCluster
    core: kubernetes.client.CoreV1Api  # the admin's, for the watch of the pods
    identity: Identity
    user: str  # the ServiceAccount's name in the audit log
    audit: AuditLog
    namespaces: list[str]  # one per round
    watch: str  # "cluster" or "namespace"


def run_round(setup: Setup, namespace: str, args: argparse.Namespace, work: Path) -> Round:
    jobs = work / f"{namespace}.yaml"
    jobs.write_text(jobs_yaml(namespace, args.jobs))
    scope = f"--namespace={namespace}" if setup.watch == "namespace" else "--all-namespaces"
    started = time.time()
    with operator_process(setup.identity.kubeconfig, scope, work / f"operator-{namespace}.log") as operator:
        watched = namespace if setup.watch == "namespace" else ""
        wait_until_ready(operator, setup.audit, setup.user, started, watched)
        applied, kubectl_ended, pods = apply_and_follow(setup, namespace, jobs, args)
        time.sleep(max(max(pod.created for pod in pods.values()) + args.settle - time.time(), 0.0))
        settled, operator_cpu = time.time(), cpu_seconds(operator)
        teardown(setup.cluster, namespace, jobs, operator)
        torn_down = time.time()
    setup.audit.read()
    created = max(
        r.answered
        for r in setup.audit.of(setup.user, applied, torn_down)
        if (r.verb, r.resource, r.code, r.namespace) == ("create", "pods", 201, namespace)
    )
    return Round(namespace, started, applied, kubectl_ended, pods, settled, torn_down, created, operator_cpu)


def apply_and_follow(
    setup: Setup, namespace: str, jobs: Path, args: argparse.Namespace
) -> tuple[float, float, dict[str, PodTimes]]:
    """`kubectl apply` the jobs while watching their pods: when it began and ended, and the pods' times."""
    resource_version = list_resource_version(setup.core, namespace)
    expected = args.jobs * NODES_PER_JOB
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        applied = time.time()
        apply = pool.submit(kubectl, setup.cluster.plane, "apply", "-f", str(jobs))
        pods = follow_pods(setup.core, namespace, resource_version, expected, applied + args.timeout)
        return applied, apply.result(), pods


def teardown(cluster: RealCluster, namespace: str, jobs: Path, operator: OperatorProcess) -> None:
    """`kubectl delete` the jobs, wait until the operator has let them go (its finalizers), then delete the
    namespace; a node agent completes the pods' graceful deletion meanwhile.

    The jobs go first: a namespace deleted with its jobs in it also loses the operator's Role and
    RoleBinding in the chart's namespaced mode, and then nothing may take the finalizers off.
    """
    nodes = frozenset(node["metadata"]["name"] for node in cluster.admin.list_objects("v1/nodes"))
    deadline = time.monotonic() + TEARDOWN_TIMEOUT

    def wait(what: str, gone: Callable[[], bool]) -> None:
        while not gone():
            check_running(operator, "during the teardown")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} still there after {TEARDOWN_TIMEOUT} s")
            time.sleep(0.1)

    with NodeAgent(cluster.admin, nodes).running():
        kubectl(cluster.plane, "delete", "--wait=false", "-f", str(jobs))
        wait(f"FinetuneJobs in {namespace}", lambda: not cluster.admin.list_objects(FINETUNEJOBS, namespace))
        cluster.delete_namespace(namespace)
        wait(
            f"namespace {namespace}",
            lambda: cluster.admin.get_object("v1/namespaces", None, namespace) is None,
        )


# --- The cluster -------------------------------------------------------------------------------------


def add_gpu_capacity(cluster: RealCluster, gpus: int) -> None:
    """Register 8-GPU nodes beyond the tests' four until ``gpus`` GPUs fit, so that every pod binds."""
    missing = max(gpus - len(GPU_NODES) * GPUS_PER_NODE, 0)
    for index in range(math.ceil(missing / GPUS_PER_NODE)):
        register_node(cluster.admin, f"bench-gpu-node-{index}", GPUS_PER_NODE)


def prepare(plane: ControlPlane, args: argparse.Namespace) -> Setup:
    """The cluster, the rounds' namespaces and the chart's RBAC for them (default or namespaced)."""
    cluster = set_up(plane)
    add_gpu_capacity(cluster, args.jobs * NODES_PER_JOB)
    namespaces = [cluster.create_namespace(f"scale-{index + 1}") for index in range(args.repeat)]
    rbac = chart_rbac(render({"watchNamespaces": namespaces} if args.watch == "namespace" else None))
    [account] = [o["metadata"] for o in rbac if o["kind"] == "ServiceAccount"]
    user = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    identity = cluster.grant("operator", rbac)
    core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(plane.kubeconfig_path)))
    return Setup(cluster, core, identity, user, AuditLog(plane.audit_log), namespaces, args.watch)


# --- Figures -----------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least ``fraction`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def _named(counter: Counter[Key]) -> dict[str, int]:
    return {" ".join(map(str, key)): n for key, n in sorted(counter.items())}


def round_figures(result: Round, audit: AuditLog, user: str, jobs: int) -> dict[str, Any]:
    latencies = result.job_latencies()
    served = [
        r.answered - r.received for r in audit.of(user, *result.windows()["apply"]) if r.verb != "watch"
    ]
    requests, failed = {}, {}
    for window, (start, end) in result.windows().items():
        seen = audit.of(user, start, end)
        requests[window] = _named(Counter((r.verb, r.resource) for r in seen))
        failed[window] = _named(Counter((r.verb, r.resource, r.code) for r in seen if r.code >= 400))
    return {
        "namespace": result.namespace,
        "kubectlSeconds": round(result.kubectl_ended - result.applied, 3),
        "allCreatedSeconds": round(result.last_created - result.applied, 3),
        "allCreatedAuditSeconds": round(result.audit_created - result.applied, 3),
        "allBoundSeconds": round(result.last_bound - result.applied, 3),
        "jobSeconds": {
            "p50": round(percentile(latencies, 0.5), 3),
            "p90": round(percentile(latencies, 0.9), 3),
            "max": round(max(latencies), 3),
        },
        "operatorCpuSeconds": round(result.operator_cpu, 2),
        # How long the API server took over the operator's requests of the apply window (watches aside):
        # small next to the time between a job's creates means the operator's side is the slow one.
        "serverSeconds": {
            "p50": round(percentile(served, 0.5), 4),
            "p90": round(percentile(served, 0.9), 4),
            "max": round(max(served), 4),
        },
        "windowSeconds": {w: round(end - start, 3) for w, (start, end) in result.windows().items()},
        "requests": requests,
        "failedRequests": failed,
        "requestsPerJob": {
            w: round(sum(requests[w].values()) / jobs, 2) for w in WINDOWS if w not in PER_ROUND
        },
    }


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _means(rounds: list[dict[str, Any]], field: str, jobs: int) -> dict[str, dict[str, float]]:
    """Per window: each request kind's mean over the rounds, per round (startup) or per job."""
    result = {}
    for window in WINDOWS:
        keys = sorted({key for r in rounds for key in r[field][window]})
        divisor = 1 if window in PER_ROUND else jobs
        result[window] = {
            key: round(_mean(r[field][window].get(key, 0) for r in rounds) / divisor, 2) for key in keys
        }
    return result


def summary(rounds: list[dict[str, Any]], jobs: int) -> dict[str, Any]:
    fields = (
        "kubectlSeconds",
        "allCreatedSeconds",
        "allCreatedAuditSeconds",
        "allBoundSeconds",
        "operatorCpuSeconds",
    )
    spreads = ("jobSeconds", "serverSeconds")
    return {
        "means": "over the rounds",
        **{field: round(_mean(r[field] for r in rounds), 3) for field in fields},
        **{
            field: {k: round(_mean(r[field][k] for r in rounds), 4) for k in rounds[0][field]}
            for field in spreads
        },
        "units": {w: "per round" if w in PER_ROUND else "per job" for w in WINDOWS},
        "requests": _means(rounds, "requests", jobs),
        "failedRequests": _means(rounds, "failedRequests", jobs),
    }


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")


def _requests_table(means: dict[str, dict[str, float]]) -> None:
    keys = sorted({key for window in WINDOWS for key in means[window]})
    rows = [(key, *(f"{means[w].get(key, 0):g}" for w in WINDOWS)) for key in keys]
    rows.append(("total", *(f"{sum(means[w].values()):.2f}" for w in WINDOWS)))
    _table(("verb resource", "startup /round", "apply /job", "settle /job", "teardown /job"), rows)


# The round table's columns: a header, and the cell of a round's figures.
COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], float]], ...] = (
    ("operator ready", lambda r: r["windowSeconds"]["startup"]),
    ("kubectl", lambda r: r["kubectlSeconds"]),
    ("all created", lambda r: r["allCreatedSeconds"]),
    ("(audit)", lambda r: r["allCreatedAuditSeconds"]),
    ("all bound", lambda r: r["allBoundSeconds"]),
    ("job p50", lambda r: r["jobSeconds"]["p50"]),
    ("p90", lambda r: r["jobSeconds"]["p90"]),
    ("max", lambda r: r["jobSeconds"]["max"]),
    ("req/job", lambda r: r["requestsPerJob"]["apply"]),
    ("operator CPU", lambda r: r["operatorCpuSeconds"]),
)


def print_tables(result: dict[str, Any]) -> None:
    print(f"\n{result['jobs']} jobs x {NODES_PER_JOB} pods a round; operator: {result['operator']}.")
    print(
        "Seconds. operator ready: from the operator's start. The rest from the start of `kubectl apply`:\n"
        "to kubectl's exit; to the last pod as the watch saw it created, and (audit) as the API server\n"
        "answered its create; to the last pod bound; per job, to its last pod. req/job: the operator's\n"
        "requests from the apply to the last pod, per job. operator CPU: its CPU seconds up to the end\n"
        f"of the settle window ({result['settleSeconds']:g} s after the last pod).\n"
    )
    header = ("round", *(name for name, _ in COLUMNS))
    rows = [(str(i + 1), *(f"{cell(r):.2f}" for _, cell in COLUMNS)) for i, r in enumerate(result["rounds"])]
    _table(header, rows)
    print("\nThe operator's requests, mean over the rounds (startup per round, the other windows per job):\n")
    _requests_table(result["summary"]["requests"])
    print("\n... of which failed (verb resource code):\n")
    _requests_table(result["summary"]["failedRequests"])


# --- Main --------------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rounds = []
    with running_control_plane(work / "control-plane", audit=True) as plane:
        setup = prepare(plane, args)
        for index, namespace in enumerate(setup.namespaces):
            result = run_round(setup, namespace, args, work)
            rounds.append(round_figures(result, setup.audit, setup.user, args.jobs))
            print(f"round {index + 1}: {rounds[-1]['allCreatedSeconds']:.2f} s to all pods", file=sys.stderr)
    operator = (
        "restarted every round with --namespace=<the round's>, the chart's namespaced RBAC (watchNamespaces)"
        if args.watch == "namespace"
        else "restarted every round with --all-namespaces, the chart's default (cluster-wide) RBAC"
    )
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "command": " ".join(["python", "benchmarks/operator_scale.py", *sys.argv[1:]]),
        "jobs": args.jobs,
        "podsPerRound": args.jobs * NODES_PER_JOB,
        "operator": operator,
        "settleSeconds": args.settle,
        "rounds": rounds,
        "summary": summary(rounds, args.jobs),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            work = args.keep.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="operator-scale-")))
        result = benchmark(args, work)
    print_tables(result)
    print("\n" + json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    print("(every round's figures as well: --json PATH)" if not args.json else f"(all of it in {args.json})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

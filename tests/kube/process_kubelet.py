"""A "process kubelet": runs the emulator's pods as local processes, for whole-system tests.

``pods.py`` moves pods through their phases by hand; this runs what the pods say instead, so that
the real operator drives the real trainer, on the emulator or on the real API server (there it runs
the pods that the scheduler bound to its node). The container's argv runs (never through a shell) with
the pod's environment, Secrets and field references resolved as a kubelet resolves them, and the
paths a container sees remapped onto a scratch directory per pod: ConfigMap volumes become
directories of their files, emptyDirs directories, the termination-message path a file. Every pod
is on this machine, so a pod's DNS name under its headless Service is 127.0.0.1.

Like a kubelet it writes the pod's status through the status subresource (Running; Ready from the
readiness probe; Succeeded or Failed with the exit code and the termination message) and honours
graceful deletion, through a finalizer of its own: SIGTERM, the pod's grace period, SIGKILL, and
only then does the finalizer go and the pod is deleted (a real API server also waits for the
kubelet's delete with grace period 0), so a recreated pod never meets the previous one's processes
(or ports).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import IO, Any

import kmock
from finetune_operator.api.timestamps import format_time
from finetune_trainer.launch import descendants, process_start_time

from .client import KubeClient
from .pods import Kube

PODS = "v1/pods"
FINALIZER = "test.finetune.dev/process-kubelet"
MAX_GRACE_SECONDS = 60.0  # a test must not wait the operator's 5 minutes for a stuck process
MESSAGE_LIMIT = 4096  # bytes of a termination message, as in Kubernetes
# What the image would provide: this interpreter first on PATH, DeepSpeed's CPU ops prebuilt (they
# are built once into the usual cache; with each pod's fresh HOME they would be compiled again, for
# a minute, at every start), and one thread per rank, as the machine is small.
IMAGE_ENV = {
    "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")]),
    "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/torch_extensions")
    ),
    "OMP_NUM_THREADS": "1",
}


class ConfigError(Exception):
    """The container cannot be created (a missing Secret or ConfigMap): CreateContainerConfigError."""


def _now() -> str:
    return format_time(datetime.datetime.now(datetime.UTC))


@dataclasses.dataclass
class PodProcess:
    """One pod, by uid (a recreated pod of the same name is another one), and what runs for it."""

    name: str
    namespace: str
    container: str
    directory: Path
    grace_seconds: float
    probe_url: str | None  # the readinessProbe (worker 0's /progress); None: Ready once started
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    tree: dict[int, str] = dataclasses.field(default_factory=dict)  # every pid seen -> its start time
    ready: bool = False
    kill_at: float | None = None  # after SIGTERM: when the grace period ends
    exit_code: int | None = None
    message: str = ""  # the termination message

    @property
    def running(self) -> bool:
        return self.process is not None and self.exit_code is None

    def log(self) -> str:
        path = self.directory / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remember_tree(self) -> None:
        """Note the launcher's descendants while they are its: an orphan is not found from it later."""
        if self.process is not None and self.running:
            for pid in [self.process.pid, *descendants(self.process.pid)]:
                self.tree.setdefault(pid, process_start_time(pid) or "")

    def alive(self) -> list[int]:
        return [pid for pid, started in self.tree.items() if process_start_time(pid) == started]

    def kill_tree(self) -> None:
        """SIGKILL the launcher and everything it started, all at once, as when a node dies."""
        self.remember_tree()
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class ProcessKubelet:
    """An async context manager: runs the pods of ``namespace`` (all when None) bound to ``node``
    (any pod when None, as on the emulator) until the block exits, then kills every process it started."""

    def __init__(
        self, kube: Kube, scratch: Path, namespace: str | None = None, node: str | None = None
    ) -> None:
        self.kube = kube
        self.scratch = scratch
        self.namespace = namespace
        self.node = node
        self.pods: dict[str, PodProcess] = {}  # by uid, finished pods included (for their logs)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ProcessKubelet:
        self._task = asyncio.create_task(self._loop(), name="process-kubelet")
        return self

    async def __aexit__(self, *_: object) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task  # raises what broke the loop, if anything did
        finally:
            for pod in self.pods.values():
                pod.kill_tree()
                if pod.process is not None:
                    await asyncio.to_thread(pod.process.wait)
                if pod.log_file is not None:
                    pod.log_file.close()

    def instances(self, name: str) -> list[PodProcess]:
        """The pods of this name that ran here, oldest first."""
        return [p for p in self.pods.values() if p.name == name]

    def kill_worker(self, name: str) -> None:
        """SIGKILL the running pod's whole process tree: it exits 137, as if its node had died."""
        running = [p for p in self.instances(name) if p.running]
        if not running:
            raise LookupError(f"no running pod {name}")
        running[0].kill_tree()

    def alive(self) -> list[int]:
        """Processes started here that still exist."""
        return [pid for pod in self.pods.values() for pid in pod.alive()]

    async def _loop(self) -> None:
        while True:  # polling is enough: pods change on the scale of seconds
            for pod in self.kube.list_objects(PODS, self.namespace):
                if self.node is None or pod["spec"].get("nodeName") == self.node:
                    await self._sync(pod)
            await asyncio.sleep(0.2)

    async def _sync(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        deleting = bool(meta.get("deletionTimestamp"))
        record = self.pods.get(meta["uid"])
        if record is None:
            if deleting:
                return  # deleted before it got here
            record = self.pods[meta["uid"]] = self._admit(pod)
        if record.process is None and not deleting:
            self._start(record, pod)
        if record.running:
            self._check_exit(record)
        if record.running:
            record.remember_tree()
            if not record.ready and record.probe_url and await asyncio.to_thread(_probe, record.probe_url):
                record.ready = True
                self._status(record, _running(record))
        if deleting:
            self._terminate(record, pod)

    def _admit(self, pod: dict[str, Any]) -> PodProcess:
        """Take the pod on, with our finalizer, so that its deletion waits until its processes are gone."""
        meta, spec = pod["metadata"], pod["spec"]
        finalizers = [*meta.get("finalizers", []), FINALIZER]
        self.kube.patch_object(
            PODS, meta["namespace"], meta["name"], {"metadata": {"finalizers": finalizers}}
        )
        probe = (spec["containers"][0].get("readinessProbe") or {}).get("httpGet")
        return PodProcess(
            name=meta["name"],
            namespace=meta["namespace"],
            container=spec["containers"][0]["name"],
            directory=self.scratch / f"{meta['name']}-{meta['uid'][:8]}",
            grace_seconds=min(float(spec.get("terminationGracePeriodSeconds", 30)), MAX_GRACE_SECONDS),
            probe_url=f"http://127.0.0.1:{probe['port']}{probe.get('path', '/')}" if probe else None,
        )

    def _start(self, record: PodProcess, pod: dict[str, Any]) -> None:
        try:
            env = self._environment(record, pod)
        except ConfigError as error:  # the kubelet retries until the object appears
            waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
            self._status(record, {"phase": "Pending", "containerStatuses": [_container(record, waiting)]})
            return
        container = pod["spec"]["containers"][0]
        argv = [*container.get("command", []), *container.get("args", [])]
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the image's interpreter
        record.directory.mkdir(parents=True, exist_ok=True)
        record.log_file = (record.directory / "container.log").open("ab")
        # A session of its own, like a container: signals for the test's process group never reach it.
        record.process = subprocess.Popen(
            argv,
            env=env,
            cwd=env.get("FINETUNE_WORKSPACE", record.directory),
            stdout=record.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        record.remember_tree()
        record.ready = record.probe_url is None
        self._status(record, _running(record))

    def _environment(self, record: PodProcess, pod: dict[str, Any]) -> dict[str, str]:
        """The container's environment: references resolved, container paths remapped onto this machine."""
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        mounts = self._mount_volumes(record, pod)
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = (
            record.directory / "termination-log"
        )
        fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"]}
        env = dict(IMAGE_ENV)
        for var in container.get("env", []):
            source = var.get("valueFrom") or {}
            if "secretKeyRef" in source:
                value = self._secret_value(meta["namespace"], source["secretKeyRef"])
            elif "fieldRef" in source:
                value = fields[source["fieldRef"]["fieldPath"]]
            else:
                value = var.get("value", "")
            if value is not None:
                env[var["name"]] = _remap(value, mounts, spec.get("subdomain"))
        if "/workspace" in mounts:  # the trainer's scratch space (it defaults to /workspace)
            env["FINETUNE_WORKSPACE"] = str(mounts["/workspace"])
        return env

    def _mount_volumes(self, record: PodProcess, pod: dict[str, Any]) -> dict[str, Path]:
        """Container path -> local directory. An in-memory emptyDir (/dev/shm) stays the host's."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in pod["spec"]["containers"][0].get("volumeMounts", []):
            volume, local = volumes[mount["name"]], record.directory / "volumes" / mount["name"]
            if (volume.get("emptyDir") or {}).get("medium") == "Memory":
                continue
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                source = self.kube.get_object("v1/configmaps", pod["metadata"]["namespace"], name)
                if source is None:
                    raise ConfigError(f'configmap "{name}" not found')
                for key, text in (source.get("data") or {}).items():
                    (local / key).write_text(text)
            mounts[mount["mountPath"]] = local
        return mounts

    def _secret_value(self, namespace: str, ref: dict[str, Any]) -> str | None:
        secret = self.kube.get_object("v1/secrets", namespace, ref["name"]) or {}
        if ref["key"] in (secret.get("stringData") or {}):
            return str(secret["stringData"][ref["key"]])
        if ref["key"] in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][ref["key"]]).decode()
        if ref.get("optional"):
            return None
        problem = f'has no key "{ref["key"]}"' if secret else "not found"
        raise ConfigError(f'secret "{ref["name"]}" {problem}')

    def _check_exit(self, record: PodProcess) -> None:
        code = record.process.poll() if record.process is not None else None
        if code is None:
            return
        record.exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N
        path = record.directory / "termination-log"
        message = path.read_bytes()[:MESSAGE_LIMIT] if path.exists() else b""
        if not message and code != 0:  # terminationMessagePolicy: FallbackToLogsOnError
            message = (record.directory / "container.log").read_bytes()[-2048:]
        record.message = message.decode(errors="replace")
        terminated = {
            "exitCode": record.exit_code,
            "reason": "Completed" if code == 0 else "Error",
            "message": record.message,
            "finishedAt": _now(),
        }
        record.ready = False
        self._status(
            record,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": _conditions(False),
                "containerStatuses": [_container(record, {"terminated": terminated})],
            },
        )

    def _terminate(self, record: PodProcess, pod: dict[str, Any]) -> None:
        """SIGTERM to the launcher (which passes it to the ranks), SIGKILL after the grace period; once
        nothing runs, our finalizer goes and the deletion completes."""
        now = asyncio.get_running_loop().time()
        if record.running and record.process is not None and record.kill_at is None:
            record.process.send_signal(signal.SIGTERM)
            record.kill_at = now + record.grace_seconds
        elif record.running and record.kill_at is not None and now >= record.kill_at:
            record.kill_tree()
        if not record.running:
            finalizers = [f for f in pod["metadata"].get("finalizers", []) if f != FINALIZER]
            patch = {"metadata": {"finalizers": finalizers or None}}
            self.kube.patch_object(PODS, record.namespace, record.name, patch)
            if isinstance(self.kube, KubeClient):  # the emulator deletes once the finalizers are gone
                self.kube.delete_object(PODS, record.namespace, record.name, grace_seconds=0)

    def _status(self, record: PodProcess, status: dict[str, Any]) -> None:
        with contextlib.suppress(kmock.KubernetesError):  # the pod is gone already: nothing to report
            self.kube.patch_object(PODS, record.namespace, record.name, {"status": status}, sub="status")


def _running(record: PodProcess) -> dict[str, Any]:
    state = {"running": {"startedAt": _now()}}
    return {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "conditions": _conditions(record.ready),
        "containerStatuses": [_container(record, state)],
    }


def _container(record: PodProcess, state: dict[str, Any]) -> dict[str, Any]:
    started = "running" in state
    return {
        "name": record.container,
        "ready": record.ready,
        "started": started,
        "restartCount": 0,
        "state": state,
    }


def _conditions(ready: bool) -> list[dict[str, str]]:
    value = "True" if ready else "False"
    return [{"type": "PodScheduled", "status": "True"}] + [
        {"type": kind, "status": value} for kind in ("ContainersReady", "Ready")
    ]


def _remap(value: str, mounts: dict[str, Path], subdomain: str | None) -> str:
    """A path under a mount becomes the local path; a pod's DNS name under the Service, 127.0.0.1."""
    for container_path, local in mounts.items():
        if value == container_path or value.startswith(container_path.rstrip("/") + "/"):
            return str(local) + value[len(container_path) :]
    return "127.0.0.1" if subdomain and value.endswith(f".{subdomain}") else value


def _probe(url: str) -> bool:
    """An httpGet probe: a 2xx or 3xx answer within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return 200 <= response.status < 400
    except OSError:
        return False

"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

The binaries come from ``make cluster-bin`` (built from the Go module in ``tests/controlplane/``).
The flags follow controller-runtime's envtest (a generated CA and serving certificate, RBAC,
service-account signing keys, an admin client certificate in ``system:masters``), plus the
garbage-collector and namespace controllers and the scheduler, which envtest leaves out. Every port
is picked free, so two control planes (a ``make cluster`` and a test run, or two test runs) can
share a machine. There are no kubelets: tests register Node objects and play the kubelet's part.

The pytest fixture (``tests/conftest.py``) and ``make cluster`` / ``make cluster-down`` both use
this module: ``python -m tests.kube.controlplane up|down DIR``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from finetune_trainer.launch import process_start_time

ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = ROOT / ".cluster" / "bin"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
SERVICE_RANGE = "10.0.0.0/24"
START_TIMEOUT = 120.0  # seconds; a cold start on a busy 2-core machine takes about 10
# With ``ControlPlane(audit=True)``: every request's metadata (user, verb, resource, status code, no
# bodies), from the stage where the response starts or completes; RequestReceived would only double it.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata"}],
}


class ControlPlaneError(RuntimeError):
    """A component did not start; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` different free ports: each is held while the next is chosen."""
    with contextlib.ExitStack() as held:
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


# --- Certificates ------------------------------------------------------------------------------------


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None = None,
    *,
    ca: bool = False,
    names: tuple[str, ...] = (),
    client: bool = False,
) -> x509.Certificate:
    """A certificate for ``key``, self-signed when there is no issuer; valid for a week."""
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        alternatives: list[x509.GeneralName] = []
        for name in names:
            try:
                alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternatives.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
    if not ca:
        usage = (
            x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def write_pki(directory: Path) -> None:
    """CA, API serving certificate, admin client certificate and the service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)

    def new_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    ca_key = new_key()
    ca = _certificate(_name("finetune-test-ca"), ca_key, ca=True)
    issuer = (ca.subject, ca_key)
    serving_key, admin_key, sa_key = new_key(), new_key(), new_key()
    hosts = ("127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default.svc")
    serving = _certificate(_name("kube-apiserver"), serving_key, issuer, names=hosts)
    admin = _certificate(_name("admin", "system:masters"), admin_key, issuer, client=True)
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "apiserver.crt": serving.public_bytes(serialization.Encoding.PEM),
        "apiserver.key": _pem_key(serving_key),
        "admin.crt": admin.public_bytes(serialization.Encoding.PEM),
        "admin.key": _pem_key(admin_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)


def kubeconfig(server: str, ca: bytes, user: dict[str, str], name: str = "finetune-test") -> str:
    """A kubeconfig for one cluster and one user (client certificate or token)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}},
        ],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    return yaml.safe_dump(config)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- Processes ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ControlPlane:
    """The four processes of one control plane, their state kept under ``directory``.

    ``directory/state.json`` records each component's pid and start time (so that ``down`` stops
    exactly what ``up`` started, never a later process that reused a pid) and the API's URL. With
    ``audit``, the API server writes an audit log (``AUDIT_POLICY``, one JSON event a line) to
    ``audit_log``; the tests leave it off.
    """

    directory: Path
    bin_dir: Path = BIN_DIR
    audit: bool = False

    @property
    def pki(self) -> Path:
        return self.directory / "pki"

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    @property
    def etcd_data(self) -> Path:
        return self.directory / "etcd"

    @property
    def kubeconfig_path(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def url(self) -> str:
        return json.loads(self.state_file.read_text())["url"]

    @property
    def audit_log(self) -> Path:
        return self.directory / "logs" / "audit.log"

    def log(self, component: str) -> Path:
        return self.directory / "logs" / f"{component}.log"

    def _audit_flags(self) -> list[str]:
        """kube-apiserver's audit flags, a fresh log and the policy file; none without ``audit``."""
        if not self.audit:
            return []
        policy = self.directory / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self.audit_log.unlink(missing_ok=True)
        # Mode blocking (the default): an event is written before its request returns. maxsize 0: one
        # file, never rotated.
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-maxsize=0",
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every component, in the background, and return once the API answers ``/readyz``."""
        missing = [c for c in (*COMPONENTS, "kubectl") if not (self.bin_dir / c).is_file()]
        if missing:
            raise ControlPlaneError(f"{', '.join(missing)} not in {self.bin_dir}: run `make cluster-bin`")
        if self.state_file.exists() and self.running():
            raise ControlPlaneError(f"a control plane is already running from {self.directory}")
        (self.directory / "logs").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.etcd_data, ignore_errors=True)  # every start is a new, empty cluster
        write_pki(self.pki)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        url = f"https://127.0.0.1:{api_port}"
        ca = (self.pki / "ca.crt").read_bytes()
        admin = {
            "client-certificate-data": _b64((self.pki / "admin.crt").read_bytes()),
            "client-key-data": _b64((self.pki / "admin.key").read_bytes()),
        }
        self.kubeconfig_path.write_text(kubeconfig(url, ca, admin))
        self.kubeconfig_path.chmod(0o600)
        state: dict[str, object] = {"url": url, "pids": {}}
        self.state_file.write_text(json.dumps(state))
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        pki = self.pki
        commands = {
            "etcd": [
                f"--data-dir={self.etcd_data}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                "--name=finetune-test",
                f"--initial-cluster=finetune-test={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            "kube-apiserver": [
                f"--etcd-servers={etcd_url}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--secure-port={api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",  # its own Endpoints would be on loopback: refused
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                f"--service-account-issuer={url}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                *self._audit_flags(),
            ],
            "kube-controller-manager": [
                f"--kubeconfig={self.kubeconfig_path}",
                "--leader-elect=false",
                "--controllers=garbage-collector-controller,namespace-controller",
                "--secure-port=0",
            ],
            "kube-scheduler": [
                f"--kubeconfig={self.kubeconfig_path}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
        }
        deadline = time.monotonic() + timeout
        try:
            for component, args in commands.items():
                self._spawn(component, args)
                if component == "etcd":
                    self._wait(component, lambda: _http_ok(f"{etcd_url}/health"), deadline)
                if component == "kube-apiserver":
                    self._wait(component, self.ready, deadline)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, component: str, args: list[str]) -> None:
        """Start one component in a session of its own, so that it outlives ``make cluster``."""
        with self.log(component).open("ab") as log:
            process = subprocess.Popen(
                [str(self.bin_dir / component), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        state = json.loads(self.state_file.read_text())
        state["pids"][component] = [process.pid, process_start_time(process.pid)]
        self.state_file.write_text(json.dumps(state))

    def _wait(self, component: str, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            if component not in self.running():
                raise ControlPlaneError(f"{component} exited at start:\n{self.tail(component)}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{component} not ready in time:\n{self.tail(component)}")
            time.sleep(0.2)

    def tail(self, component: str, lines: int = 30) -> str:
        path = self.log(component)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return context

    def ready(self) -> bool:
        return _http_ok(f"{self.url}/readyz", self.ssl_context())

    def _processes(self) -> dict[str, int]:
        """Component -> pid, for those still running as the process that was started."""
        if not self.state_file.exists():
            return {}
        pids = json.loads(self.state_file.read_text()).get("pids", {})
        return {name: pid for name, (pid, started) in pids.items() if process_start_time(pid) == started}

    def running(self) -> list[str]:
        return list(self._processes())

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM each component started here (scheduler first, etcd last), SIGKILL after ``grace``."""
        for component in reversed(COMPONENTS):
            pid = self._processes().get(component)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while component in self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            if component in self.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        shutil.rmtree(self.etcd_data, ignore_errors=True)


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_control_plane(directory: Path, *, audit: bool = False) -> Iterator[ControlPlane]:
    plane = ControlPlane(directory, audit=audit)
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.kube.controlplane", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("directory", type=Path, nargs="?", default=ROOT / ".cluster")
    args = parser.parse_args(argv)
    plane = ControlPlane(args.directory.resolve())
    if args.action == "down":
        running = plane.running()
        plane.stop()
        print(f"stopped {', '.join(running)}" if running else "no control plane was running")
        return 0
    if args.action == "status":
        running = plane.running()
        print(f"{plane.url}: {', '.join(running)}" if running else "no control plane is running")
        return 0 if running else 1
    started = time.monotonic()
    try:
        plane.start()
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"Control plane ready at {plane.url} in {time.monotonic() - started:.1f} s "
        f"(logs in {plane.directory / 'logs'}).\n"
        f"  export KUBECONFIG={plane.kubeconfig_path}\n"
        f"  {plane.bin_dir / 'kubectl'} get --raw /readyz\n"
        "Stop it with `make cluster-down`."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

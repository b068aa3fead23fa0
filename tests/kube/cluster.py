"""A test cluster on the real control plane: the CRD installed, GPU nodes registered, and the
operator's identity exactly as the Helm chart grants it.

The session fixture in ``tests/conftest.py`` builds one ``RealCluster``; tests take a namespace of
their own from it. The operator never runs as the admin: ``operator_identity`` is the chart's
ServiceAccount with the chart's (cluster-wide) ClusterRole, as ``helm template`` renders them, and a
token from the TokenRequest API, so the real RBAC authorizer judges every call it makes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import yaml

from .client import KubeClient, resource_path
from .controlplane import ROOT, ControlPlane, kubeconfig
from .nodes import PROCESS_TAINT, register_node

CRD_FILE = ROOT / "crds" / "finetunejob.yaml"
CHART_NAMESPACE = "finetune-system"
GPU_NODES = tuple(f"gpu-node-{i}" for i in range(4))
GPUS_PER_NODE = 8
PROCESS_NODE = "process-node"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


@dataclasses.dataclass(frozen=True)
class Identity:
    """A user of the API: a bearer token, and a kubeconfig file holding it."""

    name: str
    token: str
    kubeconfig: Path

    def connection(self, url: str, ca_path: Path) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=url, ca_path=str(ca_path), token=self.token, default_namespace="default"
        )

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))


@dataclasses.dataclass
class RealCluster:
    plane: ControlPlane
    admin: KubeClient

    @property
    def url(self) -> str:
        return self.plane.url

    @property
    def ca_path(self) -> Path:
        return self.plane.pki / "ca.crt"

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The real kubectl of the same release, as the admin; a failure shows what kubectl said."""
        cache = self.plane.directory / "kubectl-cache"
        command = [str(self.plane.bin_dir / "kubectl"), f"--kubeconfig={self.plane.kubeconfig_path}"]
        command += [f"--cache-dir={cache}", *args]
        done = subprocess.run(command, input=input, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def apply(self, objects: Iterable[dict[str, Any]]) -> None:
        documents = "\n---\n".join(yaml.safe_dump(obj) for obj in objects)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=documents)

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.admin.create_object("v1/namespaces", {"metadata": {"name": name}})
        return name

    def delete_namespace(self, name: str) -> None:
        self.admin.delete_object("v1/namespaces", None, name)

    def grant(self, name: str, rbac: list[dict[str, Any]]) -> Identity:
        """Apply the rendered ServiceAccount and roles, and return the ServiceAccount's identity."""
        self.admin.request(
            "POST", "/api/v1/namespaces", {"metadata": {"name": CHART_NAMESPACE}}, allow=(409,)
        )
        self.apply(rbac)
        [account] = [o for o in rbac if o["kind"] == "ServiceAccount"]
        meta = account["metadata"]
        path = resource_path("v1/serviceaccounts", meta["namespace"], meta["name"]) + "/token"
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"}
        response = self.admin.request("POST", path, request | {"spec": {"expirationSeconds": 86400}})
        assert response is not None
        token = response["status"]["token"]
        config = self.plane.directory / f"{name}.kubeconfig"
        config.write_text(kubeconfig(self.url, self.ca_path.read_bytes(), {"token": token}, name))
        config.chmod(0o600)
        return Identity(name, token, config)


def chart_rbac(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The RBAC part of a rendered chart: what `helm install` would grant the operator."""
    return [o for o in objects if o["kind"] in RBAC_KINDS]


def set_up(plane: ControlPlane) -> RealCluster:
    """CRD Established, GPU nodes and the process kubelet's node registered."""
    admin = KubeClient(plane.url, plane.ssl_context())
    cluster = RealCluster(plane, admin)
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    crd = yaml.safe_load(CRD_FILE.read_text())["metadata"]["name"]
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    for node in GPU_NODES:
        register_node(admin, node, GPUS_PER_NODE)
    register_node(
        admin, PROCESS_NODE, 0, labels={"finetune.dev/test-kubelet": "process"}, taints=[PROCESS_TAINT]
    )
    return cluster

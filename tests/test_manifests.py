"""The objects the operator creates for a job: pure, table-driven checks of the manifest builder."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.cli import main as cli_main
from finetune_operator.controller.manifests import (
    MASTER_PORT,
    UNASSIGNED_UID,
    WorkerSettings,
    build_gang,
    build_worker_pod,
)
from finetune_trainer.config import TrainerConfig
from finetune_trainer.launch import torchrun_argv, wait_for_host

from tests.manifests import minimal_manifest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = WorkerSettings(default_image="registry.example/trainer:1")
BASE = minimal_manifest("llm", resources={"nodes": 3, "gpusPerNode": 8, "cpu": "32", "memory": "512Gi"})


def _gang(**resources: Any) -> list[dict[str, Any]]:
    manifest = copy.deepcopy(BASE)
    manifest["spec"]["resources"].update(resources)
    return build_gang(parse_finetune_job(manifest), "uid-1", attempt=2, settings=SETTINGS)


def _pods(gang: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in gang if o["kind"] == "Pod"]


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_one_service_one_config_map_and_a_pod_per_node_all_owned_by_the_job() -> None:
    gang = _gang()
    assert [(o["kind"], o["metadata"]["name"]) for o in gang] == [
        ("Service", "llm-workers"),
        ("ConfigMap", "llm-config"),
        ("Pod", "llm-worker-0"),
        ("Pod", "llm-worker-1"),
        ("Pod", "llm-worker-2"),
    ]
    for obj in gang:
        assert obj["metadata"]["namespace"] == "team"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FinetuneJob",
            "name": "llm",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert obj["metadata"]["labels"]["finetune.dev/job-name"] == "llm"


def test_service_is_headless_and_publishes_not_ready_workers() -> None:
    service = _gang()[0]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = _pods(_gang())[0]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_config_map_holds_the_trainer_contract() -> None:
    config_map = _gang()[1]
    config = TrainerConfig.model_validate(json.loads(config_map["data"]["config.json"]))
    assert config.distributed.world_size == 24
    assert config.output.uri == "s3://out/llm/"


@pytest.mark.parametrize(
    ("resources", "nproc", "gpu_limit"),
    [
        pytest.param({"gpusPerNode": 8}, "8", "8", id="eight-gpus"),
        pytest.param({"gpusPerNode": 1}, "1", "1", id="one-gpu"),
        pytest.param({"gpusPerNode": 0}, "1", None, id="cpu-only-one-process"),
    ],
)
def test_processes_per_node_and_gpu_limits(
    resources: dict[str, Any], nproc: str, gpu_limit: int | None
) -> None:
    for pod in _pods(_gang(**resources)):
        assert _env(pod)["NPROC_PER_NODE"] == nproc
        limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu") == gpu_limit


def test_rendezvous_environment_names_worker_zero_under_the_headless_service() -> None:
    for rank, pod in enumerate(_pods(_gang())):
        env = _env(pod)
        assert (env["NNODES"], env["NODE_RANK"]) == ("3", str(rank))
        assert env["MASTER_ADDR"] == "llm-worker-0.llm-workers"
        assert env["MASTER_PORT"] == str(MASTER_PORT)
        assert pod["spec"]["hostname"] == f"llm-worker-{rank}"
        assert pod["spec"]["subdomain"] == "llm-workers"
        assert pod["metadata"]["labels"]["finetune.dev/attempt"] == "2"
        assert int(env["RENDEZVOUS_TIMEOUT_SECONDS"]) >= 900
        assert int(env["DEEPSPEED_TIMEOUT"]) >= 15


def test_only_worker_zero_reports_readiness() -> None:
    probes = [p["spec"]["containers"][0].get("readinessProbe") for p in _pods(_gang())]
    assert probes[0]["httpGet"] == {"path": "/progress", "port": 29600}
    assert probes[1:] == [None, None]


def test_pod_details_users_expect() -> None:
    manifest = copy.deepcopy(BASE)
    manifest["spec"]["resources"].update(
        nodeSelector={"pool": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {}},
        priorityClassName="training",
        schedulerName="volcano",
        serviceAccountName="trainer",
    )
    manifest["spec"]["storage"] = {"credentialsSecret": "s3-creds"}
    pod = build_worker_pod(parse_finetune_job(manifest), "uid", 1, 0, SETTINGS)
    spec = pod["spec"]
    container = spec["containers"][0]
    assert spec["nodeSelector"] == {"pool": "h100"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "value": "", "effect": "NoSchedule"}
    ]
    assert spec["affinity"] == {"nodeAffinity": {}}
    assert (spec["priorityClassName"], spec["schedulerName"]) == ("training", "volcano")
    assert spec["serviceAccountName"] == "trainer"
    assert spec["restartPolicy"] == "Never"
    assert container["resources"] == {
        "requests": {"cpu": "32", "memory": "512Gi"},
        "limits": {"memory": "512Gi", "nvidia.com/gpu": "8"},
    }
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["image"] == "registry.example/trainer:1"
    assert container["command"] == ["python", "-m", "finetune_trainer.launch"]
    env = _env(pod)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }


def test_without_a_secret_no_credentials_are_set_for_workload_identity() -> None:
    env = _env(_pods(_gang())[0])
    assert not any(name.startswith("AWS_") for name in env)


def test_no_user_string_reaches_a_shell() -> None:
    """Every value from the spec lands in env values or fields, never in a shell command line."""
    manifest = copy.deepcopy(BASE)
    manifest["spec"]["image"] = "evil:1;rm"
    manifest["metadata"]["name"] = "x"
    for pod in _pods(build_gang(parse_finetune_job(manifest), "u", 0, SETTINGS)):
        container = pod["spec"]["containers"][0]
        assert "args" not in container
        assert container["command"][0] == "python"
        assert not any(part in ("sh", "bash", "-c") for part in container["command"])


def test_image_from_the_spec_wins_over_the_default() -> None:
    manifest = copy.deepcopy(BASE)
    manifest["spec"]["image"] = "mine:2"
    pod = build_worker_pod(parse_finetune_job(manifest), "u", 0, 0, SETTINGS)
    assert pod["spec"]["containers"][0]["image"] == "mine:2"


def test_launcher_command_line() -> None:
    env = {
        "NNODES": "2",
        "NODE_RANK": "1",
        "NPROC_PER_NODE": "8",
        "MASTER_ADDR": "j-worker-0.j-workers",
        "MASTER_PORT": "29500",
        "FINETUNE_CONFIG": "/etc/finetune/config.json",
        "RENDEZVOUS_TIMEOUT_SECONDS": "1800",
    }
    argv = torchrun_argv(env)
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in argv and "--node-rank=1" in argv and "--nproc-per-node=8" in argv
    assert "--master-addr=j-worker-0.j-workers" in argv and "--rdzv-conf=timeout=1800" in argv
    assert argv[-4:] == ["-m", "finetune_trainer", "--config", "/etc/finetune/config.json"]


def test_launcher_waits_for_worker_zero_dns() -> None:
    clock = iter(range(0, 10_000, 1))
    answers = iter([False, False, True])
    assert wait_for_host(
        "w0", 60, resolvable=lambda _: next(answers), sleep=lambda _: None, clock=lambda: next(clock)
    )
    never = wait_for_host(
        "w0", 5, resolvable=lambda _: False, sleep=lambda _: None, clock=lambda: next(clock)
    )
    assert never is False


def test_render_prints_what_the_operator_creates(capsys: pytest.CaptureFixture[str]) -> None:
    example = ROOT / "examples" / "full-multinode-zero3.yaml"
    assert cli_main(["render", str(example)]) == 0
    rendered = list(yaml.safe_load_all(capsys.readouterr().out))
    expected = build_gang(
        parse_finetune_job(yaml.safe_load(example.read_text())),
        UNASSIGNED_UID,
        0,
        WorkerSettings(default_image="ghcr.io/finetune-operator/trainer:0.1.0"),
    )
    assert rendered == expected


def test_render_rejects_an_invalid_manifest_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    manifest = copy.deepcopy(BASE)
    manifest["spec"]["resources"]["nodes"] = 0
    bad.write_text(yaml.safe_dump(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "render", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "spec.resources.nodes" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""

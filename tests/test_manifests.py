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
from finetune_operator.controller import runner
from finetune_operator.controller.manifests import (
    DEFAULT_RENDEZVOUS_PORT,
    UNASSIGNED_UID,
    WorkerSettings,
    build_gang,
    build_worker_pod,
)
from finetune_trainer import worker_env
from finetune_trainer.config import PROGRESS_PORT, TrainerConfig
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
        assert env["MASTER_PORT"] == str(DEFAULT_RENDEZVOUS_PORT)
        assert pod["spec"]["hostname"] == f"llm-worker-{rank}"
        assert pod["spec"]["subdomain"] == "llm-workers"
        assert pod["metadata"]["labels"]["finetune.dev/attempt"] == "2"
        assert int(env["RENDEZVOUS_TIMEOUT_SECONDS"]) >= 900
        assert int(env["DEEPSPEED_TIMEOUT"]) >= 15


def test_only_worker_zero_reports_readiness() -> None:
    probes = [p["spec"]["containers"][0].get("readinessProbe") for p in _pods(_gang())]
    assert probes[0]["httpGet"] == {"path": "/progress", "port": 29600}
    assert probes[1:] == [None, None]


def _ports(gang: list[dict[str, Any]]) -> dict[str, Any]:
    """Every place a port of the gang is written, by where."""
    service, config_map, *pods = gang
    config = TrainerConfig.model_validate(json.loads(config_map["data"]["config.json"]))
    [service_port] = service["spec"]["ports"]
    return {
        "service": (service_port["port"], service_port["targetPort"]),
        "containers": {
            tuple((p["name"], p["containerPort"]) for p in pod["spec"]["containers"][0]["ports"])
            for pod in pods
        },
        "probe": pods[0]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        "master_port": {_env(pod)["MASTER_PORT"] for pod in pods},
        "trainer_progress_port": config.reporting.progress_port,
    }


@pytest.mark.parametrize(
    ("settings", "rendezvous", "progress"),
    [
        pytest.param(SETTINGS, 29500, 29600, id="defaults"),
        pytest.param(
            WorkerSettings(default_image="t", rendezvous_port=31001, progress_port=31002),
            31001,
            31002,
            id="the-operators-settings",
        ),
    ],
)
def test_the_operators_ports_reach_every_object_that_names_one(
    settings: WorkerSettings, rendezvous: int, progress: int
) -> None:
    gang = build_gang(parse_finetune_job(BASE), "uid-1", attempt=0, settings=settings)
    assert _ports(gang) == {
        "service": (rendezvous, rendezvous),
        "containers": {(("rendezvous", rendezvous), ("progress", progress))},
        "probe": progress,
        "master_port": {str(rendezvous)},
        "trainer_progress_port": progress,
    }
    assert (DEFAULT_RENDEZVOUS_PORT, PROGRESS_PORT) == (29500, 29600)


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        pytest.param({"rendezvous_port": 29600}, "must differ", id="the-same-port-twice"),
        pytest.param({"progress_port": 0}, "progress_port must be a port number", id="progress-port-zero"),
        pytest.param({"rendezvous_port": 65536}, "rendezvous_port must be a port", id="rendezvous-too-high"),
    ],
)
def test_settings_refuse_ports_that_cannot_work(ports: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkerSettings(default_image="t", **ports)


@pytest.mark.parametrize(
    ("argv", "variables", "expected"),
    [
        pytest.param([], {}, (29500, 29600), id="defaults"),
        pytest.param(
            [],
            {"FINETUNE_RENDEZVOUS_PORT": "31001", "FINETUNE_PROGRESS_PORT": "31002"},
            (31001, 31002),
            id="environment",
        ),
        pytest.param(
            ["--rendezvous-port", "32001", "--progress-port", "32002"],
            {"FINETUNE_RENDEZVOUS_PORT": "31001"},
            (32001, 32002),
            id="flags-win",
        ),
    ],
)
def test_operator_port_flags(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], variables: dict[str, str], expected: tuple[int, int]
) -> None:
    for name in ("FINETUNE_RENDEZVOUS_PORT", "FINETUNE_PROGRESS_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    args = runner.build_parser().parse_args(argv)
    assert (args.rendezvous_port, args.progress_port) == expected


def test_operator_refuses_equal_ports_before_it_starts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        runner.main(["--rendezvous-port", "31000", "--progress-port", "31000"])
    assert exit_.value.code == 2
    assert "must differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("grace", "stop_grace"),
    [
        pytest.param(300, 300 - worker_env.STOP_GRACE_MARGIN_SECONDS, id="default-grace"),
        pytest.param(30, 30 - worker_env.STOP_GRACE_MARGIN_SECONDS, id="short-grace"),
        pytest.param(worker_env.STOP_GRACE_MARGIN_SECONDS, 1, id="grace-no-longer-than-the-margin"),
        pytest.param(0, 1, id="no-grace"),
    ],
)
def test_the_trainer_gets_the_grace_period_less_its_margin(grace: int, stop_grace: int) -> None:
    settings = WorkerSettings(default_image="t", termination_grace_seconds=grace)
    for pod in _pods(build_gang(parse_finetune_job(BASE), "uid-1", attempt=0, settings=settings)):
        assert pod["spec"]["terminationGracePeriodSeconds"] == grace
        assert _env(pod)[worker_env.STOP_GRACE_SECONDS] == str(stop_grace)


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

"""`finetune-operator` as users run it: a real process, logging in through a kubeconfig."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.kube import pods as kubelet
from tests.kube.fixtures import emulated_cluster
from tests.kube.semantics import FINETUNEJOBS
from tests.test_operator import NS, manifest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


def _kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulated", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "tester"}}],
        "current-context": "emulated",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.asyncio
async def test_operator_process_serves_jobs_liveness_metrics_and_json_logs(tmp_path: Path) -> None:
    liveness, metrics = _free_port(), _free_port()
    async with emulated_cluster() as (url, kube):
        env = {**os.environ, "KUBECONFIG": str(_kubeconfig(tmp_path / "kubeconfig", url))}
        command = [
            str(Path(sys.executable).parent / "finetune-operator"),
            f"--namespace={NS}",
            f"--liveness-port={liveness}",
            f"--metrics-port={metrics}",
            "--default-image=registry.example/trainer:9",
            "--log-format=json",
        ]
        log = (tmp_path / "operator.log").open("w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            kube.create_object(FINETUNEJOBS, manifest(), NS)
            pods = await kube.wait_for(lambda: kubelet.worker_pods(kube, NS, "llm"), timeout=30, what="pods")
            assert pods[0]["spec"]["containers"][0]["image"] == "registry.example/trainer:9"

            health = await kube.wait_for(
                lambda: asyncio.to_thread(_get, f"http://127.0.0.1:{liveness}/healthz"), timeout=10
            )
            assert health[0] == 200
            status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{metrics}/metrics")
            assert status == 200
            assert 'finetune_jobs{phase="Pending"} 1.0' in text
            assert "finetune_time_to_all_workers_running_seconds_bucket" in text
        finally:
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 20)
            log.close()
        lines = [line for line in (tmp_path / "operator.log").read_text().splitlines() if line.strip()]
        assert code in (0, -signal.SIGTERM)
        assert lines and all(json.loads(line)["message"] is not None for line in lines)
        assert "Traceback" not in "\n".join(lines)
        assert "not-checked" not in "\n".join(lines)


def test_help_lists_the_settings() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "finetune-operator"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for flag in ("--namespace", "--all-namespaces", "--default-image", "--peering", "--liveness-port"):
        assert flag in result.stdout

"""Runs the real trainer the way a worker pod does (the launcher, torchrun, DeepSpeed on gloo) against
an S3 server on loopback, with a tiny model and dataset made in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from finetune_operator.api.resolve import resolve_trainer_config
from finetune_operator.api.validation import parse_finetune_job
from finetune_trainer.config import TrainerConfig
from finetune_trainer.summary import TerminationSummary, parse_termination_message
from finetune_trainer.tiny import build_tiny_model, demo_rows

from tests.kube.controlplane import free_port
from tests.manifests import minimal_manifest
from tests.s3server import REGION, s3_env


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def upload_tree(endpoint: str, directory: Path, bucket: str, prefix: str) -> None:
    client = s3_client(endpoint)
    for path in directory.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")


def put_jsonl(endpoint: str, bucket: str, key: str, rows: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=body)


def seed_store(endpoint: str, workdir: Path, bucket: str = "finetune") -> None:
    """A bucket with the tiny model (models/tiny/) and a memorisable chat dataset (data/chat.jsonl)."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    model_dir = build_tiny_model(workdir / "tiny-model")
    upload_tree(endpoint, model_dir, bucket, "models/tiny")
    put_jsonl(endpoint, bucket, "data/chat.jsonl", demo_rows(64))


def trainer_config(
    endpoint: str, name: str = "job", bucket: str = "finetune", **spec: dict[str, Any]
) -> TrainerConfig:
    """The configuration the operator would write for a small CPU job on the seeded store."""
    sections: dict[str, dict[str, Any]] = {
        "model": {"uri": f"s3://{bucket}/models/tiny/"},
        "dataset": {"train": f"s3://{bucket}/data/chat.jsonl", "maxSeqLength": 64},
        "hyperparameters": {
            "maxSteps": 6,
            "batchSizePerDevice": 4,
            "learningRate": 3e-3,
            "precision": "fp32",
        },
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "storage": {"endpoint": endpoint, "region": REGION},
        "output": {"uri": f"s3://{bucket}/out/{name}/", "checkpointEverySteps": 3},
    }
    for section, values in spec.items():
        sections[section] = {**sections.get(section, {}), **values}
    job = parse_finetune_job(minimal_manifest(name, **sections))
    return resolve_trainer_config(job)


@dataclass
class Run:
    code: int
    summary: TerminationSummary | None
    log: str


def start_trainer(
    config: TrainerConfig, workdir: Path, endpoint: str, processes: int
) -> tuple[subprocess.Popen[str], Path]:
    """Starts `python -m finetune_trainer.launch` as a pod would, with `processes` local ranks."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(
        update={"reporting": config.reporting.model_copy(update={"progress_port": free_port()})}
    )
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    termination = workdir / "termination-log"
    termination.unlink(missing_ok=True)
    env = {
        **os.environ,
        **s3_env(endpoint),
        "NNODES": "1",
        "NODE_RANK": "0",
        "NPROC_PER_NODE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "FINETUNE_CONFIG": str(config_file),
        "TERMINATION_MESSAGE_PATH": str(termination),
        "FINETUNE_WORKSPACE": str(workdir / "workspace"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log = (workdir / "trainer.log").open("w")
    # Its own process group, like a pod's container: killing the group kills torchrun and every rank.
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer.launch"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return process, termination


def run_trainer(
    config: TrainerConfig, workdir: Path, endpoint: str, processes: int = 2, timeout: float = 300
) -> Run:
    process, termination = start_trainer(config, workdir, endpoint, processes)
    return finish_trainer(process, termination, workdir, timeout)


def finish_trainer(
    process: subprocess.Popen[str], termination: Path, workdir: Path, timeout: float = 300
) -> Run:
    """Waits for a trainer start_trainer started: its exit code, termination message and log. One that
    outlives ``timeout`` is killed with its whole process group, so that no rank lingers to slow or
    block the next test, and the test fails with the log's tail."""
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        tail = (workdir / "trainer.log").read_text()[-3000:]
        message = f"the trainer ran past {timeout} s and was killed; its log ends:\n{tail}"
        raise AssertionError(message) from None
    text = termination.read_text() if termination.exists() else None
    return Run(code, parse_termination_message(text), (workdir / "trainer.log").read_text())


def run_ranks(module: str, args: list[str], processes: int, timeout: float = 240) -> str:
    """Runs ``python -m module args`` as ``processes`` gloo ranks under torchrun (``--standalone``: a
    free port of its own), one thread each; returns the ranks' output, and fails the test with it when
    one fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    result = subprocess.run(
        [*command, str(processes), "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output

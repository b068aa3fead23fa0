"""`finetune validate --fit` and `finetune render`: the memory estimate from the model's config.json,
read from a --store folder, from S3 (a loopback moto server) or from the job's annotation; an
unreachable model is one line, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from finetune_operator.api.memory_fit import MODEL_CONFIG_ANNOTATION
from finetune_operator.cli import main

from tests.manifests import minimal_manifest
from tests.s3server import REGION, S3Server, s3_env, s3_server
from tests.test_memory_fit import LLAMA_3_8B
from tests.test_validate import run_cli

FULL_ZERO3_8 = {"method": {"type": "full"}, "deepspeed": {"zeroStage": 3}, "resources": {"gpusPerNode": 8}}
FULL_ZERO2_1 = {"method": {"type": "full"}, "deepspeed": {"zeroStage": 2}, "resources": {"gpusPerNode": 1}}


def write_job(tmp_path: Path, annotations: dict[str, str] | None = None, **spec: Any) -> Path:
    manifest = minimal_manifest(**spec)
    if annotations:
        manifest["metadata"]["annotations"] = annotations
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """s3://models/base/config.json (the minimal manifest's model) as a --store folder."""
    folder = tmp_path / "store"
    (folder / "models" / "base").mkdir(parents=True)
    (folder / "models" / "base" / "config.json").write_text(json.dumps(LLAMA_3_8B))
    return folder


def test_fits_on_eight_80gb_gpus(tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path, **FULL_ZERO3_8)
    code, out = run_cli(capsys, "validate", "--fit", "--store", str(store), str(job))
    assert code == 0, out
    for term in ("weights", "gradients", "optimizer", "activations", "logits", "overhead", "total"):
        assert f"  {term} " in out
    assert "8.03B parameters" in out and "8 GPU(s)" in out
    assert "80.0 GiB, the default (an 80 GB A100/H100; set --gpu-memory)" in out
    assert "  fits (" in out
    # The line that lets the operator check it too.
    assert f"{MODEL_CONFIG_ANNOTATION}: '" in out and '"hidden_size":4096' in out


def test_does_not_fit_on_one_gpu_exits_1_with_what_would(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, **FULL_ZERO2_1)
    code, out = run_cli(capsys, "validate", "--fit", "--gpu-memory", "80GiB", "--store", str(store), str(job))
    assert code == 1
    assert "does not fit (" in out
    assert "would fit: deepspeed.offload cpu" in out
    assert "would fit: method lora" in out
    assert "not enough: deepspeed.zeroStage 3:" in out
    assert "from --gpu-memory" in out
    assert "1 clearly too big for their GPUs" in out
    # Without --fit, validate checks only the manifest.
    assert run_cli(capsys, "validate", str(job))[0] == 0


def test_a_bigger_gpu_flag_changes_the_verdict(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, method={"type": "lora"}, resources={"gpusPerNode": 1})
    assert (
        run_cli(capsys, "validate", "--fit", "--gpu-memory", "80GiB", "--store", str(store), str(job))[0] == 0
    )
    code, out = run_cli(capsys, "validate", "--fit", "--gpu-memory", "16GiB", "--store", str(store), str(job))
    assert code == 1 and "does not fit" in out


def test_an_unreachable_model_is_one_line_and_not_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, **FULL_ZERO2_1)
    code, out = run_cli(capsys, "validate", "--fit", "--store", str(tmp_path / "empty"), str(job))
    assert code == 0
    assert "memory fit: cannot read s3://models/base/config.json: No such file or directory" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not JSON"),
        ("[1]", "expected a JSON object, got list"),
        (
            json.dumps({**LLAMA_3_8B, "num_hidden_layers": 0}),
            "num_hidden_layers is 0; expected an integer from 1",
        ),
    ],
)
def test_a_bad_config_json_is_named(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str], content: str, words: str
) -> None:
    (store / "models" / "base" / "config.json").write_text(content)
    job = write_job(tmp_path, **FULL_ZERO2_1)
    code, out = run_cli(capsys, "validate", "--fit", "--store", str(store), str(job))
    assert code == 0 and words in out and "config.json" in out and "Traceback" not in out


def test_the_annotation_is_used_when_the_model_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, {MODEL_CONFIG_ANNOTATION: json.dumps(LLAMA_3_8B)}, **FULL_ZERO2_1)
    code, out = run_cli(capsys, "validate", "--fit", "--store", str(tmp_path / "empty"), str(job))
    assert code == 1 and "using the model shape of annotation" in out and "does not fit" in out


def test_a_stale_annotation_is_warned_about(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = json.dumps({**LLAMA_3_8B, "num_hidden_layers": 16})
    job = write_job(tmp_path, {MODEL_CONFIG_ANNOTATION: stale}, **FULL_ZERO3_8)
    code, out = run_cli(capsys, "validate", "--fit", "--store", str(store), str(job))
    assert code == 0 and f"warning: annotation {MODEL_CONFIG_ANNOTATION} does not match" in out


def test_a_bad_gpu_memory_flag_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = write_job(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["validate", "--fit", "--gpu-memory", "lots", str(job)])
    assert exited.value.code == 2
    assert "GPU memory 'lots': expected a size such as 80GiB" in capsys.readouterr().err


def test_render_prints_the_estimate_as_comments(
    tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, **FULL_ZERO2_1)
    code, out = run_cli(capsys, "render", "--store", str(store), str(job))
    assert code == 0  # render shows the estimate; validate --fit is the check that fails
    header = out.split("apiVersion", 1)[0]
    assert header.startswith("# job:\n# memory fit: 8.03B parameters") and "#   does not fit (" in header
    assert all(line.startswith("#") for line in header.splitlines())
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["Service", "ConfigMap", "Pod"]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    with s3_server() as server:
        for name, value in s3_env(server.endpoint).items():
            monkeypatch.setenv(name, value)
        yield server


def test_config_json_is_read_from_s3(
    tmp_path: Path, s3: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name=REGION)
    client.create_bucket(Bucket="fit-models")
    client.put_object(Bucket="fit-models", Key="llama/config.json", Body=json.dumps(LLAMA_3_8B).encode())
    storage = {"endpoint": s3.endpoint, "region": REGION}
    job = write_job(tmp_path, model={"uri": "s3://fit-models/llama/"}, storage=storage, **FULL_ZERO2_1)
    code, out = run_cli(capsys, "validate", "--fit", str(job))
    assert code == 1 and "8.03B parameters" in out and "does not fit" in out
    # A missing object: one line naming it, and the job is not checked.
    job = write_job(tmp_path, model={"uri": "s3://fit-models/absent/"}, storage=storage, **FULL_ZERO2_1)
    code, out = run_cli(capsys, "validate", "--fit", str(job))
    assert code == 0 and "memory fit: cannot read s3://fit-models/absent/config.json:" in out
    assert "Traceback" not in out

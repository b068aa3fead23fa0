"""Every example's shape runs with `finetune run --store DIR` on this machine's CPU.

Each example is taken as written (method, data format, columns, ZeRO stage, evaluation, output),
with only what no CPU test can hold changed: the base model is the tiny offline Llama at the
example's own model URI, the data are a few generated rows in the example's format at its own
dataset URIs, at most two nodes of one rank each, and a few steps instead of epochs. QLoRA needs
GPUs: on a CPU the run must say so, naming the method, and start nothing.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from finetune_trainer.tiny import build_tiny_model, demo_rows

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(Path(sys.executable).parent / "finetune")
STEPS = 4


def store_path(store: Path, uri: str) -> Path:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return store / bucket / key


def rows_for(dataset: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """``count`` rows in the example's format, under the example's column names."""
    fmt, columns = dataset.get("format", "chat"), dataset.get("columns", {})
    if fmt == "chat":
        return demo_rows(count)
    if fmt == "instruction":
        rows = [
            {"instruction": "Name the capital.", "input": chat["messages"][0]["content"],
             "output": chat["messages"][1]["content"]}
            for chat in demo_rows(count)
        ]  # fmt: skip
    elif fmt == "classification":
        queues = ["billing", "outage", "account"]
        rows = [{"text": f"ticket {i} about {queues[i % 3]}", "label": queues[i % 3]} for i in range(count)]
    else:
        raise AssertionError(f"no rows for format {fmt}")
    return [{columns.get(key, key): value for key, value in row.items()} for row in rows]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def on_this_machine(example: dict[str, Any], store: Path, tiny_model: Path) -> dict[str, Any]:
    """The example with only what a CPU test cannot hold changed (see the module docstring)."""
    job = copy.deepcopy(example)
    spec = job["spec"]
    shutil.copytree(tiny_model, store_path(store, spec["model"]["uri"]))  # the store refuses links out
    for key in ("train", "eval"):
        if key in spec["dataset"]:
            write_rows(store_path(store, spec["dataset"][key]), rows_for(spec["dataset"], 48))
    output_bucket = spec["output"]["uri"].removeprefix("s3://").split("/")[0]
    (store / output_bucket).mkdir(parents=True, exist_ok=True)  # as on S3, the bucket must exist
    spec["dataset"]["maxSeqLength"] = 256  # the instruction template alone is ~60 tokens here
    hyper = spec["hyperparameters"]
    hyper.pop("epochs", None)
    hyper |= {"maxSteps": STEPS, "batchSizePerDevice": 2, "gradientAccumulationSteps": 1}
    spec["resources"] |= {"nodes": min(spec["resources"].get("nodes", 1), 2), "gpusPerNode": 1}
    spec["output"]["checkpointEverySteps"] = STEPS // 2
    if "evaluation" in spec:
        spec["evaluation"]["everySteps"] = STEPS // 2
    return job


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Six blocks: the freeze example trains its top four and keeps the rest frozen.
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", layers=6)


def run(job: dict[str, Any], store: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job))
    command = [FINETUNE, "run", str(manifest), "--store", str(store)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def status_block(output: str) -> dict[str, Any]:
    block = output[output.rindex("\nstatus:\n") :].strip().split("\n\n")[0]
    return yaml.safe_load(io.StringIO(block))["status"]


@pytest.mark.parametrize("name", ["lora-single-node", "classification-freeze", "full-multinode-zero3"])
def test_example_shape_runs_on_a_folder_store(name: str, tiny_model: Path, tmp_path: Path) -> None:
    example = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    store = tmp_path / "store"
    job = on_this_machine(example, store, tiny_model)
    result = run(job, store, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = status_block(result.stdout)
    assert status["phase"] == "Succeeded", status
    output = store_path(store, example["spec"]["output"]["uri"])
    assert (output / "model").is_dir() and json.loads((output / "metrics.json").read_text())
    manifests = sorted(output.glob("checkpoints/step-*/manifest.json"))
    assert manifests, f"no complete checkpoint under {output}"
    assert "Traceback" not in result.stdout + result.stderr


def test_qlora_example_says_it_needs_gpus(tiny_model: Path, tmp_path: Path) -> None:
    example = yaml.safe_load((ROOT / "examples" / "qlora.yaml").read_text())
    store = tmp_path / "store"
    result = run(on_this_machine(example, store, tiny_model), store, tmp_path)
    assert result.returncode != 0
    assert "method qlora needs GPUs" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not store_path(store, example["spec"]["output"]["uri"]).exists()  # nothing was started

"""Checkpoint completeness and cost, in one process (a world of one gloo rank) against S3 on loopback,
and the same completeness and pruning on the folder store that `finetune run --store` uses."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from finetune_trainer.checkpointing import Checkpointer, find_complete
from finetune_trainer.storage import FolderStore, ObjectStore, S3Store, StoredFile

from tests.s3server import s3_server
from tests.trainer_runs import s3_client

BUCKET = "checkpoints"
OUTPUT = f"s3://{BUCKET}/job/"


class FakeEngine:
    """Writes shard files the way DeepSpeed's save_checkpoint does: <dir>/<tag>/*.pt."""

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        target = Path(directory) / tag
        target.mkdir(parents=True)
        (target / "mp_rank_00_model_states.pt").write_bytes(b"m" * 1000)
        (target / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 3000)


class GatedStore(S3Store):
    """Uploads wait for the test's go, so the test can look at training while S3 is slow."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint, "us-east-1")
        self.uploading = threading.Event()
        self.go = threading.Event()

    def upload_directory(self, source: Path, uri: str) -> list[StoredFile]:
        self.uploading.set()
        self.go.wait(30)
        return super().upload_directory(source, uri)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    with s3_server() as server:
        s3_client(server.endpoint).create_bucket(Bucket=BUCKET)
        try:
            yield server.endpoint
        finally:
            dist.destroy_process_group()


def _checkpointer(store: ObjectStore, root: Path, keep: int = 2) -> Checkpointer:
    return Checkpointer(
        store, OUTPUT, root, rank=0, local_rank=0, world_size=1, keep=keep, device=torch.device("cpu")
    )


def _keys(endpoint: str, prefix: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_training_waits_for_the_local_save_only_and_the_manifest_comes_last(
    world: str, tmp_path: Path
) -> None:
    store = GatedStore(world)
    checkpointer = _checkpointer(store, tmp_path / "local")
    checkpointer.save(FakeEngine(), 10, {"step": 10}, {"evalLoss": 1.5})
    # save() has returned (training goes on) while the upload has not even been allowed to start.
    assert store.uploading.wait(10)
    assert checkpointer.finish_pending(wait=False) is None
    assert _keys(world, "job/checkpoints/step-10/") == []
    store.go.set()
    entry = checkpointer.finish_pending(wait=True)
    assert entry is not None and entry["step"] == 10 and entry["evalLoss"] == 1.5
    keys = _keys(world, "job/checkpoints/step-10/")
    assert (
        keys[-1] == "job/checkpoints/step-10/zero_pp_rank_0_mp_rank_00_optim_states.pt"
        or "manifest" in keys[-1]
    )
    manifest = json.loads(store.get_bytes(f"{OUTPUT}checkpoints/step-10/manifest.json"))
    assert {f["path"]: f["size"] for f in manifest["files"]} == {
        "mp_rank_00_model_states.pt": 1000,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 3000,
    }
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert not (tmp_path / "local" / "step-10").exists()  # the node's disk is freed once S3 has it


@pytest.mark.parametrize("kind", ["s3", "folder"])
def test_only_complete_checkpoints_count_and_the_newest_are_kept(
    world: str, tmp_path: Path, kind: str
) -> None:
    """checkpointing.py is the same code on both stores: it must find and prune the same checkpoints."""
    if kind == "s3":
        store: ObjectStore = S3Store(world, "us-east-1")
    else:
        (tmp_path / "store" / BUCKET).mkdir(parents=True)
        store = FolderStore(tmp_path / "store")
    checkpointer = _checkpointer(store, tmp_path / "local", keep=2)
    for step in (5, 10, 15):
        checkpointer.save(FakeEngine(), step, {}, {})
        checkpointer.finish_pending(wait=True)
    assert [c.step for c in find_complete(store, OUTPUT)] == [15, 10]
    assert store.list_files(f"{OUTPUT}checkpoints/step-5/") == []  # pruned
    assert store.list_subprefixes(f"{OUTPUT}checkpoints/") == [
        f"{OUTPUT}checkpoints/step-10/",
        f"{OUTPUT}checkpoints/step-15/",
    ]
    # A newer upload without its manifest, and one whose file was cut short, are never loaded.
    store.put_bytes(f"{OUTPUT}checkpoints/step-20/mp_rank_00_model_states.pt", b"m" * 1000)
    manifest = json.loads(store.get_bytes(f"{OUTPUT}checkpoints/step-15/manifest.json"))
    store.put_bytes(f"{OUTPUT}checkpoints/step-25/manifest.json", json.dumps(manifest).encode())
    store.put_bytes(f"{OUTPUT}checkpoints/step-25/mp_rank_00_model_states.pt", b"m" * 10)
    assert [c.step for c in find_complete(store, OUTPUT)] == [15, 10]

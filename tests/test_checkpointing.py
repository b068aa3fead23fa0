"""Checkpoint completeness and cost, in one process (a world of one gloo rank) against S3 on loopback,
and the same completeness and pruning on the folder store that `finetune run --store` uses; bad
checkpoints skipped, in two gloo ranks (two processes) where resuming must agree across ranks; a
local save onto a full disk."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from finetune_trainer import checkpointing
from finetune_trainer.checkpointing import Checkpointer, CheckpointSaveError, find_complete
from finetune_trainer.storage import FolderStore, ObjectStore, S3Store, StoredFile

from tests.s3server import s3_server
from tests.trainer_runs import s3_client

BUCKET = "checkpoints"
OUTPUT = f"s3://{BUCKET}/job/"


class FakeEngine:
    """Writes shard files the way DeepSpeed's save_checkpoint does: <dir>/<tag>/*.pt."""

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        target = Path(directory) / tag
        target.mkdir(parents=True, exist_ok=True)  # as DeepSpeed's makedirs(exist_ok=True)
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


# --- bad checkpoints are skipped ------------------------------------------------------------------


def _folder_store(tmp_path: Path) -> FolderStore:
    (tmp_path / "store" / BUCKET).mkdir(parents=True)
    return FolderStore(tmp_path / "store")


def _put_checkpoint(store: ObjectStore, step: int, manifest: Any = None, world_size: int = 1) -> None:
    """A checkpoint's file and, unless ``manifest`` is given (raw bytes or a value), its true manifest."""
    data = b"m" * 100
    store.put_bytes(f"{OUTPUT}checkpoints/step-{step}/mp_rank_00_model_states.pt", data)
    if manifest is None:
        entry = {
            "path": "mp_rank_00_model_states.pt",
            "size": 100,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        manifest = {"step": step, "worldSize": world_size, "metrics": {}, "files": [entry]}
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    store.put_bytes(f"{OUTPUT}checkpoints/step-{step}/manifest.json", body)


GOOD_ENTRY = {"path": "mp_rank_00_model_states.pt", "size": 100, "sha256": "0" * 64}
BAD_MANIFESTS: dict[str, tuple[Any, str]] = {
    "not JSON": (b'{"step": 60, "files": [', "its manifest.json is not valid JSON"),
    "not UTF-8": (b"\xff\xfe", "its manifest.json is not valid JSON"),
    "an array": ([GOOD_ENTRY], "the manifest is a JSON list, not an object"),
    "no files": ({"step": 40, "worldSize": 1}, "the manifest has no 'files' list"),
    "files not a list": ({"worldSize": 1, "files": "all"}, "the manifest has no 'files' list"),
    "entry not an object": ({"worldSize": 1, "files": ["x"]}, "files[0] is not a {path, size, sha256}"),
    "entry without size": (
        {"worldSize": 1, "files": [{"path": "a", "sha256": "0" * 64}]},
        "files[0] is not a {path, size, sha256}",
    ),
    "path out of the prefix": (
        {"worldSize": 1, "files": [{**GOOD_ENTRY, "path": "../../x"}]},
        "files[0] is not a {path, size, sha256}",
    ),
    "no worldSize": ({"files": [GOOD_ENTRY]}, "the manifest has no positive 'worldSize'"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_a_bad_manifest_is_skipped_with_a_warning(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = _folder_store(tmp_path)
    _put_checkpoint(store, 10)
    manifest, problem = BAD_MANIFESTS[case]
    _put_checkpoint(store, 20, manifest)
    with caplog.at_level(logging.WARNING, logger="finetune_trainer.checkpointing"):
        assert [c.step for c in find_complete(store, OUTPUT)] == [10]
    warning = f"skipping checkpoint {OUTPUT}checkpoints/step-20/: "
    assert any(r.getMessage().startswith(warning) and problem in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


class RankEngine:
    """Saves and loads as DeepSpeed does: rank 0 writes the model states with the client state, every
    rank its own optimizer shard, all with torch.save; loading reads them back."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.loaded: str | None = None

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        target = Path(directory) / tag
        target.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            torch.save({"client_state": client_state}, target / "mp_rank_00_model_states.pt")
        torch.save({"rank": self.rank, "m": torch.arange(256.0)}, target / self._shard())
        dist.barrier()

    def load_checkpoint(self, directory: str, tag: str, **_: bool) -> tuple[str, dict[str, Any]]:
        target = Path(directory) / tag
        assert torch.load(target / self._shard())["rank"] == self.rank
        self.loaded = tag
        return str(target), torch.load(target / "mp_rank_00_model_states.pt")["client_state"]

    def _shard(self) -> str:
        return f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class CorruptingStore(S3Store):
    """A node whose downloads of one checkpoint arrive with a flipped byte (a bad disk or network):
    the store's digests are of what arrived, as S3Store's are."""

    def __init__(self, endpoint: str, corrupt: str) -> None:
        super().__init__(endpoint, "us-east-1")
        self.corrupt = corrupt

    def download_prefix(self, uri: str, destination: Path) -> list[StoredFile]:
        files = super().download_prefix(uri, destination)
        if self.corrupt not in uri:
            return files
        _flip_a_byte(destination / "mp_rank_00_model_states.pt")
        return [
            StoredFile(
                f.relative_path,
                f.size,
                hashlib.sha256((destination / f.relative_path).read_bytes()).hexdigest(),
            )
            for f in files
        ]


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _resume_rank(rank: int, endpoint: str, workdir: Path, scenario: str) -> None:
    """One of two ranks, each its own node (local rank 0, its own disk): saves step-10, 20 and 30,
    rank 0 spoils 30's manifest (and, in the store scenario, a byte of 20's shard); then resumes."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),  # a rank left in a collective fails the test within a minute
    )
    warnings = _Warnings()
    logging.getLogger("finetune_trainer.checkpointing").addHandler(warnings)
    try:
        store = S3Store(endpoint, "us-east-1")

        def checkpointer(node_store: ObjectStore) -> Checkpointer:
            return Checkpointer(
                node_store,
                OUTPUT,
                workdir / f"node-{rank}",
                rank=rank,
                local_rank=0,
                world_size=2,
                keep=5,
                device=torch.device("cpu"),
            )

        saver = checkpointer(store)
        for step in (10, 20, 30):
            saver.save(RankEngine(rank), step, {"step": step}, {"evalLoss": 1.0 / step})
            saver.finish_pending(wait=True)
        dist.barrier()
        if rank == 0:
            store.put_bytes(f"{OUTPUT}checkpoints/step-30/manifest.json", b'{"step": 30, "files": [')
            if scenario == "store":
                shard = f"{OUTPUT}checkpoints/step-20/zero_pp_rank_1_mp_rank_00_optim_states.pt"
                data = bytearray(store.get_bytes(shard))
                data[len(data) // 2] ^= 0xFF
                store.put_bytes(shard, bytes(data))
        dist.barrier()
        node_store = CorruptingStore(endpoint, "step-20") if scenario == "one node" and rank == 1 else store
        resumer = checkpointer(node_store)
        engine = RankEngine(rank)
        state = resumer.resume(engine)
        result = {
            "state": state,
            "loaded": engine.loaded,
            "completed": [entry["step"] for entry in resumer.completed],
            "corrupt": sorted(resumer.corrupt),
            "warnings": warnings.messages,
            "left_on_disk": sorted(p.name for p in (workdir / f"node-{rank}").iterdir()),
        }
        (workdir / f"rank-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scenario", ["store", "one node"])
def test_resume_skips_corrupt_checkpoints_on_every_rank_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    """Newest: a manifest that is not JSON; next: a shard whose byte is flipped in the store (or that
    arrives flipped on one node only); both ranks resume from the older good one, with warnings."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    context = multiprocessing.get_context("spawn")
    with s3_server() as server:
        s3_client(server.endpoint).create_bucket(Bucket=BUCKET)
        ranks = [
            context.Process(target=_resume_rank, args=(rank, server.endpoint, tmp_path, scenario))
            for rank in (0, 1)
        ]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(180)
        hung = [process.pid for process in ranks if process.is_alive()]
        for process in ranks:
            if process.is_alive():
                process.kill()
        assert not hung, f"ranks {hung} hung"
        assert [process.exitcode for process in ranks] == [0, 0]
    results = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    step_20, step_30 = (f"{OUTPUT}checkpoints/step-{step}/" for step in (20, 30))
    for result in results:
        assert result["state"] == {"step": 10} and result["loaded"] == "step-10"
        assert result["corrupt"] == [step_20]
        assert result["left_on_disk"] == []  # downloads removed, the corrupt one's too
    assert results[0]["completed"] == [10]  # rank 0 reports the checkpoints; 20 and 30 are not usable
    assert f"skipping checkpoint {step_30}: its manifest.json is not valid JSON" in results[0]["warnings"][0]
    corrupt_shard = (
        "zero_pp_rank_1_mp_rank_00_optim_states.pt" if scenario == "store" else "mp_rank_00_model_states.pt"
    )
    sha_warning = (
        f"skipping checkpoint {step_20}: {corrupt_shard} does not match its SHA-256 in the manifest "
        "(corrupt); trying the next older one"
    )
    assert sha_warning in results[1]["warnings"]
    if scenario == "store":
        assert sha_warning in results[0]["warnings"]
    else:
        assert f"skipping checkpoint {step_20}: another node found it corrupt" in results[0]["warnings"]


# --- a full disk during a local save ----------------------------------------------------------------


class TorchEngine:
    """Writes its shards with torch.save, as DeepSpeed's checkpoint engine does."""

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        target = Path(directory) / tag
        target.mkdir(parents=True, exist_ok=True)
        torch.save({"m": torch.arange(1000.0)}, target / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("writer", ["python", "torch", "torch on a full disk"])
def test_a_full_disk_during_a_local_save_is_a_clear_error_and_the_previous_checkpoint_stays(
    world: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """The step folder's files are links to /dev/full, where every write fails with ENOSPC. torch.save
    hides the errno, so there the disk's free space decides (made small for the last case)."""
    store = S3Store(world, "us-east-1")
    local = tmp_path / "local"
    checkpointer = _checkpointer(store, local)
    checkpointer.save(FakeEngine(), 5, {}, {})
    checkpointer.finish_pending(wait=True)
    step_folder = local / "step-10"
    step_folder.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (step_folder / name).symlink_to("/dev/full")
    if writer == "torch on a full disk":
        monkeypatch.setattr(checkpointing, "FULL_DISK_BYTES", 2**62)
    with pytest.raises(CheckpointSaveError) as caught:
        checkpointer.save(FakeEngine() if writer == "python" else TorchEngine(), 10, {}, {})
    message = str(caught.value)
    if writer == "python":
        assert message == (
            f"no space left on device saving checkpoint step-10 under {local}: "
            "[Errno 28] No space left on device"
        )
    elif writer == "torch":
        assert message.startswith(f"cannot write checkpoint step-10 under {local} (")
        assert "GiB free there): [enforce fail at inline_container" in message
    else:
        assert message.startswith(f"no space left on device saving checkpoint step-10 under {local}: ")
    assert [c.step for c in find_complete(store, OUTPUT)] == [5]
    assert _keys(world, "job/checkpoints/step-10/") == []
    assert not step_folder.exists()  # the partial save is gone, its space given back
    # With room again, the next save completes beside the previous one.
    checkpointer.save(FakeEngine(), 15, {}, {})
    checkpointer.finish_pending(wait=True)
    assert [c.step for c in find_complete(store, OUTPUT)] == [15, 5]

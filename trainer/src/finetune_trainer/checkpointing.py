"""Checkpoints: saved locally, uploaded in the background, marked complete by a manifest written last.

Every rank saves its own DeepSpeed shards on its node's disk (training waits only for that); local
rank 0 of each node then uploads its node's files to ``<output>/checkpoints/step-<N>/`` in a
thread. Once every node has finished, global rank 0 writes ``manifest.json`` (files, sizes,
checksums): a checkpoint without a manifest whose files are all present is never loaded. Only the
newest ``keepCheckpoints`` complete checkpoints are kept.

A bad checkpoint never blocks a job: a manifest that cannot be read or lacks what it must list is
skipped with a warning, and so is a checkpoint whose downloaded files do not match the manifest's
sizes and SHA-256 checksums; resuming then tries the next older complete one, every rank agreeing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finetune_trainer.collectives import every_rank
from finetune_trainer.errors import NonRetryableError, PeerFailedError
from finetune_trainer.fault_injection import fault_point
from finetune_trainer.storage import (
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    StoredFile,
    join_uri,
)

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP = re.compile(r"step-(\d+)/?$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A local save that failed with less than this free on the disk failed for want of space.
FULL_DISK_BYTES = 64 * 1024 * 1024
# torch.save's own write errors (its zip writer, in C++): RuntimeErrors with no errno.
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    uri: str
    manifest: dict[str, Any]


def checkpoint_uri(output_uri: str, step: int) -> str:
    return join_uri(output_uri, "checkpoints", f"step-{step}") + "/"


class CheckpointSaveError(Exception):
    """A local checkpoint save failed (a full disk, most often): retryable, the store untouched."""


def manifest_problem(manifest: Any) -> str | None:
    """What makes a parsed manifest unusable, or None: it must be an object with ``worldSize`` and a
    ``files`` list of {path, size, sha256} entries (``metrics``, when present, an object)."""
    if not isinstance(manifest, dict):
        return f"the manifest is a JSON {type(manifest).__name__}, not an object"
    files = manifest.get("files")
    if not isinstance(files, list):
        return "the manifest has no 'files' list"
    for index, entry in enumerate(files):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and all(part not in ("", ".", "..") for part in entry["path"].split("/"))
            and isinstance(entry.get("size"), int)
            and not isinstance(entry["size"], bool)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        ):
            return f"the manifest's files[{index}] is not a {{path, size, sha256}} entry: {entry!r:.200}"
    world_size = manifest.get("worldSize")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        return "the manifest has no positive 'worldSize'"
    if not isinstance(manifest.get("metrics", {}), dict):
        return "the manifest's 'metrics' is not an object"
    return None


def find_complete(store: ObjectStore, output_uri: str) -> list[Checkpoint]:
    """Complete checkpoints, newest first: a manifest, and every file it lists present with its size.

    A checkpoint without a manifest is an upload that never finished; one whose manifest is not JSON,
    not an object or lacks well-formed ``files`` is skipped with a warning naming it and the problem.
    Other storage errors (a refused credential, a store that does not answer) propagate: skipping on
    them would resume from an older checkpoint than there is.
    """
    found = []
    for prefix in store.list_subprefixes(join_uri(output_uri, "checkpoints") + "/"):
        match = _STEP.search(prefix)
        if match is None:
            continue
        try:
            raw = store.get_bytes(join_uri(prefix, MANIFEST))
        except ObjectNotFoundError:
            logger.info("skipping %s: no manifest (the upload never finished)", prefix)
            continue
        try:
            manifest = json.loads(raw)
        except ValueError as error:  # also bad UTF-8
            logger.warning("skipping checkpoint %s: its %s is not valid JSON (%s)", prefix, MANIFEST, error)
            continue
        problem = manifest_problem(manifest)
        if problem is not None:
            logger.warning("skipping checkpoint %s: %s", prefix, problem)
            continue
        present = {f.relative_path: f.size for f in store.list_files(prefix)}
        missing = [f["path"] for f in manifest["files"] if present.get(f["path"]) != f["size"]]
        if missing:
            logger.warning(
                "skipping checkpoint %s: files missing or of the wrong size: %s",
                prefix,
                ", ".join(missing[:5]),
            )
            continue
        found.append(Checkpoint(int(match.group(1)), prefix, manifest))
    return sorted(found, key=lambda c: c.step, reverse=True)


def verify_download(manifest: dict[str, Any], directory: Path, downloaded: list[StoredFile]) -> str | None:
    """What is wrong with a downloaded checkpoint, or None when every file the manifest lists is in
    ``directory`` with its size and SHA-256 (the store's digests, else the file's own)."""
    digests = {f.relative_path: f for f in downloaded}
    for entry in manifest["files"]:
        path = directory / entry["path"]
        if not path.is_file():
            return f"{entry['path']} is missing after the download"
        stored = digests.get(entry["path"])
        size, sha256 = (stored.size, stored.sha256) if stored and stored.sha256 else _sha256(path)
        if size != entry["size"]:
            return f"{entry['path']} has {size} bytes, the manifest says {entry['size']}"
        if sha256 != entry["sha256"]:
            return f"{entry['path']} does not match its SHA-256 in the manifest (corrupt)"
    return None


class Checkpointer:
    def __init__(
        self,
        store: ObjectStore,
        output_uri: str,
        local_root: Path,
        *,
        rank: int,
        local_rank: int,
        world_size: int,
        keep: int,
        device: torch.device,
    ) -> None:
        self.store = store
        self.output_uri = output_uri
        self.local_root = local_root
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.keep = keep
        self.device = device
        self._pending: tuple[int, dict[str, Any], threading.Thread | None] | None = None
        self._uploaded: list[StoredFile] = []
        self._upload_error: BaseException | None = None
        self._saved_at = 0.0
        self.completed: list[dict[str, Any]] = []
        # Checkpoints that resume found corrupt: never among those pruning keeps, until saved anew.
        self.corrupt: set[str] = set()

    # --- saving -----------------------------------------------------------------------------------

    def save(self, engine: Any, step: int, client_state: dict[str, Any], metrics: dict[str, float]) -> float:
        """Saves locally (collective) and starts this node's upload; returns the seconds training waited."""
        self.finish_pending(wait=True)
        started = time.monotonic()
        tag = f"step-{step}"
        try:
            engine.save_checkpoint(str(self.local_root), tag=tag, client_state=client_state)
        except (OSError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not _TORCH_WRITE_FAILED.search(str(error)):
                raise  # not a write: a collective, a CUDA error
            # Nothing reached the store: the previous complete checkpoint stays as it was. This rank
            # raises at once (the others are in DeepSpeed's closing barrier, ended when it exits).
            failure = self._save_failure(tag, error)
            shutil.rmtree(self.local_root / tag, ignore_errors=True)  # give the disk back for the retry
            raise failure from error
        dist.barrier()  # every rank's shard is on disk before its node uploads the directory
        waited = time.monotonic() - started
        thread = None
        if self.local_rank == 0:
            self._uploaded, self._upload_error = [], None
            thread = threading.Thread(
                target=self._upload, args=(tag, step), name=f"upload-{tag}", daemon=True
            )
            thread.start()
        self._pending = (step, metrics, thread)
        self._saved_at = time.monotonic()
        return waited

    def _save_failure(self, tag: str, error: OSError | RuntimeError) -> CheckpointSaveError:
        """The error for a failed local save. torch.save reports a full disk as a bare RuntimeError
        ("unexpected pos"), without an errno, so the disk's free space decides there."""
        try:
            free = shutil.disk_usage(self.local_root).free
        except OSError:
            free = None
        full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
            free is not None and free < FULL_DISK_BYTES
        )
        where = f"checkpoint {tag} under {self.local_root}"
        if full:
            return CheckpointSaveError(f"no space left on device saving {where}: {error}")
        room = f" ({free / 2**30:.1f} GiB free there)" if free is not None else ""
        return CheckpointSaveError(f"cannot write {where}{room}: {error}")

    def _upload(self, tag: str, step: int) -> None:
        try:
            fault_point("checkpoint-upload", step)
            self._uploaded = self.store.upload_directory(
                self.local_root / tag, checkpoint_uri(self.output_uri, step)
            )
        except Exception as error:  # reported to the training loop, collectively, at the next check
            self._upload_error = error

    def finish_pending(self, wait: bool) -> dict[str, Any] | None:
        """Collective: once every node's upload is done, rank 0 writes the manifest and prunes.

        Without ``wait`` it only looks (cheap, at log intervals), so training never blocks on S3.
        """
        if self._pending is None:
            return None
        step, metrics, thread = self._pending
        if thread is not None and wait:
            thread.join()
        local_done = thread is None or not thread.is_alive()
        if not every_rank(local_done, self.device):
            return None
        if not every_rank(self._upload_error is None, self.device):
            # Every rank stops together; the node that failed says why.
            failed = f"another node failed to upload checkpoint step-{step}"
            raise self._upload_error or PeerFailedError(failed)
        node_files = [f.__dict__ for f in self._uploaded]
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, node_files)
        self._pending = None
        entry = {"step": step, "uri": checkpoint_uri(self.output_uri, step), "time": _now(), **metrics}
        self.corrupt.discard(entry["uri"])  # written again, whole: its new manifest replaces the old one
        if self.rank == 0:
            files = {f["relative_path"]: f for node in gathered for f in node}
            manifest = {
                "step": step,
                "worldSize": self.world_size,
                "time": entry["time"],
                "metrics": metrics,
                "files": [
                    {"path": path, "size": f["size"], "sha256": f["sha256"]}
                    for path, f in sorted(files.items())
                ],
            }
            self.store.put_bytes(join_uri(entry["uri"], MANIFEST), json.dumps(manifest, indent=2).encode())
            self._prune()
        if self.local_rank == 0:
            shutil.rmtree(self.local_root / f"step-{step}", ignore_errors=True)
        self.completed.append(entry)
        if self.rank == 0:
            seconds = time.monotonic() - self._saved_at
            logger.info("checkpoint step-%d complete in S3 %.2fs after its local save", step, seconds)
        return entry

    def _prune(self) -> None:
        """Keeps the newest complete checkpoints; deletes older ones and leftovers without a manifest."""
        complete = [c for c in find_complete(self.store, self.output_uri) if c.uri not in self.corrupt]
        keep = {c.uri for c in complete[: self.keep]}
        for prefix in self.store.list_subprefixes(join_uri(self.output_uri, "checkpoints") + "/"):
            if prefix not in keep:
                self.store.delete_prefix(prefix)

    # --- resuming ---------------------------------------------------------------------------------

    def resume(self, engine: Any) -> dict[str, Any] | None:
        """Loads the newest usable complete checkpoint into the engine; returns its client state, or None.

        Rank 0 lists the complete checkpoints and broadcasts them. Each node downloads the newest and
        checks every file against the manifest (size, SHA-256); when any node finds it corrupt, every
        rank learns so through one all-reduce and all move on to the next older one together. A
        download that fails (the store, the local disk) stops every rank: it is no verdict on the
        checkpoint, so none is skipped for it.
        """
        listed: list[list[Checkpoint] | None] = [None]
        if self.rank == 0:
            listed[0] = find_complete(self.store, self.output_uri)
        dist.broadcast_object_list(listed, src=0)
        candidates = listed[0] or []
        for checkpoint in candidates:
            if checkpoint.manifest["worldSize"] != self.world_size:
                raise NonRetryableError(
                    f"checkpoint {checkpoint.uri} was written by {checkpoint.manifest['worldSize']} ranks "
                    f"but this run has {self.world_size}: resume with the same nodes x gpusPerNode"
                )
            tag = f"step-{checkpoint.step}"
            if not self._fetch_verified(checkpoint, tag):
                self.corrupt.add(checkpoint.uri)
                continue
            _, client_state = engine.load_checkpoint(
                str(self.local_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            dist.barrier()  # every rank has read the files before they are removed
            if self.local_rank == 0:
                shutil.rmtree(self.local_root / tag, ignore_errors=True)
            newest_first = [c for c in candidates if c.uri not in self.corrupt] if self.rank == 0 else []
            self.completed = [_status_entry(c) for c in reversed(newest_first)]
            logger.info("resumed from %s", checkpoint.uri)
            return client_state or {}
        if candidates:
            logger.warning("no usable checkpoint among %d complete ones: starting afresh", len(candidates))
        return None

    def _fetch_verified(self, checkpoint: Checkpoint, tag: str) -> bool:
        """Collective: each node's local rank 0 downloads the checkpoint and verifies it. True when it
        is good on every node; False (every rank) when corrupt on some node, which warns; raises on
        every rank when a download failed somewhere."""
        target = self.local_root / tag
        problem: str | None = None
        failure: BaseException | None = None
        if self.local_rank == 0:
            shutil.rmtree(target, ignore_errors=True)
            try:
                downloaded = self.store.download_prefix(checkpoint.uri, target)
                (target / MANIFEST).unlink(missing_ok=True)
                problem = verify_download(checkpoint.manifest, target, downloaded)
            except (StorageError, OSError) as error:  # reported collectively, below
                failure = error
        if not every_rank(failure is None, self.device):
            if self.local_rank == 0:
                shutil.rmtree(target, ignore_errors=True)
            raise failure or StorageError(f"another node failed to download checkpoint {checkpoint.uri}")
        if every_rank(problem is None, self.device):
            return True
        if problem is not None:
            logger.warning("skipping checkpoint %s: %s; trying the next older one", checkpoint.uri, problem)
        elif self.rank == 0:
            logger.warning("skipping checkpoint %s: another node found it corrupt", checkpoint.uri)
        if self.local_rank == 0:
            shutil.rmtree(target, ignore_errors=True)
        return False


def _status_entry(checkpoint: Checkpoint) -> dict[str, Any]:
    """A checkpoint as the FinetuneJob status lists it: step, uri, time and its eval metrics."""
    manifest = checkpoint.manifest
    return {
        "step": checkpoint.step,
        "uri": checkpoint.uri,
        "time": manifest.get("time", ""),
        **manifest.get("metrics", {}),
    }


def _sha256(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

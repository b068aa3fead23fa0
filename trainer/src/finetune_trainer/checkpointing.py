"""Checkpoints: saved locally, uploaded in the background, marked complete by a manifest written last.

Every rank saves its own DeepSpeed shards on its node's disk (training waits only for that); local
rank 0 of each node then uploads its node's files to ``<output>/checkpoints/step-<N>/`` in a
thread. Once every node has finished, global rank 0 writes ``manifest.json`` (files, sizes,
checksums): a checkpoint without a manifest whose files are all present is never loaded. Only the
newest ``keepCheckpoints`` complete checkpoints are kept.
"""

from __future__ import annotations

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
from finetune_trainer.errors import NonRetryableError
from finetune_trainer.storage import ObjectStore, StorageError, StoredFile, join_uri

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP = re.compile(r"step-(\d+)/?$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    uri: str
    manifest: dict[str, Any]


def checkpoint_uri(output_uri: str, step: int) -> str:
    return join_uri(output_uri, "checkpoints", f"step-{step}") + "/"


def find_complete(store: ObjectStore, output_uri: str) -> list[Checkpoint]:
    """Complete checkpoints, newest first: a manifest, and every file it lists present with its size."""
    found = []
    for prefix in store.list_subprefixes(join_uri(output_uri, "checkpoints") + "/"):
        match = _STEP.search(prefix)
        if match is None:
            continue
        try:
            manifest = json.loads(store.get_bytes(join_uri(prefix, MANIFEST)))
        except StorageError:
            logger.info("skipping %s: no manifest (the upload never finished)", prefix)
            continue
        present = {f.relative_path: f.size for f in store.list_files(prefix)}
        missing = [f["path"] for f in manifest["files"] if present.get(f["path"]) != f["size"]]
        if missing:
            logger.warning(
                "skipping %s: files missing or of the wrong size: %s", prefix, ", ".join(missing[:5])
            )
            continue
        found.append(Checkpoint(int(match.group(1)), prefix, manifest))
    return sorted(found, key=lambda c: c.step, reverse=True)


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

    # --- saving -----------------------------------------------------------------------------------

    def save(self, engine: Any, step: int, client_state: dict[str, Any], metrics: dict[str, float]) -> float:
        """Saves locally (collective) and starts this node's upload; returns the seconds training waited."""
        self.finish_pending(wait=True)
        started = time.monotonic()
        tag = f"step-{step}"
        engine.save_checkpoint(str(self.local_root), tag=tag, client_state=client_state)
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

    def _upload(self, tag: str, step: int) -> None:
        try:
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
            raise self._upload_error or StorageError(f"another node failed to upload checkpoint step-{step}")
        node_files = [f.__dict__ for f in self._uploaded]
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(gathered, node_files)
        self._pending = None
        entry = {"step": step, "uri": checkpoint_uri(self.output_uri, step), "time": _now(), **metrics}
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
        complete = find_complete(self.store, self.output_uri)
        keep = {c.uri for c in complete[: self.keep]}
        for prefix in self.store.list_subprefixes(join_uri(self.output_uri, "checkpoints") + "/"):
            if prefix not in keep:
                self.store.delete_prefix(prefix)

    # --- resuming ---------------------------------------------------------------------------------

    def resume(self, engine: Any) -> dict[str, Any] | None:
        """Loads the newest complete checkpoint into the engine; returns its client state, or None."""
        newest: list[Checkpoint | None] = [None]
        if self.rank == 0:
            complete = find_complete(self.store, self.output_uri)
            newest[0] = complete[0] if complete else None
        dist.broadcast_object_list(newest, src=0)
        checkpoint = newest[0]
        if checkpoint is None:
            return None
        if checkpoint.manifest["worldSize"] != self.world_size:
            raise NonRetryableError(
                f"checkpoint {checkpoint.uri} was written by {checkpoint.manifest['worldSize']} ranks but "
                f"this run has {self.world_size}: resume with the same nodes x gpusPerNode"
            )
        tag = f"step-{checkpoint.step}"
        if self.local_rank == 0:
            target = self.local_root / tag
            shutil.rmtree(target, ignore_errors=True)
            self.store.download_prefix(checkpoint.uri, target)
            (target / MANIFEST).unlink(missing_ok=True)
        dist.barrier()
        _, client_state = engine.load_checkpoint(
            str(self.local_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        dist.barrier()  # every rank has read the files before they are removed
        if self.local_rank == 0:
            shutil.rmtree(self.local_root / tag, ignore_errors=True)
        newest_first = find_complete(self.store, self.output_uri) if self.rank == 0 else []
        self.completed = [_status_entry(c) for c in reversed(newest_first)]
        logger.info("resumed from %s", checkpoint.uri)
        return client_state or {}


def _status_entry(checkpoint: Checkpoint) -> dict[str, Any]:
    """A checkpoint as the FinetuneJob status lists it: step, uri, time and its eval metrics."""
    manifest = checkpoint.manifest
    return {
        "step": checkpoint.step,
        "uri": checkpoint.uri,
        "time": manifest.get("time", ""),
        **manifest["metrics"],
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

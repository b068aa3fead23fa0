"""S3 faults on real parts: boto3 through a fault-injecting proxy (tests/s3faults.py) in front of the
loopback S3 server. Transient faults (5xx, 503 SlowDown, connection resets in the middle of multipart
part uploads and of downloads, slow and hung responses) are retried and the bytes arrive intact;
permanent ones end in a StorageError naming the URI within a bounded time, leaving nothing partial.
The end-to-end test trains on two ranks with the proxy as its store: every checkpoint that is
visible is whole, and the final model reloads."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from finetune_trainer.storage import ObjectNotFoundError, S3Store, StorageError

from tests.s3faults import FaultProxy, Rule, fault_proxy
from tests.s3server import REGION, S3Server, s3_env, s3_server

MIB = 1024 * 1024
PART_MB = 5  # the smallest part S3 takes: 12 MiB files move in three parts


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with s3_server() as running, pytest.MonkeyPatch.context() as monkeypatch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in s3_env(running.endpoint).items():
            monkeypatch.setenv(name, value)
        yield running


@pytest.fixture
def proxy(server: S3Server, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    """A proxy of the test's own (its counters are the test's), rules off until the test sets them."""
    with fault_proxy(server.endpoint, seed=11) as running:
        yield running
        print(f"\n{request.node.name}: {running.report()}")


def _direct(server: S3Server) -> Any:
    """A plain client straight to the server, for setting up and checking behind the proxy's back."""
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    ).client("s3", endpoint_url=server.endpoint, config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def bucket(server: S3Server) -> str:
    name = f"faults-{uuid.uuid4().hex[:12]}"
    _direct(server).create_bucket(Bucket=name)
    return name


def _store(proxy: FaultProxy, **settings: Any) -> S3Store:
    return S3Store(endpoint=proxy.endpoint, region=REGION, multipart_chunk_mb=PART_MB, **settings)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Two multipart-sized shards, small files and an empty one; relative path -> sha256."""
    files = {
        "model-00001-of-00002.safetensors": os.urandom(12 * MIB),
        "model-00002-of-00002.safetensors": os.urandom(11 * MIB + 12345),
        "config.json": b'{"model_type": "llama"}',
        "tokenizer/vocab.json": os.urandom(300_000),
        "empty.txt": b"",
    }
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return {relative: _sha(data) for relative, data in files.items()}


def _stored(server: S3Server, bucket: str, prefix: str) -> dict[str, str]:
    """What the server holds under a prefix, read directly: relative key -> sha256."""
    client = _direct(server)
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[item["Key"][len(prefix) :]] = _sha(body)
    return found


def _unfinished_uploads(server: S3Server, bucket: str) -> list[str]:
    return [u["Key"] for u in _direct(server).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


TRANSIENT = {
    "slow-down": [Rule("slow_down", probability=0.3)],
    "internal-error": [Rule("internal_error", every=3)],
    "resets-mid-part-and-mid-download": [
        Rule("reset", operation="UploadPart", every=2, fraction=0.5),
        Rule("reset", operation="PutObject", every=2, fraction=0.5),
        Rule("truncate", operation="GetObject", every=2, fraction=0.5),
    ],
    # Slow answers, and a part and a download that hang past the client's read timeout (2 s here).
    "slow-and-hung": [
        Rule("delay", operation="UploadPart", times=1, seconds=6),
        Rule("delay", operation="GetObject", times=1, seconds=6),
        Rule("delay", probability=0.5, seconds=0.3),
    ],
    "mixed": [
        Rule("reset", operation="UploadPart", every=3, fraction=0.3),
        Rule("truncate", operation="GetObject", every=4, fraction=0.7),
        Rule("internal_error", every=7),
        Rule("slow_down", probability=0.1),
        Rule("delay", probability=0.1, seconds=0.2),
    ],
}


@pytest.mark.parametrize("faults", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_transfers_survive_transient_faults_and_arrive_intact(
    server: S3Server, proxy: FaultProxy, bucket: str, tmp_path: Path, faults: list[Rule]
) -> None:
    expected = _tree(tmp_path / "model")
    store = _store(proxy, read_timeout=2)
    proxy.set_rules(faults)

    uploaded = store.upload_directory(tmp_path / "model", f"s3://{bucket}/models/tiny/")
    assert {f.relative_path: f.sha256 for f in uploaded} == expected
    store.put_bytes(f"s3://{bucket}/models/tiny/manifest.json", json.dumps(expected).encode())
    downloaded = store.download_prefix(f"s3://{bucket}/models/tiny", tmp_path / "copy")
    shard = store.get_bytes(f"s3://{bucket}/models/tiny/model-00001-of-00002.safetensors")
    manifest = json.loads(store.get_bytes(f"s3://{bucket}/models/tiny/manifest.json"))

    report = proxy.report()
    proxy.set_rules([])
    assert report.injected > 0, report
    if "UploadPart" in {rule.operation for rule in faults}:
        assert report.faulted_operations.get("UploadPart", 0) > 0, report
    assert manifest == expected
    assert _sha(shard) == expected["model-00001-of-00002.safetensors"]
    assert {f.relative_path: f.sha256 for f in downloaded if f.relative_path != "manifest.json"} == expected
    for relative, sha in expected.items():
        assert _sha((tmp_path / "copy" / relative).read_bytes()) == sha, relative
    assert _stored(server, bucket, "models/tiny/") == {
        **expected,
        "manifest.json": _sha(json.dumps(expected).encode()),
    }
    head = _direct(server).head_object(Bucket=bucket, Key="models/tiny/model-00001-of-00002.safetensors")
    assert head["ETag"].endswith('-3"')  # it did move in parts
    assert _unfinished_uploads(server, bucket) == []
    copied = {
        p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*") if p.is_file()
    }
    assert copied == {*expected, "manifest.json"}  # no temporary file of a retried download left over


def _operations(bucket: str, tmp_path: Path) -> dict[str, tuple[str, Callable[[S3Store], object]]]:
    """Each store operation the trainer uses, and the URI its error must name."""
    source = tmp_path / "upload"
    source.mkdir(exist_ok=True)
    (source / "shard.bin").write_bytes(os.urandom(11 * MIB))
    return {
        "get_bytes": (
            f"s3://{bucket}/ckpt/manifest.json",
            lambda store: store.get_bytes(f"s3://{bucket}/ckpt/manifest.json"),
        ),
        "put_bytes": (
            f"s3://{bucket}/ckpt/new.json",
            lambda store: store.put_bytes(f"s3://{bucket}/ckpt/new.json", b"{}"),
        ),
        "upload_directory": (
            f"s3://{bucket}/up/shard.bin",
            lambda store: store.upload_directory(source, f"s3://{bucket}/up/"),
        ),
        "download_prefix": (
            f"s3://{bucket}/ckpt/",
            lambda store: store.download_prefix(f"s3://{bucket}/ckpt/", tmp_path / "down"),
        ),
    }


PERMANENT = {
    "internal-error": (Rule("internal_error"), "(InternalError)"),
    "slow-down": (Rule("slow_down"), "(SlowDown)"),
    "reset": (Rule("reset"), "Connection was closed"),
    "hung": (Rule("delay", seconds=600), "Read timeout on endpoint URL"),
}


@pytest.mark.parametrize("operation", ["get_bytes", "put_bytes", "upload_directory", "download_prefix"])
@pytest.mark.parametrize(("fault", "cause"), PERMANENT.values(), ids=PERMANENT.keys())
def test_a_permanent_fault_is_a_storage_error_naming_the_uri_in_bounded_time(
    server: S3Server, proxy: FaultProxy, bucket: str, tmp_path: Path, operation: str, fault: Rule, cause: str
) -> None:
    """A retryable StorageError (not ObjectNotFound / AccessDenied: the job may be restarted), with the
    cause and how often it was tried; here 3 attempts of at most 1 s each instead of production's 11."""
    _direct(server).put_object(Bucket=bucket, Key="ckpt/manifest.json", Body=b"{}")
    uri, call = _operations(bucket, tmp_path)[operation]
    store = _store(proxy, max_attempts=2, connect_timeout=1, read_timeout=1)
    proxy.set_rules([fault])
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        call(store)
    elapsed = time.monotonic() - started
    proxy.set_rules([])
    assert type(caught.value) is StorageError
    assert caught.value.uri == uri
    message = str(caught.value)
    assert message.startswith(f"S3 request for {uri} failed: ") and cause in message, message
    assert "(reached max retries: 2)" in message or "(gave up after 3 attempts" in message, message
    assert elapsed < 30, elapsed  # 3 tries, their timeouts and backoff; never a hang
    assert _stored(server, bucket, "up/") == {} and _unfinished_uploads(server, bucket) == []
    assert not (tmp_path / "down").exists() or not [p for p in (tmp_path / "down").rglob("*") if p.is_file()]


def test_a_part_that_always_fails_aborts_the_upload_and_leaves_nothing_visible(
    server: S3Server, proxy: FaultProxy, bucket: str, tmp_path: Path
) -> None:
    """A checkpoint shard whose third part never gets through: no object, no multipart upload left."""
    _tree(tmp_path / "model")
    store = _store(proxy, max_attempts=2)
    proxy.set_rules([Rule("reset", operation="UploadPart", pattern=r"partNumber=3(&|$)")])
    with pytest.raises(StorageError, match=r"s3://.*/ckpt/step-3/model-0000[12]-of-00002\.safetensors"):
        store.upload_directory(tmp_path / "model", f"s3://{bucket}/ckpt/step-3/")
    proxy.set_rules([])
    stored = _stored(server, bucket, "ckpt/step-3/")
    assert not [name for name in stored if name.endswith(".safetensors")], stored
    assert _unfinished_uploads(server, bucket) == []


def test_a_download_cut_short_every_time_leaves_no_partial_file(
    server: S3Server, proxy: FaultProxy, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(12 * MIB)
    _direct(server).put_object(Bucket=bucket, Key="ckpt/step-3/shard.bin", Body=data)
    store = _store(proxy, max_attempts=2)
    proxy.set_rules([Rule("truncate", operation="GetObject", fraction=0.9)])
    with pytest.raises(StorageError, match=r"gave up after 5 attempts") as caught:
        store.download_prefix(f"s3://{bucket}/ckpt/step-3/", tmp_path / "down")
    assert caught.value.uri == f"s3://{bucket}/ckpt/step-3/shard.bin"
    with pytest.raises(StorageError, match=r"gave up after 5 attempts") as caught:
        store.get_bytes(f"s3://{bucket}/ckpt/step-3/shard.bin")
    proxy.set_rules([])
    assert [p for p in (tmp_path / "down").rglob("*") if p.is_file()] == []


def test_an_error_reply_cut_short_is_retried_then_reported_as_what_it_is(
    server: S3Server, proxy: FaultProxy, bucket: str
) -> None:
    """botocore lets urllib3's error through, unretried, when an error reply's body breaks off: the
    store retries it, and the next, whole reply (404 here) says what is wrong."""
    uri = f"s3://{bucket}/ckpt/step-3/manifest.json"
    store = _store(proxy)
    proxy.set_rules([Rule("truncate", operation="GetObject", any_status=True, times=2)])
    with pytest.raises(ObjectNotFoundError) as caught:
        store.get_bytes(uri)
    assert caught.value.uri == uri and proxy.report().faults == {"truncate": 2}
    proxy.set_rules([Rule("truncate", operation="GetObject", any_status=True)])
    with pytest.raises(StorageError, match=r"gave up after 5 attempts") as broken:
        store.get_bytes(uri)
    assert type(broken.value) is StorageError and broken.value.uri == uri


@pytest.mark.system  # about a minute of real backoff: not a unit test's seconds
def test_permanent_throttling_with_the_production_settings_ends_within_the_documented_bound(
    server: S3Server, proxy: FaultProxy, bucket: str
) -> None:
    """The trainer's own settings (11 attempts, adaptive backoff): a store answering only SlowDown ends
    in an error within storage.py's stated bound (about 130 s of backoff) instead of retrying forever."""
    store = S3Store(endpoint=proxy.endpoint, region=REGION)
    proxy.set_rules([Rule("slow_down")])
    uri = f"s3://{bucket}/out/checkpoints/step-3/manifest.json"
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"\(SlowDown\).*reached max retries: 10") as caught:
        store.put_bytes(uri, b"{}")
    elapsed = time.monotonic() - started
    assert caught.value.uri == uri and type(caught.value) is StorageError
    assert proxy.report().faults == {"slow_down": 11}
    assert elapsed < 160, elapsed
    print(f"\npermanent SlowDown with production settings: gave up after {elapsed:.1f}s")


# --- end to end -------------------------------------------------------------------------------------

# The mix a store might show on a bad day: throttling, a few 500s, resets during multipart part
# uploads and single-request uploads, downloads cut off, and slow answers.
TRAINING_FAULTS = [
    Rule("reset", operation="UploadPart", every=3, fraction=0.5),
    Rule("reset", operation="PutObject", every=9, fraction=0.5),
    Rule("truncate", operation="GetObject", every=5, fraction=0.5),
    Rule("slow_down", probability=0.10),
    Rule("internal_error", every=20),
    Rule("delay", probability=0.05, seconds=0.5),
]


class CheckpointWatcher:
    """Polls the server directly while the trainer runs: any checkpoint with a manifest must hold
    every file it lists, at its size (a pruned checkpoint loses its manifest first, so it is skipped)."""

    def __init__(self, server: S3Server, bucket: str, prefix: str) -> None:
        self._client, self._bucket, self._prefix = _direct(server), bucket, prefix
        self._stop = threading.Event()
        self.violations: list[str] = []
        self.seen: set[str] = set()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> CheckpointWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _sizes(self) -> dict[str, int]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=self._prefix
        )
        return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}

    def _watch(self) -> None:
        try:
            self._poll()
        except Exception as error:  # a watcher that died must not pass for one that saw nothing wrong
            self.violations.append(f"the watcher failed: {error!r}")

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            sizes = self._sizes()
            for key in [k for k in sizes if k.endswith("/manifest.json")]:
                checkpoint = key.removesuffix("manifest.json")
                try:
                    body = self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
                except self._client.exceptions.NoSuchKey:
                    continue  # pruned meanwhile
                manifest = json.loads(body)
                now = self._sizes()
                wrong = [f["path"] for f in manifest["files"] if now.get(checkpoint + f["path"]) != f["size"]]
                if wrong and checkpoint + "manifest.json" in now:
                    self.violations.append(f"{checkpoint}: manifest visible without {wrong}")
                self.seen.add(checkpoint)


def _seed(server: S3Server, workdir: Path, bucket: str) -> Path:
    """A tiny model wide enough (hidden 512) that its weights, and each checkpoint's model states,
    cross the trainer's 16 MiB multipart threshold; and the demo chat dataset."""
    from finetune_trainer.tiny import build_tiny_model, demo_rows

    from tests.trainer_runs import put_jsonl, upload_tree

    _direct(server).create_bucket(Bucket=bucket)
    model = build_tiny_model(workdir / "tiny-model", hidden_size=512)
    upload_tree(server.endpoint, model, bucket, "models/tiny")
    put_jsonl(server.endpoint, bucket, "data/chat.jsonl", demo_rows(64))
    return model


def _checkpoints(server: S3Server, bucket: str, output: str) -> dict[str, dict[str, int]]:
    client = _direct(server)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{output}checkpoints/")
    found: dict[str, dict[str, int]] = {}
    for page in pages:
        for item in page.get("Contents", []):
            step, _, relative = item["Key"][len(f"{output}checkpoints/") :].partition("/")
            found.setdefault(step, {})[relative] = item["Size"]
    return found


def _check_whole(server: S3Server, bucket: str, output: str) -> list[str]:
    """Every checkpoint left has its manifest, and every file it lists with its size and sha256."""
    client = _direct(server)
    checkpoints = _checkpoints(server, bucket, output)
    for step, files in checkpoints.items():
        assert "manifest.json" in files, f"{step} is visible without its manifest: {sorted(files)}"
        prefix = f"{output}checkpoints/{step}/"
        manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
        assert manifest["files"], step
        for entry in manifest["files"]:
            body = client.get_object(Bucket=bucket, Key=prefix + entry["path"])["Body"].read()
            assert (len(body), _sha(body)) == (entry["size"], entry["sha256"]), (step, entry["path"])
    return sorted(checkpoints)


@pytest.mark.system
def test_two_ranks_train_through_s3_faults_and_leave_only_whole_checkpoints(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.trainer_runs import run_trainer, trainer_config

    bucket, name = "faulty", "faults"
    output = f"out/{name}/"
    with s3_server() as server:
        base = _seed(server, tmp_path, bucket)
        with fault_proxy(server.endpoint, TRAINING_FAULTS, seed=7) as proxy:
            first = trainer_config(
                proxy.endpoint,
                name,
                bucket,
                hyperparameters={"maxSteps": 10, "warmupRatio": 0.0},
                output={"checkpointEverySteps": 3, "keepCheckpoints": 2, "saveMerged": True},
            )
            with CheckpointWatcher(server, bucket, f"{output}checkpoints/") as watcher:
                run = run_trainer(first, tmp_path / "first", proxy.endpoint, processes=2, timeout=900)
            first_report = proxy.report()
            assert run.code == 0 and run.summary is not None, run.log[-5000:]
            assert run.summary.outcome == "succeeded", run.log[-5000:]
            assert _check_whole(server, bucket, output) == ["step-6", "step-9"]

            # A newer checkpoint whose upload never finished: files, no manifest. Never loaded.
            _direct(server).put_object(
                Bucket=bucket, Key=f"{output}checkpoints/step-99/mp_rank_00_model_states.pt", Body=b"half"
            )
            second = first.model_copy(
                update={"hyperparameters": first.hyperparameters.model_copy(update={"max_steps": 13})}
            )
            with CheckpointWatcher(server, bucket, f"{output}checkpoints/") as second_watcher:
                resumed = run_trainer(second, tmp_path / "second", proxy.endpoint, processes=2, timeout=900)
            report = proxy.report()
        assert resumed.code == 0 and resumed.summary is not None, resumed.log[-5000:]
        assert resumed.summary.outcome == "succeeded" and resumed.summary.step == 13, resumed.log[-5000:]
        assert f"resumed from s3://{bucket}/{output}checkpoints/step-9/" in resumed.log
        assert "step-99" in resumed.log and "skipping" in resumed.log
        assert _check_whole(server, bucket, output) == ["step-12", "step-9"]
        assert watcher.violations == [] and second_watcher.violations == []
        assert _unfinished_uploads(server, bucket) == []

        assert report.by_operation.get("UploadPart", {}).get("reset", 0) > 0, report  # mid-multipart
        for kind in ("reset", "truncate", "slow_down", "internal_error", "delay"):
            assert report.faults.get(kind, 0) > 0, (kind, report)

        adapter = tmp_path / "adapter"
        client = _direct(server)
        for key in _stored(server, bucket, f"{output}model/"):
            (adapter / key).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, f"{output}model/{key}", str(adapter / key))
        tokenizer = AutoTokenizer.from_pretrained(adapter)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        merged = AutoModelForCausalLM.from_pretrained(adapter / "merged")
        inputs = tokenizer("What is the capital of France?", return_tensors="pt")
        for reloaded in (model, merged):
            assert reloaded.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] > 0
    seen = watcher.seen | second_watcher.seen
    print(
        f"\nend to end: 2 runs completed (10 steps, then resumed to 13); first run {first_report}; "
        f"both runs {report}; faults by operation {report.by_operation}; "
        f"operations {report.operations}; checkpoints seen complete {sorted(seen)}"
    )

"""The trainer's two stores: S3Store against a real S3 endpoint (moto over HTTP) and FolderStore on a
temporary folder. Behaviour the trainer relies on (round trips, listings, pruning, missing objects) is
one test run against both stores, which is what proves they agree."""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from finetune_trainer.config import FolderStorageConfig, S3StorageConfig
from finetune_trainer.storage import (
    CONNECT_TIMEOUT_S,
    PARTIAL_PREFIX,
    PARTIAL_SUFFIX,
    READ_TIMEOUT_S,
    RETRIES,
    AccessDeniedError,
    FolderStore,
    ObjectNotFoundError,
    ObjectStore,
    S3Store,
    StorageError,
    StoredFile,
    join_uri,
    parse_s3_uri,
)

from tests.s3server import REGION, S3Server, s3_env, s3_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with s3_server() as running:
        yield running


def _clear_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def s3_store(server: S3Server) -> Iterator[S3Store]:
    """A store that finds its credentials the way pods do: in the environment (read when it is built)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clear_aws_env(monkeypatch)
        for name, value in s3_env(server.endpoint).items():
            monkeypatch.setenv(name, value)
        # 8 MiB parts: the 21 MiB file below moves in three parts.
        yield S3Store(endpoint=server.endpoint, region=REGION, multipart_chunk_mb=8)


@pytest.fixture(scope="module")
def client(server: S3Server) -> Any:
    """A plain boto3 client for setting up and inspecting buckets behind the store's back."""
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    ).client(
        "s3",
        endpoint_url=server.endpoint,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32),
    )


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


@dataclass(frozen=True)
class Backing:
    """One store under test, its bucket, and a way to place objects behind its back."""

    store: ObjectStore
    bucket: str
    place: Callable[[str, bytes], None]


@pytest.fixture(params=["s3", "folder"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Backing:
    """Each shared test runs on both stores: S3 on loopback, and a folder (a bucket is a folder)."""
    if request.param == "s3":
        s3_store, client, bucket = (request.getfixturevalue(n) for n in ("s3_store", "client", "bucket"))

        def put(key: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=key, Body=data)

        return Backing(s3_store, bucket, put)
    root = tmp_path / "store"
    (root / "outputs").mkdir(parents=True)

    def write(key: str, data: bytes) -> None:
        path = root / "outputs" / key
        if key.endswith("/"):  # a console's "directory" marker is a folder here
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backing(FolderStore(root), "outputs", write)


def _write(path: Path, data: bytes) -> StoredFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return StoredFile(path.name, len(data), hashlib.sha256(data).hexdigest())


def _model_tree(root: Path) -> list[StoredFile]:
    """A Hugging Face-shaped directory: one multipart-sized shard, many small files, an empty one."""
    files = {
        "model.safetensors": os.urandom(21 * MIB),
        "config.json": b'{"model_type": "llama"}',
        "empty.txt": b"",
        **{f"tokenizer/part-{i:02d}/vocab.txt": f"token {i}\n".encode() * (i + 1) for i in range(40)},
    }
    expected = []
    for relative, data in files.items():
        stored = _write(root / relative, data)
        expected.append(StoredFile(relative, stored.size, stored.sha256))
    return sorted(expected, key=lambda f: f.relative_path)


def test_bytes_round_trip(backing: Backing) -> None:
    store, bucket = backing.store, backing.bucket
    uri = f"s3://{bucket}/jobs/a/summary.json"
    store.put_bytes(uri, b'{"ok": true}', content_type="application/json")
    assert store.get_bytes(uri) == b'{"ok": true}'
    store.put_bytes(uri, b'{"ok": false}')
    assert store.get_bytes(uri) == b'{"ok": false}'
    assert store.list_files(f"s3://{bucket}/jobs/a") == [StoredFile("summary.json", 13, "")]
    assert store.list_files(f"s3://{bucket}/jobs/") == [StoredFile("a/summary.json", 13, "")]
    assert store.list_files(f"s3://{bucket}/jobs/a/summary") == []
    assert store.list_files(f"s3://{bucket}/job") == []


def test_s3_keeps_the_content_type(s3_store: S3Store, client: Any, bucket: str) -> None:
    s3_store.put_bytes(f"s3://{bucket}/summary.json", b"{}", content_type="application/json")
    assert client.head_object(Bucket=bucket, Key="summary.json")["ContentType"] == "application/json"


def test_file_round_trip(backing: Backing, tmp_path: Path) -> None:
    data = b'{"text": "hello"}\n' * 1000
    backing.place("datasets/train.jsonl", data)
    target = tmp_path / "deep" / "er" / "train.jsonl"
    assert backing.store.download_file(f"s3://{backing.bucket}/datasets/train.jsonl", target) == target
    assert target.read_bytes() == data


def test_directory_round_trip(backing: Backing, tmp_path: Path) -> None:
    store, bucket = backing.store, backing.bucket
    expected = _model_tree(tmp_path / "model")
    uploaded = store.upload_directory(tmp_path / "model", f"s3://{bucket}/models/llama")
    assert uploaded == expected  # in key order

    # A console's "directory" marker and a sibling whose name merely starts the same are not part of it.
    backing.place("models/llama/tokenizer/", b"")
    backing.place("models/llama-v2/config.json", b"{}")

    assert store.list_files(f"s3://{bucket}/models/llama/") == [
        StoredFile(f.relative_path, f.size, "") for f in expected
    ]

    downloaded = store.download_prefix(f"s3://{bucket}/models/llama", tmp_path / "copy")
    assert downloaded == expected
    for stored in expected:
        copy = (tmp_path / "copy" / stored.relative_path).read_bytes()
        assert copy == (tmp_path / "model" / stored.relative_path).read_bytes()


def test_s3_uploads_large_files_in_parts(s3_store: S3Store, client: Any, bucket: str, tmp_path: Path) -> None:
    _model_tree(tmp_path / "model")
    s3_store.upload_directory(tmp_path / "model", f"s3://{bucket}/models/llama")
    # Multipart uploads have ETags of the form "<md5 of part md5s>-<number of parts>".
    assert client.head_object(Bucket=bucket, Key="models/llama/model.safetensors")["ETag"].endswith('-3"')


def test_listing_order_is_key_order(backing: Backing) -> None:
    """S3 sorts keys by their UTF-8 bytes: "a-b" before "a/b", and "Z" before "a"."""
    keys = ["a/b", "a-b", "a0", "Z", "é", "a/a/c", "b"]
    for key in keys:
        backing.place(f"order/{key}", key.encode())
    assert [f.relative_path for f in backing.store.list_files(f"s3://{backing.bucket}/order")] == sorted(
        keys, key=str.encode
    )


def test_subprefixes_and_delete_over_a_thousand_objects(backing: Backing) -> None:
    store, bucket = backing.store, backing.bucket
    keys = [f"out/checkpoints/step-{i:04d}/done" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda key: backing.place(key, b"x"),
                [*keys, "out/checkpoints/README", "out/checkpoints-old/step-1/done"],
            )
        )

    subprefixes = store.list_subprefixes(f"s3://{bucket}/out/checkpoints")
    assert subprefixes == [f"s3://{bucket}/out/checkpoints/step-{i:04d}/" for i in range(1100)]
    files = store.list_files(f"s3://{bucket}/out/checkpoints")
    assert len(files) == 1101
    assert files[0] == StoredFile("README", 1, "")
    assert files[-1] == StoredFile("step-1099/done", 1, "")
    assert store.list_subprefixes(f"s3://{bucket}/out/") == [
        f"s3://{bucket}/out/checkpoints-old/",
        f"s3://{bucket}/out/checkpoints/",
    ]

    assert store.delete_prefix(f"s3://{bucket}/out/checkpoints/step-0007") == 1
    # The 1,099 steps left and the README: more than one DeleteObjects batch.
    assert store.delete_prefix(f"s3://{bucket}/out/checkpoints") == 1100
    assert store.list_files(f"s3://{bucket}/out/checkpoints") == []
    assert store.list_subprefixes(f"s3://{bucket}/out/") == [f"s3://{bucket}/out/checkpoints-old/"]
    assert store.delete_prefix(f"s3://{bucket}/out/checkpoints") == 0
    with pytest.raises(ValueError, match="refusing"):
        store.delete_prefix(f"s3://{bucket}/")


@pytest.mark.parametrize(
    "key", ["models/evil/../../escape.txt", "models/evil//etc/escape.txt", "models/evil/./a.txt"]
)
def test_download_prefix_refuses_keys_that_leave_the_destination(
    s3_store: S3Store, client: Any, bucket: str, tmp_path: Path, key: str
) -> None:
    client.put_object(Bucket=bucket, Key="models/evil/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"x")
    with pytest.raises(StorageError, match="not a safe relative path") as caught:
        s3_store.download_prefix(f"s3://{bucket}/models/evil", tmp_path / "a" / "b")
    assert caught.value.uri == f"s3://{bucket}/{key}"
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == []


@pytest.mark.parametrize(
    ("operation", "target"),
    [
        ("get_bytes", "s3://{bucket}/missing.json"),
        ("get_bytes", "s3://{bucket}/models"),
        ("download_file", "s3://{bucket}/missing.jsonl"),
        ("get_bytes", "s3://no-such-bucket-{bucket}/data.jsonl"),
        ("download_file", "s3://no-such-bucket-{bucket}/data.jsonl"),
        ("download_prefix", "s3://no-such-bucket-{bucket}/models/llama"),
        ("list_files", "s3://no-such-bucket-{bucket}/models/llama"),
        ("list_subprefixes", "s3://no-such-bucket-{bucket}/models/"),
        ("put_bytes", "s3://no-such-bucket-{bucket}/models/config.json"),
        ("download_prefix", "s3://{bucket}/models/nothing-here"),
    ],
)
def test_missing_objects_name_the_uri(backing: Backing, tmp_path: Path, operation: str, target: str) -> None:
    """Non-retryable (the trainer gives up at once) on both stores, with the same words."""
    backing.place("models/llama/config.json", b"{}")
    uri = target.format(bucket=backing.bucket)
    call = getattr(backing.store, operation)
    with pytest.raises(ObjectNotFoundError) as caught:
        if operation == "put_bytes":
            call(uri, b"{}")
        elif operation in ("download_file", "download_prefix"):
            call(uri, tmp_path / "target")
        else:
            call(uri)
    assert caught.value.uri == uri
    assert str(caught.value).startswith(f"{uri} does not exist")
    if "no-such-bucket" in uri and operation != "download_file":  # S3's HEAD of a file cannot tell
        assert f"no bucket 'no-such-bucket-{backing.bucket}'" in str(caught.value)


def test_an_unreachable_endpoint_is_a_retryable_storage_error(s3_store: S3Store) -> None:
    """Not a configuration error: the trainer may retry (``s3_store`` puts credentials in the environment)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    unreachable = S3Store(endpoint=closed, region=REGION, max_attempts=1)
    with pytest.raises(StorageError) as caught:
        unreachable.get_bytes("s3://bucket/model/config.json")
    assert type(caught.value) is StorageError
    assert str(caught.value).startswith("S3 request for s3://bucket/model/config.json failed: ")
    assert closed in str(caught.value)


def test_s3_requests_are_bounded_in_time() -> None:
    """Production settings: every try has a connect and read timeout, and retries are counted, so a
    silent store fails a request within minutes (tests/test_s3_faults.py measures the faults)."""
    config = S3Store(endpoint="http://127.0.0.1:9", region=REGION)._client.meta.config
    assert config.retries == {"mode": "adaptive", "total_max_attempts": RETRIES + 1}  # 11 tries
    assert (config.connect_timeout, config.read_timeout) == (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    worst_backoff = 130  # botocore: at most 20 s a wait, 1 + 2 + 4 + 8 + 16 + 5 x 20
    assert (RETRIES + 1) * (CONNECT_TIMEOUT_S + READ_TIMEOUT_S) + worst_backoff < 10 * 60


def test_no_credentials_is_access_denied(
    server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_aws_env(monkeypatch)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws/credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(endpoint=server.endpoint, region=REGION)
    uri = f"s3://{bucket}/model/config.json"
    with pytest.raises(AccessDeniedError) as caught:
        store.get_bytes(uri)
    assert caught.value.uri == uri
    assert str(caught.value).startswith(f"access to {uri} denied")
    assert "workload identity role" in str(caught.value)


def test_refused_credentials_are_access_denied_without_secrets(
    server: S3Server, client: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    source = tmp_path / "new.json"
    source.write_bytes(b"{}")
    key_id, secret = "AKIAEXAMPLEUNKNOWN01", "s3cr3t-Value-That-Must-Not-Leak"
    _clear_aws_env(monkeypatch)
    for name, value in {
        **s3_env(server.endpoint),
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
    }.items():
        monkeypatch.setenv(name, value)
    store = ObjectStore.from_config(S3StorageConfig(endpoint=server.endpoint, region=REGION))
    uri = f"s3://{bucket}/model/config.json"
    with server.require_authentication():
        failures = []
        for attempt in (
            lambda: store.get_bytes(uri),
            lambda: store.list_files(f"s3://{bucket}/model/"),
            lambda: store.download_file(uri, tmp_path / "config.json"),
            lambda: store.download_prefix(f"s3://{bucket}/model/", tmp_path / "model"),
            lambda: store.upload_directory(source.parent, f"s3://{bucket}/model/new/"),
        ):
            with pytest.raises(AccessDeniedError) as caught:
                attempt()
            failures.append(caught.value)
    for failure in failures:
        assert "check the credentials Secret" in str(failure)
        assert secret not in str(failure) and key_id not in str(failure)
        assert secret not in repr(failure.__cause__) and secret not in str(failure.__cause__)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/key", ("bucket", "key")),
        ("s3://bucket/models/llama/", ("bucket", "models/llama/")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://my.bucket-1/a b/c.jsonl", ("my.bucket-1", "a b/c.jsonl")),
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri", ["", "bucket/key", "s3:/bucket/key", "s3:///key", "S3://bucket/key", "https://b/k"]
)
def test_parse_s3_uri_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match="is not an S3 URI"):
        parse_s3_uri(uri)


@pytest.mark.parametrize(
    ("prefix", "parts", "expected"),
    [
        ("s3://b/out/", ("checkpoints", "step-10"), "s3://b/out/checkpoints/step-10"),
        ("s3://b/out", ("checkpoints", "step-10"), "s3://b/out/checkpoints/step-10"),
        ("s3://b/out/", ("/checkpoints/", "/step-10"), "s3://b/out/checkpoints/step-10"),
        ("s3://b/out", ("checkpoints/",), "s3://b/out/checkpoints/"),
        ("s3://b", ("model", "config.json"), "s3://b/model/config.json"),
        ("s3://b/", ("model",), "s3://b/model"),
        ("s3://b/out", ("", "final"), "s3://b/out/final"),
        ("s3://b/out/", (), "s3://b/out/"),
        ("s3://b/out", (), "s3://b/out"),
    ],
)
def test_join_uri(prefix: str, parts: tuple[str, ...], expected: str) -> None:
    assert join_uri(prefix, *parts) == expected


def test_join_uri_rejects_a_non_s3_prefix() -> None:
    with pytest.raises(ValueError, match="is not an S3 URI"):
        join_uri("/local/out", "checkpoints")


def test_importing_storage_does_not_import_torch() -> None:
    code = "import sys, finetune_trainer.storage; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_contract_picks_the_store(tmp_path: Path) -> None:
    folder = ObjectStore.from_config(FolderStorageConfig(kind="folder", root=str(tmp_path)))
    assert isinstance(folder, FolderStore) and folder.root == tmp_path.resolve()
    assert isinstance(ObjectStore.from_config(S3StorageConfig(endpoint=None, region=REGION)), S3Store)


def test_a_missing_store_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match=f"the store folder {tmp_path / 'nowhere'} does not exist"):
        FolderStore(tmp_path / "nowhere")


@pytest.fixture
def folder(tmp_path: Path) -> FolderStore:
    """A store folder with one bucket, and a file beside it that no key may reach."""
    (tmp_path / "store" / "outputs" / "job").mkdir(parents=True)
    (tmp_path / "store" / "outputs" / "job" / "config.json").write_bytes(b"{}")
    (tmp_path / "secret.txt").write_bytes(b"outside the store")
    return FolderStore(tmp_path / "store")


@pytest.mark.parametrize(
    "uri",
    [
        "s3://outputs/../secret.txt",
        "s3://outputs/job/../../secret.txt",
        "s3://outputs//etc/passwd",
        "s3://outputs/job/./config.json",
        "s3://outputs/job//config.json",
        "s3://../secret.txt",
        "s3://./outputs/job/config.json",
        "s3://outputs/job/a\0b",
        "s3://outputs/escape/secret.txt",  # a symlink inside the store pointing out of it
        "s3://outputs/escape/",
    ],
)
def test_folder_store_refuses_keys_that_leave_the_folder(
    folder: FolderStore, tmp_path: Path, uri: str
) -> None:
    (folder.root / "outputs" / "escape").symlink_to(tmp_path, target_is_directory=True)
    source = tmp_path / "upload"
    source.mkdir()
    (source / "a.txt").write_bytes(b"x")
    attempts = {
        "get_bytes": lambda uri=uri: folder.get_bytes(uri),
        "put_bytes": lambda uri=uri: folder.put_bytes(uri, b"overwritten"),
        "download_file": lambda: folder.download_file(uri, tmp_path / "down" / "file"),
        "download_prefix": lambda: folder.download_prefix(uri, tmp_path / "down"),
        "upload_directory": lambda: folder.upload_directory(source, uri),
        "list_files": lambda uri=uri: folder.list_files(uri),
        "list_subprefixes": lambda: folder.list_subprefixes(uri),
        "delete_prefix": lambda uri=uri: folder.delete_prefix(uri),
    }
    for operation, attempt in attempts.items():
        with pytest.raises(AccessDeniedError) as caught:
            attempt()
        assert caught.value.uri == uri, operation
        shown = uri.replace("\0", "\\x00")  # control characters are shown escaped
        assert str(caught.value).startswith(f"access to {shown} denied: "), operation
        assert str(folder.root) not in str(caught.value) and str(tmp_path) not in str(caught.value), operation
    assert (tmp_path / "secret.txt").read_bytes() == b"outside the store"
    assert not (tmp_path / "down").exists() and not (tmp_path / "a.txt").exists()


def test_folder_listings_refuse_a_symlinked_file_pointing_out(folder: FolderStore, tmp_path: Path) -> None:
    (folder.root / "outputs" / "job" / "leak.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(AccessDeniedError, match=r"access to s3://outputs/job/leak\.txt denied") as caught:
        folder.download_prefix("s3://outputs/job/", tmp_path / "down")
    assert caught.value.uri == "s3://outputs/job/leak.txt"


def test_folder_writes_replace_whole_files(folder: FolderStore, tmp_path: Path) -> None:
    """A reader that opened the old file keeps reading it whole: the new one is renamed over it."""
    uri = "s3://outputs/job/checkpoints/step-10/manifest.json"
    folder.put_bytes(uri, b"old manifest")
    path = folder.root / "outputs" / "job" / "checkpoints" / "step-10" / "manifest.json"
    with path.open("rb") as reader:
        folder.put_bytes(uri, b"new")
        assert reader.read() == b"old manifest"
    assert folder.get_bytes(uri) == b"new"
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "manifest.json").write_bytes(b"uploaded")
    with path.open("rb") as reader:
        folder.upload_directory(tmp_path / "checkpoint", "s3://outputs/job/checkpoints/step-10")
        assert reader.read() == b"new"
    assert path.read_bytes() == b"uploaded"
    assert not [p for p in folder.root.rglob("*") if p.name.startswith(PARTIAL_PREFIX)]


def test_folder_listings_hide_writes_in_progress(folder: FolderStore, tmp_path: Path) -> None:
    """A write cut short (a killed rank) leaves a hidden file that no listing or download shows."""
    checkpoint = folder.root / "outputs" / "job" / "checkpoints" / "step-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / f"{PARTIAL_PREFIX}0123{PARTIAL_SUFFIX}").write_bytes(b"half a shard")
    assert folder.list_subprefixes("s3://outputs/job/checkpoints/") == []
    assert folder.list_files("s3://outputs/job/") == [StoredFile("config.json", 2, "")]
    with pytest.raises(ObjectNotFoundError):
        folder.download_prefix("s3://outputs/job/checkpoints/step-5", tmp_path / "down")
    # Dot files of a real model (.gitattributes) are objects like any other.
    (folder.root / "outputs" / "job" / ".gitattributes").write_bytes(b"*")
    assert [f.relative_path for f in folder.list_files("s3://outputs/job")] == [
        ".gitattributes",
        "config.json",
    ]


def test_folder_downloads_are_links_and_survive_later_writes(folder: FolderStore, tmp_path: Path) -> None:
    target = folder.download_file("s3://outputs/job/config.json", tmp_path / "inputs" / "config.json")
    assert target.stat().st_ino == (folder.root / "outputs" / "job" / "config.json").stat().st_ino
    folder.put_bytes("s3://outputs/job/config.json", b'{"changed": true}')
    assert target.read_bytes() == b"{}"
    assert folder.download_file("s3://outputs/job/config.json", target).read_bytes() == b'{"changed": true}'


def test_folder_delete_leaves_no_empty_folders(folder: FolderStore) -> None:
    for step in (1, 2):
        folder.put_bytes(f"s3://outputs/job/checkpoints/step-{step}/shards/model.pt", b"m")
    assert folder.delete_prefix("s3://outputs/job/checkpoints/step-1") == 1
    assert not (folder.root / "outputs" / "job" / "checkpoints" / "step-1").exists()
    assert folder.list_subprefixes("s3://outputs/job/checkpoints/") == [
        "s3://outputs/job/checkpoints/step-2/"
    ]
    assert folder.delete_prefix("s3://outputs/job/checkpoints/step-1") == 0
    with pytest.raises(ValueError, match="refusing to delete every object in bucket 'outputs'"):
        folder.delete_prefix("s3://outputs/")


@pytest.mark.parametrize("uri", ["s3://outputs/job/config.json/inner", "s3://outputs/job"])
def test_folder_store_names_a_file_and_folder_clash(folder: FolderStore, uri: str) -> None:
    """S3 may hold both "a" and "a/b"; a folder cannot, and says so instead of a traceback."""
    with pytest.raises(StorageError, match="a file and a folder would share a path") as caught:
        folder.put_bytes(uri, b"x")
    assert caught.value.uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        "s3://outputs/job/a\nb",
        "s3://outputs/job/a\x1bb",
        "s3://outputs/job/a\x7fb",
        "s3://outputs/job/" + "x" * 256,
        "s3://outputs/" + "/".join(["d" * 200] * 6),
        "s3://outputs/job/\udcff",
        f"s3://outputs/job/{PARTIAL_PREFIX}x{PARTIAL_SUFFIX}",
    ],
)
def test_folder_store_answers_bad_keys_with_a_clear_error(folder: FolderStore, uri: str) -> None:
    for attempt in (
        lambda: folder.put_bytes(uri, b"x"),
        lambda: folder.get_bytes(uri),
        lambda: folder.list_files(uri),
        lambda: folder.delete_prefix(uri),
    ):
        with pytest.raises(AccessDeniedError, match="is not a plain relative path") as caught:
            attempt()
        assert caught.value.uri == uri and str(folder.root) not in str(caught.value)
        assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious.txt").write_bytes(b"keep me")
    return tmp_path / "elsewhere"


@pytest.mark.parametrize("link", ["file", "folder", "parent"])
def test_folder_store_never_acts_through_a_symlink_pointing_out(
    folder: FolderStore, outside: Path, link: str
) -> None:
    """Read, write and delete through a link out of the store are refused; the outside is untouched."""
    job = folder.root / "outputs" / "job"
    if link == "file":
        (job / "model.bin").symlink_to(outside / "precious.txt")
        uris = ["s3://outputs/job/model.bin"]
    elif link == "folder":
        (job / "model").symlink_to(outside, target_is_directory=True)
        uris = ["s3://outputs/job/model/precious.txt", "s3://outputs/job/model/"]
    else:
        (folder.root / "other").symlink_to(outside, target_is_directory=True)
        uris = ["s3://other/precious.txt", "s3://other/sub/"]
    for uri in uris:
        for name, attempt in {
            "get": lambda uri=uri: folder.get_bytes(uri),
            "put": lambda uri=uri: folder.put_bytes(uri, b"overwritten"),
            "delete": lambda uri=uri: folder.delete_prefix(uri),
            "list": lambda uri=uri: folder.list_files(uri),
        }.items():
            with pytest.raises(AccessDeniedError, match="leads out of the store folder") as caught:
                attempt()
            assert caught.value.uri.startswith(uri.rstrip("/")), name
            assert str(outside) not in str(caught.value) and str(folder.root) not in str(caught.value)
    # A prefix holding a link out cannot be deleted either: nothing is removed, inside or out.
    if link == "file":
        with pytest.raises(AccessDeniedError, match=r"s3://outputs/job/model\.bin"):
            folder.delete_prefix("s3://outputs/job/")
        assert (job / "config.json").exists()
    assert (outside / "precious.txt").read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_folder_store_deletes_a_link_inside_not_its_target(folder: FolderStore) -> None:
    folder.put_bytes("s3://outputs/kept/a.txt", b"a")
    (folder.root / "outputs" / "alias").symlink_to(folder.root / "outputs" / "kept", target_is_directory=True)
    folder.delete_prefix("s3://outputs/alias")
    assert folder.get_bytes("s3://outputs/kept/a.txt") == b"a"
    assert not (folder.root / "outputs" / "alias").exists()


def test_folder_store_symlink_loops_and_dangling_links_are_no_traceback(folder: FolderStore) -> None:
    job = folder.root / "outputs" / "job"
    (job / "loop").symlink_to(job / "loop")
    (job / "dangling").symlink_to(job / "nothing-here")
    with pytest.raises(AccessDeniedError):
        folder.get_bytes("s3://outputs/job/loop")
    with pytest.raises(ObjectNotFoundError):
        folder.get_bytes("s3://outputs/job/dangling")
    with pytest.raises(AccessDeniedError, match="loop"):
        folder.list_files("s3://outputs/job/")
    (job / "loop").unlink()
    assert [f.relative_path for f in folder.list_files("s3://outputs/job/")] == ["config.json"]


def test_a_crashed_write_leaves_nothing_after_the_next_listing(tmp_path: Path) -> None:
    """A write killed before its rename (simulated in a child process that exits mid-write) leaves a
    hidden file; the next listing removes it, while a write still in progress (locked) stays."""
    root = tmp_path / "store"
    (root / "outputs" / "job").mkdir(parents=True)
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "import finetune_trainer.storage as storage\n"
        "def crash(partial):\n"
        "    partial.write_bytes(b'half a shard')\n"
        "    os._exit(9)\n"
        "storage._publish('s3://outputs/job/shard.bin', Path(sys.argv[1]), crash)\n"
    )
    target = root / "outputs" / "job" / "shard.bin"
    code = subprocess.run([sys.executable, "-c", script, str(target)], check=False).returncode
    assert code == 9
    left = [p for p in (root / "outputs" / "job").iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert len(left) == 1 and not target.exists()
    # A write in progress, holding its lock, is left alone.
    busy = root / "outputs" / "job" / f"{PARTIAL_PREFIX}busy{PARTIAL_SUFFIX}"
    descriptor = os.open(busy, os.O_WRONLY | os.O_CREAT)
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    try:
        store = FolderStore(root, partial_grace_seconds=0)
        assert store.list_files("s3://outputs/job/") == []
        remaining = sorted(p.name for p in (root / "outputs" / "job").iterdir())
        assert remaining == [busy.name]
    finally:
        os.close(descriptor)
    # Within the grace period even an unlocked one stays (its writer may be between create and lock).
    assert FolderStore(root).list_files("s3://outputs/job/") == []
    assert busy.exists()
    FolderStore(root, partial_grace_seconds=0).list_files("s3://outputs")
    assert not busy.exists()

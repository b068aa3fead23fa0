"""The trainer's S3 layer against a real S3 endpoint (moto over HTTP): transfers, listings, errors."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from finetune_trainer.config import StorageConfig
from finetune_trainer.storage import (
    AccessDeniedError,
    ObjectNotFoundError,
    ObjectStore,
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
def store(server: S3Server) -> Iterator[ObjectStore]:
    """A store that finds its credentials the way pods do: in the environment (read when it is built)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clear_aws_env(monkeypatch)
        for name, value in s3_env(server.endpoint).items():
            monkeypatch.setenv(name, value)
        # 8 MiB parts: the 21 MiB file below moves in three parts.
        yield ObjectStore(endpoint=server.endpoint, region=REGION, multipart_chunk_mb=8)


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


def test_bytes_round_trip(store: ObjectStore, client: Any, bucket: str) -> None:
    uri = f"s3://{bucket}/jobs/a/summary.json"
    assert not store.exists(uri)
    store.put_bytes(uri, b'{"ok": true}', content_type="application/json")
    assert store.get_bytes(uri) == b'{"ok": true}'
    assert client.head_object(Bucket=bucket, Key="jobs/a/summary.json")["ContentType"] == "application/json"
    assert store.exists(uri)
    assert store.exists(f"s3://{bucket}/jobs/a")
    assert store.exists(f"s3://{bucket}/jobs/")
    assert not store.exists(f"s3://{bucket}/jobs/a/summary")
    assert not store.exists(f"s3://{bucket}/job")


def test_file_round_trip(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    expected = _write(tmp_path / "data" / "train.jsonl", b'{"text": "hello"}\n' * 1000)
    uri = f"s3://{bucket}/datasets/train.jsonl"
    assert store.upload_file(tmp_path / "data" / "train.jsonl", uri) == expected
    target = tmp_path / "deep" / "er" / "train.jsonl"
    assert store.download_file(uri, target) == target
    assert target.read_bytes() == (tmp_path / "data" / "train.jsonl").read_bytes()


def test_directory_round_trip(store: ObjectStore, client: Any, bucket: str, tmp_path: Path) -> None:
    expected = _model_tree(tmp_path / "model")
    uploaded = store.upload_directory(tmp_path / "model", f"s3://{bucket}/models/llama")
    assert sorted(uploaded, key=lambda f: f.relative_path) == expected
    # Multipart uploads have ETags of the form "<md5 of part md5s>-<number of parts>".
    assert client.head_object(Bucket=bucket, Key="models/llama/model.safetensors")["ETag"].endswith('-3"')

    # A console's "directory" marker and a sibling whose name merely starts the same are not part of it.
    client.put_object(Bucket=bucket, Key="models/llama/tokenizer/", Body=b"")
    client.put_object(Bucket=bucket, Key="models/llama-v2/config.json", Body=b"{}")

    listed = store.list_files(f"s3://{bucket}/models/llama/")
    assert sorted(listed, key=lambda f: f.relative_path) == [
        StoredFile(f.relative_path, f.size, "") for f in expected
    ]

    downloaded = store.download_prefix(f"s3://{bucket}/models/llama", tmp_path / "copy")
    assert sorted(downloaded, key=lambda f: f.relative_path) == expected
    for stored in expected:
        copy = (tmp_path / "copy" / stored.relative_path).read_bytes()
        assert copy == (tmp_path / "model" / stored.relative_path).read_bytes()


def test_subprefixes_and_delete_over_a_thousand_objects(store: ObjectStore, client: Any, bucket: str) -> None:
    def put(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")

    keys = [f"out/checkpoints/step-{i:04d}/done" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, [*keys, "out/checkpoints/README", "out/checkpoints-old/step-1/done"]))

    subprefixes = store.list_subprefixes(f"s3://{bucket}/out/checkpoints")
    assert subprefixes == [f"s3://{bucket}/out/checkpoints/step-{i:04d}/" for i in range(1100)]
    assert store.list_subprefixes(f"s3://{bucket}/out/") == [
        f"s3://{bucket}/out/checkpoints-old/",
        f"s3://{bucket}/out/checkpoints/",
    ]

    assert store.delete_prefix(f"s3://{bucket}/out/checkpoints/step-0007") == 1
    # The 1,099 steps left and the README: more than one DeleteObjects batch.
    assert store.delete_prefix(f"s3://{bucket}/out/checkpoints") == 1100
    assert store.list_files(f"s3://{bucket}/out/checkpoints") == []
    assert store.exists(f"s3://{bucket}/out/checkpoints-old/step-1/done")
    assert store.delete_prefix(f"s3://{bucket}/out/checkpoints") == 0
    with pytest.raises(ValueError, match="refusing"):
        store.delete_prefix(f"s3://{bucket}/")


@pytest.mark.parametrize(
    "key", ["models/evil/../../escape.txt", "models/evil//etc/escape.txt", "models/evil/./a.txt"]
)
def test_download_prefix_refuses_keys_that_leave_the_destination(
    store: ObjectStore, client: Any, bucket: str, tmp_path: Path, key: str
) -> None:
    client.put_object(Bucket=bucket, Key="models/evil/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=key, Body=b"x")
    with pytest.raises(StorageError, match="not a safe relative path") as caught:
        store.download_prefix(f"s3://{bucket}/models/evil", tmp_path / "a" / "b")
    assert caught.value.uri == f"s3://{bucket}/{key}"
    assert [path.name for path in tmp_path.rglob("*") if path.is_file()] == []


@pytest.mark.parametrize(
    ("operation", "target"),
    [
        ("get_bytes", "s3://{bucket}/missing.json"),
        ("download_file", "s3://{bucket}/missing.jsonl"),
        ("get_bytes", "s3://no-such-bucket-{bucket}/data.jsonl"),
        ("download_file", "s3://no-such-bucket-{bucket}/data.jsonl"),
        ("download_prefix", "s3://no-such-bucket-{bucket}/models/llama"),
        ("list_files", "s3://no-such-bucket-{bucket}/models/llama"),
        ("download_prefix", "s3://{bucket}/models/nothing-here"),
    ],
)
def test_missing_objects_name_the_uri(
    store: ObjectStore, bucket: str, tmp_path: Path, operation: str, target: str
) -> None:
    uri = target.format(bucket=bucket)
    call = getattr(store, operation)
    with pytest.raises(ObjectNotFoundError) as caught:
        call(uri) if operation in ("get_bytes", "list_files") else call(uri, tmp_path / "target")
    assert caught.value.uri == uri
    assert uri in str(caught.value)
    assert "does not exist" in str(caught.value)


def test_exists_is_false_for_a_missing_bucket(store: ObjectStore, bucket: str) -> None:
    assert not store.exists(f"s3://no-such-bucket-{bucket}/model")


def test_an_unreachable_endpoint_is_a_retryable_storage_error(store: ObjectStore) -> None:
    """Not a configuration error: the trainer may retry. (``store`` puts credentials in the environment.)"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    unreachable = ObjectStore(endpoint=closed, region=REGION, max_attempts=1)
    with pytest.raises(StorageError) as caught:
        unreachable.get_bytes("s3://bucket/model/config.json")
    assert type(caught.value) is StorageError
    assert str(caught.value).startswith("S3 request for s3://bucket/model/config.json failed: ")
    assert closed in str(caught.value)


def test_no_credentials_is_access_denied(
    server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_aws_env(monkeypatch)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws/credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = ObjectStore(endpoint=server.endpoint, region=REGION)
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
    store = ObjectStore.from_config(StorageConfig(endpoint=server.endpoint, region=REGION))
    uri = f"s3://{bucket}/model/config.json"
    with server.require_authentication():
        failures = []
        for attempt in (
            lambda: store.get_bytes(uri),
            lambda: store.exists(uri),
            lambda: store.download_file(uri, tmp_path / "config.json"),
            lambda: store.download_prefix(f"s3://{bucket}/model/", tmp_path / "model"),
            lambda: store.upload_file(source, f"s3://{bucket}/model/new.json"),
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

"""The embedded S3 server under the trainer's ObjectStore and plain boto3, and what lands on disk."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from finetune_operator.local import embedded_s3
from finetune_operator.local.embedded_s3 import EmbeddedS3
from finetune_trainer.storage import ObjectNotFoundError, ObjectStore, StoredFile

MIB = 1024 * 1024
RUNS = 1100  # checkpoint folders placed by hand: more than a listing page and a DeleteObjects batch
CONFIG = b'{"model_type": "llama"}'


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR as a user prepares it before the run: a model and a folder of earlier checkpoints."""
    root = tmp_path_factory.mktemp("embedded-s3")
    model = root / "models" / "tiny"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_bytes(CONFIG)
    (model / "tokenizer" / "vocab.txt").write_bytes(b"a\nb\n")
    for index in range(RUNS):
        checkpoint = root / "outputs" / "runs" / f"checkpoint-{index:04d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_bytes(b"%d" % (index % 10))
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[EmbeddedS3]:
    with EmbeddedS3(root) as running:
        yield running


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Any credentials do; no developer profile, config file or instance metadata may leak in."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "anything")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "at-all")
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="module")
def store(server: EmbeddedS3, aws_env: None) -> ObjectStore:
    """The trainer's own store, as ``finetune run --embedded-s3`` configures it: 16 MiB parts."""
    return ObjectStore(endpoint=server.endpoint, region="us-east-1")


@pytest.fixture(scope="module")
def client(server: EmbeddedS3, aws_env: None) -> Any:
    """A plain boto3 client with botocore's default config: CRC32 checksums on every upload."""
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id="x",
        aws_secret_access_key="y",
        region_name="us-east-1",
    )


@pytest.fixture
def request_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The server's request log: one line per request, with its status."""
    caplog.set_level(logging.DEBUG, logger=embedded_s3.__name__)
    return caplog


def _request(server: EmbeddedS3, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(server.endpoint.removeprefix("http://"), timeout=10)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _write_tree(source: Path, files: dict[str, bytes]) -> list[StoredFile]:
    for relative, data in files.items():
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        (source / relative).write_bytes(data)
    return sorted(
        (
            StoredFile(relative, len(data), hashlib.sha256(data).hexdigest())
            for relative, data in files.items()
        ),
        key=lambda stored: stored.relative_path,
    )


def test_bytes_land_as_plain_files(store: ObjectStore, client: Any, root: Path) -> None:
    uri, data = "s3://outputs/jobs/a/summary.json", b'{"ok": true}'
    assert not store.exists(uri)
    store.put_bytes(uri, data, content_type="application/json")
    assert (root / "outputs" / "jobs" / "a" / "summary.json").read_bytes() == data
    assert store.get_bytes(uri) == data
    head = client.head_object(Bucket="outputs", Key="jobs/a/summary.json")
    assert head["ContentType"] == "application/json"
    assert head["ContentLength"] == len(data)
    assert head["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert store.exists("s3://outputs/jobs/a")
    assert not store.exists("s3://outputs/jobs/a/summary")
    assert not store.exists("s3://outputs/job")


def test_hand_placed_files_are_served(store: ObjectStore, client: Any) -> None:
    assert store.get_bytes("s3://models/tiny/config.json") == CONFIG
    assert store.list_files("s3://models/tiny") == [
        StoredFile("config.json", len(CONFIG), ""),
        StoredFile("tokenizer/vocab.txt", 4, ""),
    ]
    head = client.head_object(Bucket="models", Key="tiny/config.json")
    assert head["ETag"] == f'"{hashlib.md5(CONFIG).hexdigest()}"'
    names = [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]
    assert {"models", "outputs"} <= set(names)
    assert not any(name.startswith(".") for name in names)


def test_directory_round_trip_with_multipart_and_ranges(
    store: ObjectStore, client: Any, root: Path, tmp_path: Path, request_log: pytest.LogCaptureFixture
) -> None:
    files = {
        "model.safetensors": os.urandom(21 * MIB),  # two 16 MiB parts up, two ranged GETs down
        "config.json": CONFIG,
        "empty.txt": b"",
        "optimizer/rank-0/states.pt": os.urandom(3000),
        "optimizer/rank-1/states.pt": os.urandom(3001),
    }
    expected = _write_tree(tmp_path / "checkpoint", files)
    assert store.upload_directory(tmp_path / "checkpoint", "s3://outputs/run-1/checkpoint-10/") == expected

    stored = root / "outputs" / "run-1" / "checkpoint-10"
    for relative, data in files.items():
        assert (stored / relative).read_bytes() == data
    assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()) == sorted(files)
    head = client.head_object(Bucket="outputs", Key="run-1/checkpoint-10/model.safetensors")
    assert head["ETag"].endswith('-2"')  # S3's multipart ETag: MD5 of the parts' MD5s, "-", their number
    assert store.list_files("s3://outputs/run-1/checkpoint-10") == [
        StoredFile(f.relative_path, f.size, "") for f in expected
    ]
    assert store.list_subprefixes("s3://outputs/run-1/") == ["s3://outputs/run-1/checkpoint-10/"]

    back = tmp_path / "back"
    assert sorted(store.download_prefix("s3://outputs/run-1/checkpoint-10", back), key=str) == expected
    for relative, data in files.items():
        assert (back / relative).read_bytes() == data

    lines = [record.getMessage() for record in request_log.records]
    big = "/outputs/run-1/checkpoint-10/model.safetensors"
    assert any(f"POST {big}?uploads " in line for line in lines)
    assert sum(f"GET {big} " in line and '" 206 ' in line for line in lines) == 2


def test_listings_page_through_more_than_1000_keys(store: ObjectStore, root: Path) -> None:
    assert store.list_subprefixes("s3://outputs/runs/") == [
        f"s3://outputs/runs/checkpoint-{index:04d}/" for index in range(RUNS)
    ]
    files = store.list_files("s3://outputs/runs")
    assert len(files) == RUNS
    assert files[0] == StoredFile("checkpoint-0000/state.json", 1, "")
    assert files[-1] == StoredFile(f"checkpoint-{RUNS - 1:04d}/state.json", 1, "")

    assert store.delete_prefix("s3://outputs/runs/") == RUNS
    assert not (root / "outputs" / "runs").exists()  # emptied folders go too
    assert not store.exists("s3://outputs/runs/")


def test_missing_objects_and_buckets(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match=r"^s3://outputs/nothing/here does not exist$"):
        store.get_bytes("s3://outputs/nothing/here")
    with pytest.raises(ObjectNotFoundError, match="no bucket 'nowhere'"):
        store.get_bytes("s3://nowhere/key")
    with pytest.raises(ObjectNotFoundError, match="no bucket 'nowhere'"):
        store.list_files("s3://nowhere/prefix/")
    with pytest.raises(ObjectNotFoundError, match="no objects under it"):
        store.download_prefix("s3://outputs/nothing/", tmp_path)
    assert not store.exists("s3://outputs/nothing/here")
    assert not store.exists("s3://nowhere/key")


def test_s3_error_responses(server: EmbeddedS3, client: Any) -> None:
    status, body = _request(server, "GET", "/outputs/nothing")
    assert status == 404
    assert b"<Code>NoSuchKey</Code>" in body
    assert _request(server, "HEAD", "/outputs/nothing") == (404, b"")
    assert _request(server, "HEAD", "/nowhere") == (404, b"")
    status, body = _request(server, "GET", "/nowhere/key")
    assert status == 404
    assert b"<Code>NoSuchBucket</Code>" in body
    client.put_object(Bucket="outputs", Key="errors/empty", Body=b"")
    with pytest.raises(ClientError, match="InvalidRange"):
        client.get_object(Bucket="outputs", Key="errors/empty", Range="bytes=0-9")
    with pytest.raises(ClientError, match="NotImplemented"):
        client.copy_object(Bucket="outputs", Key="errors/copy", CopySource="outputs/errors/empty")


def test_ranges_and_if_match(client: Any) -> None:
    client.put_object(Bucket="outputs", Key="ranges/digits", Body=b"0123456789")
    part = client.get_object(Bucket="outputs", Key="ranges/digits", Range="bytes=2-4")
    assert (part["Body"].read(), part["ContentRange"]) == (b"234", "bytes 2-4/10")
    assert client.get_object(Bucket="outputs", Key="ranges/digits", Range="bytes=-3")["Body"].read() == b"789"
    assert (
        client.get_object(Bucket="outputs", Key="ranges/digits", Range="bytes=8-99")["Body"].read() == b"89"
    )
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.get_object(Bucket="outputs", Key="ranges/digits", IfMatch='"0000"')


def test_plain_boto3_with_default_checksums(client: Any, root: Path, tmp_path: Path) -> None:
    client.create_bucket(Bucket="plain")
    data = os.urandom(20 * MIB)
    (tmp_path / "big.bin").write_bytes(data)
    client.upload_file(str(tmp_path / "big.bin"), "plain", "big.bin")  # 8 MiB parts, CRC32 each
    for index in range(3):
        client.put_object(Bucket="plain", Key=f"small/{index}.txt", Body=b"small %d" % index)

    assert (root / "plain" / "big.bin").read_bytes() == data
    client.download_file("plain", "big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == data
    assert client.get_object(Bucket="plain", Key="small/1.txt")["Body"].read() == b"small 1"
    listing = client.list_objects_v2(Bucket="plain", Prefix="small/")
    assert [entry["Key"] for entry in listing["Contents"]] == [f"small/{index}.txt" for index in range(3)]


def test_plain_boto3_aws_chunked_uploads(client: Any, root: Path, tmp_path: Path) -> None:
    """Over HTTPS botocore streams uploads as aws-chunked with a trailing CRC32; forced here over HTTP."""

    def checksum_in_trailer(params: dict[str, Any], **_: Any) -> None:
        algorithm = params["context"].get("checksum", {}).get("request_algorithm")
        if algorithm:
            algorithm["in"] = "trailer"

    encodings: list[str] = []

    def record_encoding(request: Any, **_: Any) -> None:
        value = request.headers.get("Content-Encoding", b"")
        encodings.append(value.decode() if isinstance(value, bytes) else value)

    hooks = [
        ("before-call.s3.PutObject", checksum_in_trailer),
        ("before-call.s3.UploadPart", checksum_in_trailer),
        ("before-send.s3", record_encoding),
    ]
    for event, hook in hooks:
        client.meta.events.register(event, hook)
    try:
        client.create_bucket(Bucket="chunked")
        data = os.urandom(20 * MIB)
        (tmp_path / "big.bin").write_bytes(data)
        client.upload_file(str(tmp_path / "big.bin"), "chunked", "big.bin")
        client.put_object(Bucket="chunked", Key="small.txt", Body=b"small, but framed")
    finally:
        for event, hook in hooks:
            client.meta.events.unregister(event, hook)
    assert encodings.count("aws-chunked") == 4  # three parts and one small object
    assert (root / "chunked" / "big.bin").read_bytes() == data
    assert client.get_object(Bucket="chunked", Key="small.txt")["Body"].read() == b"small, but framed"


def test_signed_aws_chunked_body(server: EmbeddedS3, root: Path) -> None:
    """The framing of SigV4 streaming uploads (other SDKs): chunk signatures are skipped, payload kept."""
    body = b"5;chunk-signature=aa\r\nhello\r\n6;chunk-signature=bb\r\n world\r\n0;chunk-signature=cc\r\n\r\n"
    connection = http.client.HTTPConnection(server.endpoint.removeprefix("http://"), timeout=10)
    try:
        headers = {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": "11"}
        connection.request("PUT", "/outputs/signed.txt", body=body, headers=headers)
        assert connection.getresponse().read() == b""
        headers["x-amz-decoded-content-length"] = "12"
        connection.request("PUT", "/outputs/short.txt", body=body, headers=headers)
        response = connection.getresponse()
        assert response.status == 400
        assert b"<Code>IncompleteBody</Code>" in response.read()
    finally:
        connection.close()
    assert (root / "outputs" / "signed.txt").read_bytes() == b"hello world"
    assert not (root / "outputs" / "short.txt").exists()


def test_errors_keep_the_connection_in_step(server: EmbeddedS3) -> None:
    """A refused upload's body is read before the next request on the same connection is parsed."""
    connection = http.client.HTTPConnection(server.endpoint.removeprefix("http://"), timeout=10)
    try:
        connection.request("PUT", "/nowhere/key", body=b"x" * 100_000)
        response = connection.getresponse()
        assert response.status == 404
        assert b"<Code>NoSuchBucket</Code>" in response.read()
        connection.request("GET", "/models/tiny/config.json")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, CONFIG)
    finally:
        connection.close()


def test_odd_keys_delimiters_and_presigned_urls(client: Any, root: Path) -> None:
    client.create_bucket(Bucket="odd")
    keys = ["a!x", "a-b", "a/b", "a/c/d", "a0", "names/a+b c ü.txt", "x-1-y", "x-2-w", "x-2-z"]
    for key in keys:
        client.put_object(Bucket="odd", Key=key, Body=key.encode())
    assert (root / "odd" / "names" / "a+b c ü.txt").read_bytes() == "names/a+b c ü.txt".encode()
    assert [entry["Key"] for entry in client.list_objects_v2(Bucket="odd")["Contents"]] == keys  # S3's order
    folded = client.list_objects_v2(Bucket="odd", Delimiter="/", MaxKeys=3)
    assert [entry["Key"] for entry in folded["Contents"]] == ["a!x", "a-b"]
    assert [common["Prefix"] for common in folded["CommonPrefixes"]] == ["a/"]
    rest = client.list_objects_v2(
        Bucket="odd", Delimiter="/", ContinuationToken=folded["NextContinuationToken"]
    )
    assert [entry["Key"] for entry in rest["Contents"]] == ["a0", "x-1-y", "x-2-w", "x-2-z"]
    assert [common["Prefix"] for common in rest["CommonPrefixes"]] == ["names/"]
    dashed = client.list_objects_v2(Bucket="odd", Prefix="x-", Delimiter="-")
    assert [common["Prefix"] for common in dashed["CommonPrefixes"]] == ["x-1-", "x-2-"]
    after = client.list_objects_v2(Bucket="odd", StartAfter="a0")
    assert [entry["Key"] for entry in after["Contents"]] == keys[5:]

    url = client.generate_presigned_url("get_object", Params={"Bucket": "odd", "Key": "names/a+b c ü.txt"})
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == "names/a+b c ü.txt".encode()


def test_folder_markers_and_conflicts(client: Any, store: ObjectStore, root: Path) -> None:
    client.put_object(Bucket="outputs", Key="marked/", Body=b"")
    client.put_object(Bucket="outputs", Key="marked/file.txt", Body=b"inside")
    client.put_object(Bucket="outputs", Key="solo", Body=b"a file and a marker share a path")
    client.put_object(Bucket="outputs", Key="solo/", Body=b"")
    listing = client.list_objects_v2(Bucket="outputs", Prefix="marked/")
    assert [entry["Key"] for entry in listing["Contents"]] == ["marked/", "marked/file.txt"]
    folded = client.list_objects_v2(Bucket="outputs", Prefix="solo", Delimiter="/")
    assert [entry["Key"] for entry in folded["Contents"]] == ["solo"]
    assert [common["Prefix"] for common in folded["CommonPrefixes"]] == ["solo/"]
    assert client.head_object(Bucket="outputs", Key="solo/")["ContentLength"] == 0
    assert (root / "outputs" / "solo").read_bytes() == b"a file and a marker share a path"
    assert store.list_files("s3://outputs/marked") == [StoredFile("file.txt", 6, "")]
    assert store.delete_prefix("s3://outputs/marked/") == 2
    assert client.list_objects_v2(Bucket="outputs", Prefix="marked")["KeyCount"] == 0

    with pytest.raises(ClientError, match="PathConflict"):
        client.put_object(Bucket="outputs", Key="solo/below", Body=b"a file cannot be a folder")
    client.put_object(Bucket="outputs", Key="folder/inside", Body=b"x")
    with pytest.raises(ClientError, match="PathConflict"):
        client.put_object(Bucket="outputs", Key="folder", Body=b"a folder cannot be a file")
    assert not list(root.glob("outputs/**/.embedded-s3-*"))


def test_multipart_through_keepalives_and_aborts(
    client: Any, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_s3, "_KEEPALIVE_SECONDS", 0.0)
    data = os.urandom(12 * MIB)
    (tmp_path / "big.bin").write_bytes(data)
    client.upload_file(str(tmp_path / "big.bin"), "outputs", "slow/big.bin")
    assert (root / "outputs" / "slow" / "big.bin").read_bytes() == data

    upload = client.create_multipart_upload(Bucket="outputs", Key="slow/bad.bin")["UploadId"]
    with pytest.raises(ClientError, match="InvalidPart"):
        client.complete_multipart_upload(
            Bucket="outputs",
            Key="slow/bad.bin",
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"' + "0" * 32 + '"'}]},
        )
    client.abort_multipart_upload(Bucket="outputs", Key="slow/bad.bin", UploadId=upload)
    with pytest.raises(ClientError, match="NoSuchUpload"):
        client.abort_multipart_upload(Bucket="outputs", Key="slow/bad.bin", UploadId=upload)


def test_assembly_answers_in_a_stream_once_keepalives_began(
    server: EmbeddedS3, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the keepalive interval the answer is a streamed 200; a failure after that is an Error in it."""
    monkeypatch.setattr(embedded_s3, "_KEEPALIVE_SECONDS", 0.0)
    connection = http.client.HTTPConnection(server.endpoint.removeprefix("http://"), timeout=10)

    def call(method: str, path: str, body: bytes = b"") -> tuple[http.client.HTTPResponse, bytes]:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response, response.read()

    def upload(key: str, data: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        upload_id = ET.fromstring(call("POST", f"/outputs/{key}?uploads")[1]).findtext("{*}UploadId")
        etag = call("PUT", f"/outputs/{key}?partNumber=1&uploadId={upload_id}", data)[0].getheader("ETag")
        part = f"<Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part>"
        complete = f"<CompleteMultipartUpload>{part}</CompleteMultipartUpload>"
        return call("POST", f"/outputs/{key}?uploadId={upload_id}", complete.encode())

    try:
        response, body = upload("streamed/raw.bin", b"raw")
        assert (response.status, response.getheader("Transfer-Encoding")) == (200, "chunked")
        single = hashlib.md5(hashlib.md5(b"raw").digest()).hexdigest()
        assert ET.fromstring(body).findtext("{*}ETag") == f'"{single}-1"'
        assert (root / "outputs" / "streamed" / "raw.bin").read_bytes() == b"raw"

        (root / "outputs" / "streamed" / "taken" / "inside").mkdir(parents=True)
        response, body = upload("streamed/taken", b"a folder is in the way")
        assert (response.status, ET.fromstring(body).findtext("Code")) == (200, "PathConflict")
    finally:
        connection.close()
    assert not list((root / "outputs" / "streamed").rglob(".embedded-s3-*"))


@pytest.mark.parametrize(
    "path",
    [
        "/outputs/../escape",
        "/outputs/a/%2E%2E/%2E%2E/escape",
        "/outputs/..%2F..%2Fescape",
        "/outputs//tmp/escape",
        "/outputs/a/./escape",
        "/outputs/a%00b",
        "/../escape",
        "/outputs/.embedded-s3/escape",
    ],
)
def test_path_traversal_is_refused(server: EmbeddedS3, root: Path, path: str) -> None:
    for method in ("PUT", "GET", "DELETE"):
        status, _ = _request(server, method, path, b"x" if method == "PUT" else b"")
        assert status == 400, (method, path)
    assert not (root.parent / "escape").exists()
    assert not (root / "escape").exists()


def test_path_traversal_through_boto3(client: Any, root: Path) -> None:
    with pytest.raises(ClientError, match="InvalidArgument"):
        client.put_object(Bucket="outputs", Key="../models/tiny/config.json", Body=b"overwritten")
    assert (root / "models" / "tiny" / "config.json").read_bytes() == CONFIG


def test_stop_cuts_kept_alive_connections(tmp_path: Path) -> None:
    server = EmbeddedS3(tmp_path / "fresh").start()
    address = server.endpoint.removeprefix("http://")
    kept = http.client.HTTPConnection(address, timeout=5)
    kept.request("PUT", "/bucket")
    response = kept.getresponse()
    assert (response.status, response.read()) == (200, b"")
    assert (tmp_path / "fresh" / "bucket").is_dir()
    server.stop()
    with pytest.raises(RuntimeError, match="not running"):
        server.endpoint  # noqa: B018
    with pytest.raises(OSError):  # the connection kept alive was cut...
        kept.request("GET", "/")
        kept.getresponse()
    with pytest.raises(OSError):  # ...and nothing listens any more
        http.client.HTTPConnection(address, timeout=5).request("GET", "/")

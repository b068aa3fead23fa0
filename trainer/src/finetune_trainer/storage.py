"""The trainer's only door to its store: models, datasets, checkpoints, outputs.

:class:`ObjectStore` is what the trainer needs of a store, and :meth:`ObjectStore.from_config` picks
one of two: :class:`S3Store` (S3 and S3-compatible stores: MinIO, Ceph) for pods, or
:class:`FolderStore` (``s3://bucket/key`` is the file ``DIR/bucket/key``) for ``finetune run --store
DIR``. Both take ``s3://`` URIs, so a job's spec, its checkpoint layout and its outputs are the same
on a cluster and on a laptop.

Credentials never pass through here: boto3's default chain finds them in the environment (the job's
credentials Secret) or through workload identity (IRSA / web identity). Every failure surfaces as a
:class:`StorageError` that names the URI and says what to fix, so the trainer can tell a job that
cannot succeed (a missing object, a refused credential) from one worth restarting. Imports neither
torch nor anything else heavy: the launcher and tests use it too.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.futures import TransferFuture
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS
from urllib3.exceptions import HTTPError as URLLib3Error

from finetune_trainer.config import FolderStorageConfig, S3StorageConfig

MIB = 1024 * 1024
HASH_CHUNK_BYTES = MIB
# S3 refuses multipart parts under 5 MiB (all but the last) and more than 1000 keys per DeleteObjects.
MIN_PART_MB = 5
DELETE_BATCH = 1000

# How long one S3 request may take to fail, so that a store that is down, throttling or silent ends in
# a StorageError naming the URI instead of a hang. botocore retries each request (5xx, 503 SlowDown,
# connection resets and timeouts) up to RETRIES times after the first attempt, with "adaptive" mode's
# jittered exponential backoff (at most 20 s a wait, about 130 s in all) and, once throttled, a
# client-side rate limit that the requests in flight share. Measured through tests/s3faults.py: a store
# answering only SlowDown fails one request in 40-55 s, and four multipart uploads at once in about
# 2 minutes; a silent store fails a request after 11 x READ_TIMEOUT_S plus the backoff, under 8 minutes.
# botocore's own defaults (60 s timeouts) would let a silent store hold a request for 12 minutes and a
# stalled download (s3transfer retries those DOWNLOAD_ATTEMPTS times) for an hour. READ_TIMEOUT_S is
# the socket's longest silence mid-request, with room to spare for a healthy store (S3 keeps a long
# CompleteMultipartUpload alive with whitespace); CONNECT_TIMEOUT_S is a TCP handshake's.
RETRIES = 10
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
# A body that breaks off after its headers arrived (a reset mid-download) is beyond botocore's retries:
# s3transfer retries those for transfers, and get_bytes as often. botocore also lets urllib3's own
# error through, unretried, when an error reply's body breaks off (botocore#2573 wrapped it for
# streamed bodies only).
DOWNLOAD_ATTEMPTS = 5
_BROKEN_BODY = (*S3_RETRYABLE_DOWNLOAD_ERRORS, URLLib3Error)

_URI = re.compile(r"s3://(?P<bucket>[^/\s]+)(?:/(?P<key>.*))?", re.DOTALL)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_DENIED_CODES = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_CREDENTIALS_HINT = "check the credentials Secret or the workload identity role"


class StorageError(Exception):
    """Any storage failure; ``message`` is fit for users (no credentials) and names ``uri`` when known."""

    def __init__(self, message: str, uri: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.uri = uri


class ObjectNotFoundError(StorageError):
    """A missing object, prefix or bucket: the job cannot succeed by retrying."""


class AccessDeniedError(StorageError):
    """Refused or missing credentials: a configuration error, not a transient one."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``("bucket", "key")``; the key is "" for a bucket's root."""
    match = _URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not an S3 URI of the form s3://bucket/key")
    return match["bucket"], match["key"] or ""


def join_uri(prefix: str, *parts: str) -> str:
    """Joins URI parts with single slashes; a trailing slash on the last argument is kept."""
    parse_s3_uri(prefix)
    pieces = [piece.strip("/") for piece in parts]
    joined = "/".join([prefix.rstrip("/"), *(piece for piece in pieces if piece)])
    return joined + "/" if (parts[-1] if parts else prefix).endswith("/") else joined


@dataclass(frozen=True)
class StoredFile:
    relative_path: str  # posix, relative to the uploaded or downloaded root
    size: int
    sha256: str  # "" where unknown (listings)


def _as_directory(key: str) -> str:
    """A prefix that matches only inside the "directory": ``model`` must not match ``model-v2/``."""
    return key if not key or key.endswith("/") else key + "/"


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _safe_relative(relative: str, uri: str) -> PurePosixPath:
    """Refuses keys that do not map one-to-one onto a path inside the destination (``..``, ``//``)."""
    if any(segment in ("", ".", "..") for segment in relative.split("/")):
        raise StorageError(f"{uri} cannot be downloaded: its key is not a safe relative path", uri=uri)
    return PurePosixPath(relative)


def _digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a local file, read in 1 MiB chunks so a 10 GB shard needs no 10 GB of RAM."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _error(uri: str, code: str, status: int | None, detail: str) -> StorageError:
    """The user-facing error for an S3 error code; the server's own text only for unexpected ones."""
    if code in _NOT_FOUND_CODES or status == 404:
        if code == "NoSuchBucket":
            return ObjectNotFoundError(f"{uri} does not exist (no bucket {parse_s3_uri(uri)[0]!r})", uri=uri)
        return ObjectNotFoundError(f"{uri} does not exist", uri=uri)
    if code in _DENIED_CODES or status == 403:
        return AccessDeniedError(f"access to {uri} denied ({code}): {_CREDENTIALS_HINT}", uri=uri)
    return StorageError(f"S3 request for {uri} failed: {detail}", uri=uri)


def _translate(error: Exception, uri: str, attempts: int = 0) -> StorageError:
    """``attempts``: how often the request was tried, where botocore's own text does not say it."""
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return AccessDeniedError(
            f"access to {uri} denied: no usable S3 credentials found; {_CREDENTIALS_HINT}", uri=uri
        )
    if isinstance(error, ClientError):
        details: dict[str, Any] = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _error(uri, str(details.get("Code", "")), status, str(error))
    if isinstance(error, RetriesExceededError):  # s3transfer's, for a download whose body kept breaking
        return StorageError(
            f"S3 request for {uri} failed: {error.last_exception} (gave up after {DOWNLOAD_ATTEMPTS} "
            "attempts: the store may be unreachable or overloaded; restarting the job may succeed)",
            uri=uri,
        )
    if attempts and isinstance(error, BotoConnectionError | HTTPClientError | URLLib3Error):
        return StorageError(
            f"S3 request for {uri} failed: {error} (gave up after {attempts} attempts: the store may be "
            "unreachable or overloaded; restarting the job may succeed)",
            uri=uri,
        )
    return StorageError(f"S3 request for {uri} failed: {error}", uri=uri)


_STORAGE_ERRORS = (BotoCoreError, ClientError, RetriesExceededError, URLLib3Error)


def _wait(transfer: TransferFuture, uri: str, attempts: int) -> None:
    """Waits for one transfer; a failure leaves the manager's ``with``, which cancels the others."""
    try:
        transfer.result()
    except _STORAGE_ERRORS as error:
        raise _translate(error, uri, attempts) from error


def _refuse_bucket_root(uri: str) -> None:
    """One wrong join must not empty a bucket of other jobs' models."""
    bucket, key = parse_s3_uri(uri)
    if not key.strip("/"):
        raise ValueError(f"refusing to delete every object in bucket {bucket!r} ({uri})")


class ObjectStore(ABC):
    """What the trainer needs of a store, in ``s3://`` URIs; a missing object is ObjectNotFoundError.

    Listings are in key order, skip "directory" markers (keys ending in ``/``) and read a prefix as a
    directory: ``s3://b/model`` lists ``model/...``, never ``model-v2/...``.
    """

    @staticmethod
    def from_config(storage: S3StorageConfig | FolderStorageConfig) -> ObjectStore:
        """The store the worker contract names: the one place the trainer picks an implementation."""
        if isinstance(storage, FolderStorageConfig):
            return FolderStore(Path(storage.root))
        return S3Store(endpoint=storage.endpoint, region=storage.region)

    @abstractmethod
    def get_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abstractmethod
    def download_file(self, uri: str, destination: Path) -> Path: ...

    @abstractmethod
    def download_prefix(self, uri: str, destination: Path) -> list[StoredFile]:
        """Every object under the prefix into ``destination``, keeping relative paths, with sha256."""

    @abstractmethod
    def upload_directory(self, source: Path, uri: str) -> list[StoredFile]:
        """Every file under ``source`` to the prefix, keeping relative paths; returns what was sent."""

    @abstractmethod
    def list_files(self, uri: str) -> list[StoredFile]:
        """Objects under a prefix (no directory markers), relative to it; sha256 is unknown ("")."""

    @abstractmethod
    def list_subprefixes(self, uri: str) -> list[str]:
        """The immediate "sub-directories" of a prefix, as ``s3://bucket/prefix/name/`` URIs."""

    @abstractmethod
    def delete_prefix(self, uri: str) -> int:
        """Deletes every object under the prefix; returns how many there were. Never a bucket's root."""


class S3Store(ObjectStore):
    """One S3 client and a boto3 ``TransferConfig`` shared by every transfer of a process.

    Transfers go through boto3's classic (thread-based) transfer manager: objects at or above
    ``multipart_chunk_mb`` MiB move as parallel parts of that size (AWS advises 8-16 MB ranges), and at
    most ``max_concurrency`` requests are in flight at once, across all the files of one call.

    Every request is bounded in time (see ``RETRIES``): ``max_attempts`` retries after the first try
    (botocore's meaning of the word), ``connect_timeout`` and ``read_timeout`` seconds per try. Tests
    lower them to reach a permanent fault's error quickly; production uses the defaults.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        region: str | None = None,
        *,
        retry_mode: str = "adaptive",
        max_attempts: int = RETRIES,
        max_concurrency: int = 16,
        multipart_chunk_mb: int = 16,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        if multipart_chunk_mb < MIN_PART_MB:
            raise ValueError(f"multipart_chunk_mb must be at least {MIN_PART_MB}, not {multipart_chunk_mb}")
        options: dict[str, Any] = {}
        if endpoint:
            # MinIO and Ceph want path-style URLs and most predate boto3 1.36's default CRC checksums on
            # every request, which they reject; "when_required" keeps checksums where S3 demands them.
            options = {
                "s3": {"addressing_style": "path"},
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        config = Config(
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_concurrency,
            **options,
        )
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None, region_name=region or None, config=config
        )
        self._max_concurrency = max_concurrency
        self._attempts = max_attempts + 1
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_chunk_mb * MIB,
            multipart_chunksize=multipart_chunk_mb * MIB,
            max_concurrency=max_concurrency,
            num_download_attempts=DOWNLOAD_ATTEMPTS,
            # The CRT client ignores these limits and is only picked when awscrt happens to be installed.
            preferred_transfer_client="classic",
        )

    def get_bytes(self, uri: str) -> bytes:
        """The whole object, or an error: a body cut short is fetched again, never returned in part."""
        bucket, key = parse_s3_uri(uri)
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                try:
                    body = self._client.get_object(Bucket=bucket, Key=key)["Body"]
                except (BotoCoreError, ClientError) as error:  # botocore has retried these already
                    raise _translate(error, uri, self._attempts) from error
                return body.read()  # botocore checks the length against Content-Length
            except _BROKEN_BODY as error:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise _translate(error, uri, DOWNLOAD_ATTEMPTS) from error
        raise AssertionError("unreachable")

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        bucket, key = parse_s3_uri(uri)
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except _STORAGE_ERRORS as error:
            raise _translate(error, uri, self._attempts) from error

    def download_file(self, uri: str, destination: Path) -> Path:
        bucket, key = parse_s3_uri(uri)
        self._download(bucket, [(key, PurePosixPath(destination.name), destination)])
        return destination

    def download_prefix(self, uri: str, destination: Path) -> list[StoredFile]:
        bucket, key = parse_s3_uri(uri)
        prefix = _as_directory(key)
        jobs = []
        for obj in self._objects(bucket, prefix, uri):
            relative = _safe_relative(obj["Key"][len(prefix) :], _uri(bucket, obj["Key"]))
            jobs.append((obj["Key"], relative, destination.joinpath(relative)))
        if not jobs:
            raise ObjectNotFoundError(f"{uri} does not exist (no objects under it)", uri=uri)
        return self._download(bucket, jobs)

    def upload_directory(self, source: Path, uri: str) -> list[StoredFile]:
        if not source.is_dir():
            raise NotADirectoryError(f"{source} is not a directory")
        bucket, key = parse_s3_uri(uri)
        prefix = _as_directory(key)
        jobs = []
        for path in sorted(source.rglob("*")):
            if path.is_file():
                relative = PurePosixPath(path.relative_to(source).as_posix())
                jobs.append((path, relative, prefix + str(relative)))
        return self._upload(bucket, jobs)

    def list_files(self, uri: str) -> list[StoredFile]:
        bucket, key = parse_s3_uri(uri)
        prefix = _as_directory(key)
        return [
            StoredFile(obj["Key"][len(prefix) :], obj["Size"], "")
            for obj in self._objects(bucket, prefix, uri)
        ]

    def list_subprefixes(self, uri: str) -> list[str]:
        bucket, key = parse_s3_uri(uri)
        pages = self._pages(bucket, _as_directory(key), uri, Delimiter="/")
        return [_uri(bucket, common["Prefix"]) for page in pages for common in page.get("CommonPrefixes", [])]

    def delete_prefix(self, uri: str) -> int:
        """Directory markers included."""
        _refuse_bucket_root(uri)
        bucket, key = parse_s3_uri(uri)
        # Listed in full before deleting: some stores' continuation tokens shift when keys vanish.
        keys = [
            obj["Key"]
            for page in self._pages(bucket, _as_directory(key), uri)
            for obj in page.get("Contents", [])
        ]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            try:
                response = self._client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except _STORAGE_ERRORS as error:
                raise _translate(error, uri, self._attempts) from error
            for failure in response.get("Errors", []):
                failed = _uri(bucket, failure.get("Key", ""))
                code = str(failure.get("Code", ""))
                raise _error(
                    failed, code, None, f"could not delete it ({code}: {failure.get('Message', '')})"
                )
        return len(keys)

    def _pages(self, bucket: str, prefix: str, uri: str, **arguments: str) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            yield from paginator.paginate(Bucket=bucket, Prefix=prefix, **arguments)
        except _STORAGE_ERRORS as error:
            raise _translate(error, uri, self._attempts) from error

    def _objects(self, bucket: str, prefix: str, uri: str) -> Iterator[dict[str, Any]]:
        """Objects under ``prefix``, without the zero-byte "directory" markers consoles create."""
        for page in self._pages(bucket, prefix, uri):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):
                    yield obj

    def _download(self, bucket: str, jobs: list[tuple[str, PurePosixPath, Path]]) -> list[StoredFile]:
        """Downloads (key, relative, target) in parallel, hashing each file as soon as it has arrived."""
        for _, _, target in jobs:
            target.parent.mkdir(parents=True, exist_ok=True)
        digests: list[Future[tuple[int, str]]] = []
        with (
            create_transfer_manager(self._client, self._transfer_config) as manager,
            ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="sha256") as hashers,
        ):
            transfers = [manager.download(bucket, key, str(target)) for key, _, target in jobs]
            for (key, _, target), transfer in zip(jobs, transfers, strict=True):
                _wait(transfer, _uri(bucket, key), self._attempts)
                digests.append(hashers.submit(_digest, target))
        return [
            StoredFile(str(relative), *d.result()) for (_, relative, _), d in zip(jobs, digests, strict=True)
        ]

    def _upload(self, bucket: str, jobs: list[tuple[Path, PurePosixPath, str]]) -> list[StoredFile]:
        """Uploads (source, relative, key) in parallel while a thread pool hashes the same files."""
        with (
            create_transfer_manager(self._client, self._transfer_config) as manager,
            ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="sha256") as hashers,
        ):
            digests = [hashers.submit(_digest, source) for source, _, _ in jobs]
            transfers = [manager.upload(str(source), bucket, key) for source, _, key in jobs]
            for (_, _, key), transfer in zip(jobs, transfers, strict=True):
                _wait(transfer, _uri(bucket, key), self._attempts)
        return [
            StoredFile(str(relative), *d.result()) for (_, relative, _), d in zip(jobs, digests, strict=True)
        ]


# A write fills a hidden file beside its target, then one rename publishes it; listings skip these.
# The writer holds a shared lock (flock) on its file until the rename; a file nobody holds a lock on
# and that has not changed for PARTIAL_GRACE_SECONDS is a crashed write's, and a listing removes it.
PARTIAL_PREFIX = ".finetune-store-"
PARTIAL_SUFFIX = ".partial"
PARTIAL_GRACE_SECONDS = 60.0
# S3's own limits on a key; a file name has 255 bytes at most.
MAX_KEY_BYTES = 1024
MAX_NAME_BYTES = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_Filled = TypeVar("_Filled")


def _is_partial(name: str) -> bool:
    return name.startswith(PARTIAL_PREFIX) and name.endswith(PARTIAL_SUFFIX)


def _shown(uri: str) -> str:
    """The URI as a message shows it: control characters escaped, a very long one shortened."""
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", uri)
    return shown if len(shown) <= 300 else shown[:297] + "..."


def _copy_hashing(source: Path, target: Path) -> tuple[int, str]:
    """Copies a file and hashes it in the same pass: one read of a 10 GB shard, not two."""
    sha = hashlib.sha256()
    size = 0
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(HASH_CHUNK_BYTES):
            sha.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs nothing for a 10 GB model; another filesystem needs a copy."""
    try:
        target.unlink(missing_ok=True)  # the placeholder that held the partial's name and lock
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _publish(uri: str, target: Path, fill: Callable[[Path], _Filled], shown: str = "") -> _Filled:
    """Fills a hidden file beside ``target`` and renames it over ``target`` (os.replace is atomic):
    readers see the old file or the new one, never a part, and a crash leaves no half object (only a
    hidden file that the next listing removes). ``shown`` names the target in errors (downloads: the
    caller's own path); store paths are never shown, only the URI."""
    partial = target.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    where = f" to {shown}" if shown else ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH)  # while held, no listing takes the file for a crash's
            filled = fill(partial)
            os.replace(partial, target)
        finally:
            os.close(descriptor)
            partial.unlink(missing_ok=True)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        raise StorageError(
            f"{_shown(uri)} cannot be written{where}: a file and a folder would share a path", uri=uri
        ) from error
    except OSError as error:
        raise StorageError(
            f"writing {_shown(uri)}{where} failed: {error.strerror or type(error).__name__}", uri=uri
        ) from error
    return filled


def _sweep_partial(path: Path, grace_seconds: float) -> None:
    """Removes a crashed write's hidden file: unchanged for ``grace_seconds`` and locked by nobody."""
    try:
        status = path.lstat()
        if time.time() - max(status.st_mtime, status.st_ctime) < grace_seconds:
            return
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a writer is still at it
        finally:
            os.close(descriptor)
        path.unlink(missing_ok=True)
    except OSError:
        pass  # gone already, or not ours to remove: the next listing tries again


class FolderStore(ObjectStore):
    """``s3://bucket/key`` is the file ``root/bucket/key``: ``finetune run --store DIR``, with no server.

    No library is needed: a folder already is a store of named files, and the standard library has
    each operation S3 offers here (os.replace for atomic writes, os.link for free downloads, os.walk
    for listings). It keeps S3Store's contract, so the checkpointer works unchanged on it: a bucket is
    a top-level folder that must exist, listings are in key order and never show empty folders, and
    a write becomes visible whole or not at all, so a reader never sees half a manifest. Downloads
    are hard links where possible: store files are only ever replaced, never rewritten, so a link
    never changes under the trainer. Uploads are copies, since the trainer may rewrite its own files.
    A key that would lead out of the folder (``..``, an absolute key, a symlink pointing out) or that
    no file can be named (control characters, too long) is an AccessDeniedError naming the URI; no
    error shows a path inside the folder, only URIs. A write cut short leaves only a hidden file that
    the next listing of its folder removes (see PARTIAL_GRACE_SECONDS).
    """

    def __init__(self, root: Path, partial_grace_seconds: float = PARTIAL_GRACE_SECONDS) -> None:
        self.root = root.resolve()
        self.partial_grace_seconds = partial_grace_seconds
        if not self.root.is_dir():
            raise ObjectNotFoundError(f"the store folder {root} does not exist or is not a folder")

    def get_bytes(self, uri: str) -> bytes:
        path = self._existing_file(uri)
        try:
            return path.read_bytes()
        except OSError as error:
            raise StorageError(
                f"reading {_shown(uri)} failed: {error.strerror or type(error).__name__}", uri=uri
            ) from error

    def put_bytes(self, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """``content_type`` is S3 metadata that a file has no place for; readers go by the name."""
        _publish(uri, self._locate(uri), lambda partial: partial.write_bytes(data))

    def download_file(self, uri: str, destination: Path) -> Path:
        source = self._existing_file(uri)
        _publish(uri, destination, lambda partial: _link_or_copy(source, partial), shown=str(destination))
        return destination

    def download_prefix(self, uri: str, destination: Path) -> list[StoredFile]:
        objects = self._objects(uri)
        if not objects:
            raise ObjectNotFoundError(f"{uri} does not exist (no objects under it)", uri=uri)
        downloaded = []
        for relative, source in objects:
            target = destination.joinpath(relative)
            _publish(
                uri, target, lambda partial, source=source: _link_or_copy(source, partial), shown=str(target)
            )
            downloaded.append(StoredFile(relative, *_digest(target)))
        return downloaded

    def upload_directory(self, source: Path, uri: str) -> list[StoredFile]:
        if not source.is_dir():
            raise NotADirectoryError(f"{source} is not a directory")
        directory = self._locate(uri)
        uploaded = []
        for path in sorted(source.rglob("*")):
            if path.is_file():
                relative = path.relative_to(source).as_posix()
                self._locate(join_uri(uri, relative))  # each key is checked as a key of its own
                size, sha256 = _publish(
                    uri, directory / relative, lambda partial, path=path: _copy_hashing(path, partial)
                )
                uploaded.append(StoredFile(relative, size, sha256))
        return uploaded

    def list_files(self, uri: str) -> list[StoredFile]:
        return [StoredFile(relative, size, "") for relative, path, size in self._sized(uri)]

    def list_subprefixes(self, uri: str) -> list[str]:
        """As S3 with a ``/`` delimiter: the folders holding at least one file, in key order."""
        bucket, key = parse_s3_uri(uri)
        names = {relative.split("/")[0] + "/" for relative, _ in self._objects(uri) if "/" in relative}
        return [_uri(bucket, _as_directory(key) + name) for name in sorted(names)]

    def delete_prefix(self, uri: str) -> int:
        """Removes the prefix's folder, emptied sub-folders included (S3 has no empty folders either)."""
        _refuse_bucket_root(uri)
        count = len(self._objects(uri))  # refuses a prefix with a file linking out of the folder
        directory = self._locate(uri)
        try:
            if directory.is_symlink():  # a link to a folder inside the store: the link is the prefix
                directory.unlink()
            elif directory.is_dir():
                shutil.rmtree(directory)  # never follows a symlink below it (it removes the link)
        except OSError as error:
            raise StorageError(
                f"deleting {_shown(uri)} failed: {error.strerror or type(error).__name__}", uri=uri
            ) from error
        return count

    def _locate(self, uri: str) -> Path:
        """The file or folder of a URI in an existing bucket; refuses anything leading out of the root
        and any key no file can be named by."""
        bucket, key = parse_s3_uri(uri)
        segments = [bucket, *key.removesuffix("/").split("/")] if key else [bucket]
        try:
            sizes = [len(segment.encode()) for segment in segments]
        except UnicodeEncodeError:  # a lone surrogate: no file name
            sizes = [MAX_KEY_BYTES + 1]
        if (
            any(segment in ("", ".", "..") or _CONTROL.search(segment) for segment in segments)
            or _is_partial(segments[-1])
            or max(sizes) > MAX_NAME_BYTES
            or sum(sizes) > MAX_KEY_BYTES
        ):
            raise AccessDeniedError(
                f"access to {_shown(uri)} denied: its key is not a plain relative path inside the store "
                f"folder (no '..', '.', empty or absolute parts, no control characters, at most "
                f"{MAX_KEY_BYTES} bytes and {MAX_NAME_BYTES} a part, not a name the store uses for "
                "writes in progress)",
                uri=uri,
            )
        path = self.root.joinpath(*segments)
        self._refuse_outside(path, uri)
        if not (self.root / bucket).is_dir():
            raise ObjectNotFoundError(f"{_shown(uri)} does not exist (no bucket {bucket!r})", uri=uri)
        return path

    def _refuse_outside(self, path: Path, uri: str) -> None:
        """Symlinks may point anywhere: what a path resolves to must still be inside the root."""
        try:
            inside = path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if not inside:
            raise AccessDeniedError(
                f"access to {_shown(uri)} denied: it leads out of the store folder (a symlink pointing "
                "outside it, or a loop of them)",
                uri=uri,
            )

    def _existing_file(self, uri: str) -> Path:
        path = self._locate(uri)
        if not path.is_file():
            raise ObjectNotFoundError(f"{uri} does not exist", uri=uri)
        return path

    def _objects(self, uri: str) -> list[tuple[str, Path]]:
        """(key relative to the prefix, file) for every file under it, in S3's key order. Hidden files
        of crashed writes are removed on the way; symlinked folders are not followed, and a symlinked
        file pointing out of the store refuses the listing (and so a delete)."""
        bucket, key = parse_s3_uri(uri)
        directory = self._locate(uri)
        if not directory.is_dir():
            return []
        found = []
        for folder, _, names in os.walk(directory):
            for name in names:
                path = Path(folder, name)
                if _is_partial(name):
                    _sweep_partial(path, self.partial_grace_seconds)
                    continue
                relative = path.relative_to(directory).as_posix()
                self._refuse_outside(path, _uri(bucket, _as_directory(key) + relative))
                if path.is_file():  # not a dangling link, a fifo or a socket
                    found.append((relative, path))
        # Python orders strings by code point, which is S3's order (UTF-8 bytes) for the same keys.
        return sorted(found)

    def _sized(self, uri: str) -> list[tuple[str, Path, int]]:
        sized = []
        for relative, path in self._objects(uri):
            try:
                sized.append((relative, path, path.stat().st_size))
            except OSError:  # removed since it was listed
                continue
        return sized

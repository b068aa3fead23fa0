"""A local directory served as an S3 endpoint, so one machine can run a job without an object store.

``finetune run FILE --embedded-s3 DIR`` points the trainer at :class:`EmbeddedS3`: each top-level folder
of DIR is a bucket and each file below it an object whose key is its path relative to the bucket, so the
models and data a user copies in are objects, and every output the job writes ends up as plain files.
It speaks the part of the S3 REST API that boto3 and s3transfer use, path-style URLs only, and checks no
signatures: any credentials are accepted, so it must only listen on loopback.

Its bookkeeping lives in DIR/.embedded-s3 and is never listed: ETags (the MD5 of a file, computed once and
trusted while the file keeps its size, mtime and inode), folder markers (keys ending in '/', which could
not otherwise share a path with a file) and multipart uploads until they are assembled.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import io
import json
import logging
import os
import re
import shutil
import socket
import socketserver
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote

logger = logging.getLogger(__name__)

# The hidden area's name: no bucket or key segment may start with it, so none collides with bookkeeping.
_RESERVED = ".embedded-s3"
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'
_DEFAULT_TYPE = "binary/octet-stream"
_BLOCK = 8 * 1024 * 1024
_LINE_LIMIT = 64 * 1024
_XML_LIMIT = 16 * 1024 * 1024  # a DeleteObjects of 1000 keys of 1024 bytes, escaped, fits
_MAX_KEYS = 1000
_MAX_KEY_BYTES = 1024
_MIN_PART_BYTES = 5 * 1024 * 1024
_MAX_PART_NUMBER = 10_000
# While it assembles a large multipart object, the server sends a space this often, as S3 does, so the
# client's read timeout (60 s in botocore) does not fire in the middle of the copy.
_KEEPALIVE_SECONDS = 10.0
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_PART_FILE = re.compile(r"(\d{5})\.([0-9a-f]{32})")
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_EMPTY_MD5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()
# Query parameters that qualify an operation rather than select one; presigned URLs add the signature
# ones (X-Amz-* for SigV4).
_LISTING = {"prefix", "delimiter", "max-keys", "continuation-token", "start-after", "encoding-type"}
_QUALIFIERS = frozenset({*_LISTING, "fetch-owner", "x-id", "AWSAccessKeyId", "Signature", "Expires"})

_Xml = list[tuple[str, "str | int | _Xml"]]


class _S3Error(Exception):
    """An S3 error response: HTTP status, S3's error code and a message for the user."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Object:
    key: str
    size: int
    mtime: float
    etag: str  # quoted, as S3 sends it
    content_type: str


def _as_s3_error(error: Exception) -> _S3Error:
    """The response for an exception: unexpected ones are logged and become 500 InternalError."""
    if isinstance(error, _S3Error):
        return error
    logger.exception("embedded S3 request failed")
    return _S3Error(500, "InternalError", f"{type(error).__name__}: {error}")


def _no_such_key(key: str) -> _S3Error:
    return _S3Error(404, "NoSuchKey", f"The specified key does not exist: {key!r}")


def _conflict(key: str) -> _S3Error:
    """A key that a file cannot hold because of another object: on disk, a file cannot also be a folder."""
    return _S3Error(
        409, "PathConflict", f"{key!r} cannot be stored: an object holds its path or a folder of it"
    )


def _check_key(key: str) -> None:
    """Refuses keys that are not a plain relative path (``..``, absolute, ``a//b``): none may leave its bucket
    or name the same file as another."""
    if len(key.encode()) > _MAX_KEY_BYTES:
        raise _S3Error(400, "KeyTooLongError", f"keys are at most {_MAX_KEY_BYTES} bytes long")
    segments = key.removesuffix("/").split("/")
    if any(s in ("", ".", "..") or "\0" in s or s.startswith(_RESERVED) for s in segments):
        raise _S3Error(400, "InvalidArgument", f"{key!r} is not a relative path of plain names")


def _http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)


def _iso_date(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(timestamp))


def _url_encoded(text: str) -> str:
    """What ``encoding-type=url`` asks for; botocore asks for it and decodes with ``unquote_plus``."""
    return quote(text, safe="/")


def _element(tag: str, content: str | int | _Xml) -> ET.Element:
    element = ET.Element(tag)
    if isinstance(content, list):
        element.extend(_element(child_tag, child) for child_tag, child in content)
    else:
        element.text = str(content)
    return element


def _document(tag: str, content: _Xml) -> bytes:
    """An S3 XML document, without its declaration, from nested (tag, text or children) pairs."""
    root = _element(tag, content)
    if tag != "Error":
        root.set("xmlns", _XMLNS)
    return ET.tostring(root, encoding="utf-8")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """First and last byte of a single ``bytes=`` range, None for the whole object: as S3 does, a range it
    cannot parse is ignored, and one that starts past the end is refused."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or not any(match.groups()):
        return None
    first, last = match.groups()
    unsatisfiable = _S3Error(416, "InvalidRange", "The requested range is not satisfiable")
    if not first:  # bytes=-N: the last N bytes
        if size == 0 or int(last) == 0:
            raise unsatisfiable
        return max(size - int(last), 0), size - 1
    if last and int(last) < int(first):
        return None
    if int(first) >= size:
        raise unsatisfiable
    return int(first), min(int(last), size - 1) if last else size - 1


def _matches(condition: str | None, etag: str) -> bool:
    """``If-Match``: s3transfer sends the ETag it first saw with each ranged GET of a large download."""
    if condition is None:
        return True
    tags = {tag.strip() for tag in condition.split(",")}
    return bool(tags & {"*", etag, etag.strip('"')})


def _part_number(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= _MAX_PART_NUMBER:
        raise _S3Error(400, "InvalidArgument", f"part numbers run from 1 to {_MAX_PART_NUMBER}, not {text!r}")
    return int(text)


def _receive(body: io.RawIOBase, out: BinaryIO, expected: int | None) -> str:
    """Copies a request body into ``out`` and returns its MD5, refusing a body of another length."""
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    while block := body.read(_BLOCK):
        out.write(block)
        md5.update(block)
        size += len(block)
    if expected is not None and size != expected:
        raise _S3Error(400, "IncompleteBody", f"the body had {size} bytes, not the {expected} it announced")
    return md5.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_RESERVED}-{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _prune(directory: Path, stop: Path) -> None:
    """Removes emptied folders from ``directory`` up to ``stop``: S3 has no empty folders, and a leftover one
    would keep a later object from taking its name."""
    while directory != stop and directory.is_relative_to(stop):
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _has_files(directory: str) -> bool:
    for _, folders, files in os.walk(directory, followlinks=True):
        if any(not name.startswith(_RESERVED) for name in files):
            return True
        folders[:] = [name for name in folders if not name.startswith(_RESERVED)]
    return False


def _walk(directory: Path, base: str, prefix: str, after: str, fold: bool) -> Iterator[tuple[str, bool]]:
    """(key, is_common_prefix) for the files under ``directory`` in S3's order (a folder sorts as its name
    plus '/'), skipping folders outside ``prefix`` or wholly before ``after``; with ``fold`` (delimiter '/')
    each non-empty folder below the prefix comes out once, as a common prefix, without being walked."""
    try:
        with os.scandir(directory) as scan:
            entries = [
                (entry.name + "/" if entry.is_dir() else entry.name, entry.path)
                for entry in scan
                if not entry.name.startswith(_RESERVED) and (entry.is_dir() or entry.is_file())
            ]
    except (FileNotFoundError, NotADirectoryError):
        return
    for name, path in sorted(entries, key=itemgetter(0)):
        key = base + name
        if not name.endswith("/"):
            if key.startswith(prefix):
                yield key, False
        elif after >= key and not after.startswith(key):
            continue
        elif fold and key.startswith(prefix) and key != prefix:
            if _has_files(path):
                yield key, True
        elif key.startswith(prefix) or prefix.startswith(key):
            yield from _walk(Path(path), key, prefix, after, fold)


class _Body(io.RawIOBase):
    """A request body: ``length`` bytes of ``source``, or with ``length`` None the payload of chunked framing.

    HTTP/1.1's chunked transfer coding and S3's aws-chunked content coding share one framing (hex sizes, ';'
    extensions such as chunk signatures, trailers such as checksums), so one decoder serves both layers.
    """

    def __init__(self, source: io.BufferedIOBase, length: int | None) -> None:
        super().__init__()
        self._source = source
        self._chunked = length is None
        self._left = length or 0  # bytes left in the current chunk (the whole body when not chunked)
        self._last = not self._chunked  # no chunk follows the current one

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            if self._last:
                return 0
            self._next_chunk()
        count = self._source.readinto(memoryview(buffer)[: self._left])
        if not count:
            raise _S3Error(400, "IncompleteBody", "the request body ended before its announced length")
        self._left -= count
        if self._chunked and not self._left and self._source.read(2) != b"\r\n":
            raise _S3Error(400, "IncompleteBody", "a chunk of the request body does not end with CRLF")
        return count

    def _next_chunk(self) -> None:
        line = self._source.readline(_LINE_LIMIT)
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            size = -1
        if size < 0 or not line.endswith(b"\n"):
            raise _S3Error(400, "IncompleteBody", f"malformed chunk header {line[:80]!r}")
        if size == 0:
            self._last = True
            while (trailer := self._source.readline(_LINE_LIMIT)).strip():  # checksums, trailer signatures
                continue
            if not trailer.endswith(b"\n"):
                raise _S3Error(400, "IncompleteBody", "the request body ended inside its trailers")
        self._left = size


class _Directory:
    """The objects: files under ``root``, and the bookkeeping kept in its hidden area."""

    def __init__(self, root: Path) -> None:
        self.root = root
        hidden = root / _RESERVED
        self._records = hidden / "etags"
        self._markers = hidden / "markers"
        self._uploads = hidden / "uploads"
        for folder in (self._records, self._markers, self._uploads):
            folder.mkdir(parents=True, exist_ok=True)
        # Held while folders are created or pruned, so a delete cannot prune the folder a write is entering.
        self._namespace = threading.Lock()

    def bucket(self, name: str) -> Path:
        if not name or name.startswith(".") or "\0" in name:
            raise _S3Error(400, "InvalidBucketName", f"{name!r} is not a bucket name")
        path = self.root / name
        if not path.is_dir():
            raise _S3Error(404, "NoSuchBucket", f"The specified bucket does not exist: no folder {path}")
        return path

    def buckets(self) -> list[tuple[str, float]]:
        with os.scandir(self.root) as scan:
            return sorted(
                (entry.name, entry.stat().st_mtime)
                for entry in scan
                if entry.is_dir() and not entry.name.startswith(".")
            )

    def create_bucket(self, name: str) -> None:
        if not _BUCKET_NAME.fullmatch(name):
            raise _S3Error(400, "InvalidBucketName", f"{name!r} is not a valid S3 bucket name")
        try:
            (self.root / name).mkdir(exist_ok=True)
        except FileExistsError:
            raise _S3Error(409, "BucketAlreadyExists", f"{self.root / name} is a file") from None

    def put(
        self, bucket: str, key: str, body: io.RawIOBase, content_type: str | None, expected: int | None
    ) -> str:
        """Stores ``body`` under ``key``, atomically; returns its MD5."""
        home = self.bucket(bucket)
        if key.endswith("/"):
            if body.read(1):
                raise _S3Error(400, "InvalidArgument", f"{key!r} ends in '/': it must be empty")
            _write_atomic(self._marker_path(bucket, key), key.encode())
            return _EMPTY_MD5
        target = home.joinpath(*key.split("/"))
        with self._staging(home, target, key) as (tmp, out):
            etag = _receive(body, out, expected)
            self._commit(tmp, out, target, bucket, key, etag, content_type)
        return etag

    def open(self, bucket: str, key: str) -> tuple[BinaryIO, _Object]:
        """The object's content, open, and what S3 reports about it; both describe the same file."""
        return self._open(self.bucket(bucket), bucket, key)

    def delete(self, bucket: str, key: str) -> None:
        """Removes an object; as in S3, removing a missing one succeeds."""
        home = self.bucket(bucket)
        if key.endswith("/"):
            self._marker_path(bucket, key).unlink(missing_ok=True)
            return
        target = home.joinpath(*key.split("/"))
        with self._namespace:
            try:
                if not target.is_dir():
                    target.unlink(missing_ok=True)
            except NotADirectoryError:
                return
            _prune(target.parent, home)
        self._record_path(bucket, key).unlink(missing_ok=True)

    def list(
        self, bucket: str, prefix: str, delimiter: str, after: str, limit: int
    ) -> tuple[list[_Object], list[str], str | None]:
        """Objects and common prefixes past ``after``, at most ``limit`` together, and where the next page
        starts (None on the last page). Keys under one common prefix are contiguous in key order, so the
        displayed names only grow: comparing with the last one both skips ``after`` and folds duplicates."""
        home = self.bucket(bucket)
        if limit == 0:
            return [], [], None
        walked = _walk(home, "", prefix, after, delimiter == "/")
        markers = ((key, False) for key in self._marker_keys(bucket, prefix))
        contents: list[_Object] = []
        prefixes: list[str] = []
        last = after
        for key, folded in heapq.merge(walked, markers):
            if not folded and delimiter and (cut := key.find(delimiter, len(prefix))) >= 0:
                key, folded = key[: cut + len(delimiter)], True
            if key <= last:
                continue
            if len(contents) + len(prefixes) == limit:
                return contents, prefixes, last
            last = key
            if folded:
                prefixes.append(key)
                continue
            try:
                stream, found = self._open(home, bucket, key)
            except _S3Error:  # deleted while listing
                continue
            stream.close()
            contents.append(found)
        return contents, prefixes, None

    def create_upload(self, bucket: str, key: str, content_type: str | None) -> str:
        self.bucket(bucket)
        if key.endswith("/"):
            raise _S3Error(400, "InvalidArgument", f"{key!r} ends in '/': folder markers have no parts")
        upload_id = uuid.uuid4().hex
        record = {"bucket": bucket, "key": key, "content_type": content_type}
        _write_atomic(self._uploads / upload_id / "upload.json", json.dumps(record).encode())
        return upload_id

    def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, body: io.RawIOBase, expected: int | None
    ) -> str:
        """Stages one part as ``NNNNN.<md5>``, so its name alone says which ETag it answers to."""
        folder, _ = self._upload(bucket, key, upload_id)
        tmp = folder / f"{_RESERVED}-{uuid.uuid4().hex}.tmp"
        try:
            with tmp.open("xb") as out:
                etag = _receive(body, out, expected)
            os.replace(tmp, folder / f"{number:05d}.{etag}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for stale in folder.glob(f"{number:05d}.*"):
            if stale.name != f"{number:05d}.{etag}":
                stale.unlink(missing_ok=True)
        return etag

    def complete(
        self, bucket: str, key: str, upload_id: str, parts: list[tuple[int, str]], tick: Callable[[], None]
    ) -> str:
        """Assembles the listed parts into the object, calling ``tick`` after each block copied; returns
        S3's multipart ETag: the MD5 of the parts' binary MD5s, then '-' and the number of parts."""
        home = self.bucket(bucket)
        folder, record = self._upload(bucket, key, upload_id)
        staged = {
            (int(match[1]), match[2]): folder / name
            for name in os.listdir(folder)
            if (match := _PART_FILE.fullmatch(name))
        }
        if not parts:
            raise _S3Error(400, "MalformedXML", "a multipart upload is completed with at least one part")
        chosen: list[Path] = []
        for index, (number, etag) in enumerate(parts):
            if index and number <= parts[index - 1][0]:
                raise _S3Error(400, "InvalidPartOrder", "the parts must be listed in ascending order")
            if (number, etag.lower()) not in staged:
                raise _S3Error(400, "InvalidPart", f"part {number} with ETag {etag!r} was not uploaded")
            chosen.append(staged[number, etag.lower()])
        if any(path.stat().st_size < _MIN_PART_BYTES for path in chosen[:-1]):
            raise _S3Error(400, "EntityTooSmall", "every part but the last must be at least 5 MiB")
        digest = hashlib.md5(b"".join(bytes.fromhex(etag) for _, etag in parts), usedforsecurity=False)
        etag = f"{digest.hexdigest()}-{len(parts)}"
        target = home.joinpath(*key.split("/"))
        with self._staging(home, target, key) as (tmp, out):
            for path in chosen:
                with path.open("rb") as part:
                    while block := part.read(_BLOCK):
                        out.write(block)
                        tick()
            self._commit(tmp, out, target, bucket, key, etag, record["content_type"])
        shutil.rmtree(folder, ignore_errors=True)
        return etag

    def abort(self, bucket: str, key: str, upload_id: str) -> None:
        self.bucket(bucket)
        folder, _ = self._upload(bucket, key, upload_id)
        shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def _staging(self, home: Path, target: Path, key: str) -> Iterator[tuple[Path, BinaryIO]]:
        """A new file beside ``target`` (same file system, so ``os.replace`` is atomic), removed with the
        folders made for it unless it was committed."""
        with self._namespace:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise _conflict(key) from None
            tmp = target.parent / f"{_RESERVED}-{uuid.uuid4().hex}.tmp"
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(descriptor, "wb") as out:
                yield tmp, out
        except BaseException:
            tmp.unlink(missing_ok=True)
            with self._namespace:
                _prune(target.parent, home)
            raise

    def _commit(
        self,
        tmp: Path,
        out: BinaryIO,
        target: Path,
        bucket: str,
        key: str,
        etag: str,
        content_type: str | None,
    ) -> None:
        """Records the ETag first, then renames: a reader never finds the object without its record."""
        out.flush()
        self._save_record(bucket, key, os.fstat(out.fileno()), etag, content_type)
        try:
            os.replace(tmp, target)
        except IsADirectoryError:
            raise _conflict(key) from None

    def _open(self, home: Path, bucket: str, key: str) -> tuple[BinaryIO, _Object]:
        if key.endswith("/"):
            try:
                mtime = self._marker_path(bucket, key).stat().st_mtime
            except FileNotFoundError:
                raise _no_such_key(key) from None
            return io.BytesIO(), _Object(key, 0, mtime, f'"{_EMPTY_MD5}"', _DEFAULT_TYPE)
        try:
            stream = home.joinpath(*key.split("/")).open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise _no_such_key(key) from None
        try:
            return stream, self._describe(bucket, key, stream)
        except BaseException:
            stream.close()
            raise

    def _describe(self, bucket: str, key: str, stream: BinaryIO) -> _Object:
        """The recorded ETag and content type while the record matches the open file, else its MD5: files
        copied in by hand get theirs on first use."""
        status = os.fstat(stream.fileno())
        stamp = [status.st_size, status.st_mtime_ns, status.st_ino]
        try:
            record = json.loads(self._record_path(bucket, key).read_bytes())
        except (OSError, ValueError):
            record = {}
        if record.get("stamp") != stamp:
            etag = hashlib.file_digest(stream, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
            stream.seek(0)
            record = self._save_record(bucket, key, status, etag, None)
        content_type = record["content_type"] or _DEFAULT_TYPE
        return _Object(key, status.st_size, status.st_mtime, f'"{record["etag"]}"', content_type)

    def _save_record(
        self, bucket: str, key: str, status: os.stat_result, etag: str, content_type: str | None
    ) -> dict[str, Any]:
        stamp = [status.st_size, status.st_mtime_ns, status.st_ino]
        record = {"stamp": stamp, "etag": etag, "content_type": content_type}
        _write_atomic(self._record_path(bucket, key), json.dumps(record).encode())
        return record

    def _record_path(self, bucket: str, key: str) -> Path:
        digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
        return self._records / digest[:2] / f"{digest}.json"

    def _marker_path(self, bucket: str, key: str) -> Path:
        return self._markers / bucket / hashlib.sha256(key.encode()).hexdigest()

    def _marker_keys(self, bucket: str, prefix: str) -> list[str]:
        keys = []
        with suppress(FileNotFoundError), os.scandir(self._markers / bucket) as scan:
            for entry in scan:
                if not entry.name.startswith(_RESERVED):
                    with suppress(FileNotFoundError):
                        keys.append(Path(entry.path).read_text(encoding="utf-8"))
        return sorted(key for key in keys if key.startswith(prefix))

    def _upload(self, bucket: str, key: str, upload_id: str) -> tuple[Path, dict[str, Any]]:
        folder = self._uploads / (upload_id if _UPLOAD_ID.fullmatch(upload_id) else "-")
        try:
            record = json.loads((folder / "upload.json").read_bytes())
        except (OSError, ValueError):
            record = {}
        if record.get("bucket") != bucket or record.get("key") != key:
            raise _S3Error(404, "NoSuchUpload", f"no upload {upload_id!r} of {key!r} is in progress")
        return folder, record


class _Handler(BaseHTTPRequestHandler):
    """One connection: S3 requests in turn, kept alive between them."""

    protocol_version = "HTTP/1.1"  # keep-alive, and BaseHTTPRequestHandler answers Expect: 100-continue
    server_version = "EmbeddedS3"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        self._replied = False
        self._raw: _Body | None = None
        raw_path, _, raw_query = self.path.partition("?")
        self._resource = raw_path
        try:
            self._open_body()
            try:
                path = unquote(raw_path, errors="strict")
            except UnicodeDecodeError:
                raise _S3Error(400, "InvalidURI", "the path is not percent-encoded UTF-8") from None
            bucket, _, key = path.removeprefix("/").partition("/")
            query = {name: values[-1] for name, values in parse_qs(raw_query, keep_blank_values=True).items()}
            self._route(bucket, key, query)
        except ConnectionError:  # the client went away
            self.close_connection = True
        except Exception as error:
            with suppress(ConnectionError):
                self._send_error(_as_s3_error(error))
        finally:
            self._finish_body()

    def _open_body(self) -> None:
        """``_raw`` reads the body as framed on the wire; ``_payload`` reads it with aws-chunked decoded."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._raw = _Body(self.rfile, None)
        else:
            length = self.headers.get("Content-Length", "0")
            if not length.isdigit():
                raise _S3Error(400, "InvalidArgument", f"Content-Length {length!r} is not a number of bytes")
            self._raw = _Body(self.rfile, int(length))
        self._payload: io.RawIOBase = self._raw
        self._expected: int | None = None
        if "aws-chunked" in self.headers.get("Content-Encoding", "").lower():
            self._payload = _Body(io.BufferedReader(self._raw), None)
            decoded = self.headers.get("x-amz-decoded-content-length")
            self._expected = int(decoded) if decoded and decoded.isdigit() else None

    def _finish_body(self) -> None:
        """Reads what the operation left of the body, so the next request on the connection starts in step;
        when the body cannot be read to its end, the connection is closed instead."""
        if self._raw is None:
            self.close_connection = True
            return
        try:
            while self._raw.read(_BLOCK):
                continue
        except (OSError, _S3Error):
            self.close_connection = True

    def _route(self, bucket: str, key: str, query: dict[str, str]) -> None:
        if key and not bucket:
            raise _S3Error(400, "InvalidBucketName", "the bucket name is empty")
        if key:
            _check_key(key)
        if "x-amz-copy-source" in self.headers:
            raise _S3Error(501, "NotImplemented", "this server does not copy objects")
        level = "object" if key else "bucket" if bucket else "service"
        selected = frozenset(
            name for name in query if name not in _QUALIFIERS and not name.lower().startswith("x-amz-")
        )
        operation = {
            ("GET", "service", frozenset()): self._list_buckets,
            ("PUT", "bucket", frozenset()): self._create_bucket,
            ("HEAD", "bucket", frozenset()): self._head_bucket,
            ("GET", "bucket", frozenset({"list-type"})): self._list_objects,
            ("POST", "bucket", frozenset({"delete"})): self._delete_objects,
            ("PUT", "object", frozenset()): self._put_object,
            ("GET", "object", frozenset()): self._get_object,
            ("HEAD", "object", frozenset()): self._get_object,
            ("DELETE", "object", frozenset()): self._delete_object,
            ("POST", "object", frozenset({"uploads"})): self._create_upload,
            ("PUT", "object", frozenset({"partNumber", "uploadId"})): self._upload_part,
            ("POST", "object", frozenset({"uploadId"})): self._complete_upload,
            ("DELETE", "object", frozenset({"uploadId"})): self._abort_upload,
        }.get((self.command, level, selected))
        if operation is None or query.get("list-type", "2") != "2":
            names = ", ".join(sorted(selected)) or "no sub-resource"
            raise _S3Error(
                501,
                "NotImplemented",
                f"this server does not support {self.command} on a {level} with {names}",
            )
        operation(bucket, key, query)

    @property
    def _store(self) -> _Directory:
        return self.server.store

    def _list_buckets(self, bucket: str, key: str, query: dict[str, str]) -> None:
        buckets: _Xml = [
            ("Bucket", [("Name", name), ("CreationDate", _iso_date(mtime))])
            for name, mtime in self._store.buckets()
        ]
        owner: _Xml = [("ID", "embedded-s3"), ("DisplayName", "embedded-s3")]
        self._reply(200, _document("ListAllMyBucketsResult", [("Owner", owner), ("Buckets", buckets)]))

    def _create_bucket(self, bucket: str, key: str, query: dict[str, str]) -> None:
        self._store.create_bucket(bucket)
        self._reply(200, headers={"Location": f"/{bucket}"})

    def _head_bucket(self, bucket: str, key: str, query: dict[str, str]) -> None:
        self._store.bucket(bucket)
        self._reply(200)

    def _list_objects(self, bucket: str, key: str, query: dict[str, str]) -> None:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        limit_text = query.get("max-keys", str(_MAX_KEYS))
        if not limit_text.isdigit():
            raise _S3Error(400, "InvalidArgument", f"max-keys {limit_text!r} is not a whole number")
        limit = min(int(limit_text), _MAX_KEYS)
        after = start_after = query.get("start-after", "")
        token = query.get("continuation-token")
        if token is not None:
            try:
                after = max(after, base64.urlsafe_b64decode(token.encode()).decode())
            except ValueError:
                raise _S3Error(400, "InvalidArgument", "the continuation token is not one of ours") from None
        contents, prefixes, last = self._store.list(bucket, prefix, delimiter, after, limit)
        encode = _url_encoded if query.get("encoding-type") == "url" else str
        result: _Xml = [("Name", bucket), ("Prefix", encode(prefix)), ("MaxKeys", limit)]
        if delimiter:
            result.append(("Delimiter", encode(delimiter)))
        if encode is _url_encoded:
            result.append(("EncodingType", "url"))
        result += [("KeyCount", len(contents) + len(prefixes)), ("IsTruncated", "true" if last else "false")]
        if token is not None:
            result.append(("ContinuationToken", token))
        if last is not None:
            result.append(("NextContinuationToken", base64.urlsafe_b64encode(last.encode()).decode()))
        if start_after:
            result.append(("StartAfter", encode(start_after)))
        for found in contents:
            fields: _Xml = [
                ("Key", encode(found.key)),
                ("LastModified", _iso_date(found.mtime)),
                ("ETag", found.etag),
                ("Size", found.size),
                ("StorageClass", "STANDARD"),
            ]
            result.append(("Contents", fields))
        result += [("CommonPrefixes", [("Prefix", encode(common))]) for common in prefixes]
        self._reply(200, _document("ListBucketResult", result))

    def _delete_objects(self, bucket: str, key: str, query: dict[str, str]) -> None:
        """DeleteObjects; the checksum botocore must send with it (CRC32 or MD5) is not checked."""
        request = self._read_xml()
        self._store.bucket(bucket)
        quiet = (request.findtext("{*}Quiet") or "").strip().lower() == "true"
        results: _Xml = []
        for item in request.iterfind("{*}Object"):
            name = item.findtext("{*}Key") or ""
            try:
                _check_key(name)
                self._store.delete(bucket, name)
            except _S3Error as error:
                results.append(("Error", [("Key", name), ("Code", error.code), ("Message", error.message)]))
            else:
                if not quiet:
                    results.append(("Deleted", [("Key", name)]))
        self._reply(200, _document("DeleteResult", results))

    def _put_object(self, bucket: str, key: str, query: dict[str, str]) -> None:
        content_type = self.headers.get("Content-Type")
        etag = self._store.put(bucket, key, self._payload, content_type, self._expected)
        self._reply(200, headers={"ETag": f'"{etag}"'})

    def _get_object(self, bucket: str, key: str, query: dict[str, str]) -> None:
        """GetObject and HeadObject, with one byte range at most."""
        stream, found = self._store.open(bucket, key)
        with stream:
            if not _matches(self.headers.get("If-Match"), found.etag):
                raise _S3Error(412, "PreconditionFailed", "the object's ETag does not match If-Match")
            span = _byte_range(self.headers.get("Range"), found.size)
            first, last = span or (0, found.size - 1)
            headers = {
                "Content-Length": str(last - first + 1),
                "Content-Type": found.content_type,
                "ETag": found.etag,
                "Last-Modified": _http_date(found.mtime),
                "Accept-Ranges": "bytes",
            }
            if span:
                headers["Content-Range"] = f"bytes {first}-{last}/{found.size}"
            self._reply(206 if span else 200, headers=headers)
            if self.command == "GET" and last >= first:
                self.connection.sendfile(stream, first, last - first + 1)

    def _delete_object(self, bucket: str, key: str, query: dict[str, str]) -> None:
        self._store.delete(bucket, key)
        self._reply(204)

    def _create_upload(self, bucket: str, key: str, query: dict[str, str]) -> None:
        upload_id = self._store.create_upload(bucket, key, self.headers.get("Content-Type"))
        result: _Xml = [("Bucket", bucket), ("Key", key), ("UploadId", upload_id)]
        self._reply(200, _document("InitiateMultipartUploadResult", result))

    def _upload_part(self, bucket: str, key: str, query: dict[str, str]) -> None:
        number = _part_number(query["partNumber"])
        etag = self._store.upload_part(bucket, key, query["uploadId"], number, self._payload, self._expected)
        self._reply(200, headers={"ETag": f'"{etag}"'})

    def _complete_upload(self, bucket: str, key: str, query: dict[str, str]) -> None:
        """CompleteMultipartUpload. An assembly that outlasts _KEEPALIVE_SECONDS commits to 200 and streams
        whitespace until the result, as S3 does; a failure after that is an Error document in a 200, which
        botocore recognises."""
        parts = [
            (_part_number(part.findtext("{*}PartNumber") or ""), (part.findtext("{*}ETag") or "").strip('" '))
            for part in self._read_xml().iterfind("{*}Part")
        ]
        since = time.monotonic()
        streaming = False

        def keep_alive() -> None:
            nonlocal since, streaming
            if time.monotonic() - since < _KEEPALIVE_SECONDS:
                return
            if streaming:
                self._chunk(b" ")
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._replied = streaming = True
                self._chunk(_DECLARATION)
            since = time.monotonic()

        try:
            etag = self._store.complete(bucket, key, query["uploadId"], parts, keep_alive)
            result: _Xml = [
                ("Location", f"http://{self.headers.get('Host', '')}/{bucket}/{quote(key)}"),
                ("Bucket", bucket),
                ("Key", key),
                ("ETag", f'"{etag}"'),
            ]
            body = _document("CompleteMultipartUploadResult", result)
        except Exception as error:
            if not streaming or isinstance(error, ConnectionError):
                raise
            failure = _as_s3_error(error)
            body = _document("Error", [("Code", failure.code), ("Message", failure.message)])
        if streaming:
            self._chunk(body)
            self._chunk(b"")
        else:
            self._reply(200, body)

    def _abort_upload(self, bucket: str, key: str, query: dict[str, str]) -> None:
        self._store.abort(bucket, key, query["uploadId"])
        self._reply(204)

    def _read_xml(self) -> ET.Element:
        data = bytearray()
        while block := self._payload.read(_BLOCK):
            data += block
            if len(data) > _XML_LIMIT:
                raise _S3Error(400, "MalformedXML", "the XML request body is too large")
        try:
            return ET.fromstring(bytes(data))
        except ET.ParseError:
            raise _S3Error(400, "MalformedXML", "the request body is not well-formed XML") from None

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """Sends a whole response; a body is always an XML document, declared here."""
        all_headers = dict(headers or {})
        if body:
            body = _DECLARATION + body
            all_headers.setdefault("Content-Type", "application/xml")
        if status != 204:
            all_headers.setdefault("Content-Length", str(len(body)))
        self.send_response(status)
        for name, value in all_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._replied = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, error: _S3Error) -> None:
        if self._replied:  # too late for a status: closing tells the client the response is cut short
            self.close_connection = True
            return
        body = b""
        if self.command != "HEAD":  # as in S3, HEAD errors carry only their status
            fields: _Xml = [("Code", error.code), ("Message", error.message), ("Resource", self._resource)]
            body = _document("Error", fields)
        self._reply(error.status, body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


class _Server(ThreadingHTTPServer):
    """Knows its store, and its open connections so that stopping can cut them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: _Directory) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.store = store
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Only connection failures get here (requests' own errors become responses): not worth a traceback.
        logger.debug("embedded S3: connection from %s failed", client_address, exc_info=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall for seconds on a bad resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class EmbeddedS3:
    """An S3-compatible endpoint backed by ``root``: its top-level folders are buckets, their files objects.

    For loopback only: it checks no signatures, so anyone who can reach it can read and write ``root``.
    Clients must use path-style addressing (boto3 does for an IP endpoint). ``root`` is created if missing.
    """

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).absolute()
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The URL for clients' ``endpoint_url``, such as ``http://127.0.0.1:PORT``."""
        if self._server is None:
            raise RuntimeError("the embedded S3 server is not running")
        host, port = self._server.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def start(self) -> EmbeddedS3:
        """Binds (port 0: a free port) and serves from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the embedded S3 server is already running")
        self._server = _Server(self._address, _Directory(self.root))
        self._thread = threading.Thread(target=self._server.serve_forever, name="embedded-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and cuts keep-alive connections, so no request is served afterwards."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        with server.connections_lock:
            for connection in server.connections:
                with suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        server.server_close()
        thread.join()

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

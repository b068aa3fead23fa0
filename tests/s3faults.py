"""A fault-injecting S3 reverse proxy on loopback, for tests: clients talk to it instead of the S3 server.

Each request is matched against :class:`Rule` objects (S3 operation, method, a pattern on the path and
query, every Nth match, a probability drawn from a seeded RNG, a cap on how often it fires); the first
rule that fires decides the request's fate:

- ``internal_error``: 500 InternalError with S3's XML error body (the request is never forwarded);
- ``slow_down``: 503 SlowDown, S3's throttling reply (not forwarded);
- ``reset``: reads part of the request body (``fraction`` of it: mid-upload), then resets the TCP
  connection (RST, not a clean close); a request without a body is reset after its headers;
- ``truncate``: forwards the request, sends the response headers and part of the body, then resets
  (a download cut off in the middle); only successful (2xx) replies unless ``any_status``;
- ``delay``: waits ``seconds`` before forwarding (a slow or, past the client's read timeout, hung store).

Everything else is forwarded unchanged (the ``Host`` header too, so SigV4 signatures stay valid), and
every request and fault is counted for the test's report (:meth:`FaultProxy.report`).

Written by hand on the standard library's ``http.server``, since no installed library does this:
moto injects no faults, toxiproxy (a Go binary, not installed) cuts TCP streams without knowing which
S3 operation they carry, and mitmproxy is not a dependency. aiohttp is installed and could host it,
but with an event loop in a thread for what plain synchronous handlers do here, and a reset needs
the raw socket (SO_LINGER 0), which ``http.server`` hands over directly.
"""

from __future__ import annotations

import dataclasses
import http.client
import random
import re
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

FaultKind = Literal["internal_error", "slow_down", "reset", "truncate", "delay"]
FAULT_KINDS: tuple[FaultKind, ...] = ("internal_error", "slow_down", "reset", "truncate", "delay")

# Per RFC 9110 these describe one connection, not the message: never forwarded either way.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
    | {"expect"}  # the proxy answers 100-continue itself, and forwards whole bodies
)
_ERRORS = {
    "internal_error": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "slow_down": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


def s3_operation(method: str, target: str) -> str:
    """The S3 API operation a path-style request is, from its method and query (enough for rules)."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    has_key = "/" in parts.path.strip("/")
    if "uploadId" in query:
        return {
            "PUT": "UploadPart",
            "POST": "CompleteMultipartUpload",
            "DELETE": "AbortMultipartUpload",
            "GET": "ListParts",
        }.get(method, method)
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        return "DeleteObjects" if "delete" in query else method
    if method == "GET":
        return "GetObject" if has_key else "ListObjects" if "list-type" not in query else "ListObjectsV2"
    if method == "HEAD":
        return "HeadObject" if has_key else "HeadBucket"
    if method == "PUT":
        return "PutObject" if has_key else "CreateBucket"
    if method == "DELETE":
        return "DeleteObject" if has_key else "DeleteBucket"
    return method


@dataclass
class Rule:
    """Which requests get ``fault``; every given condition must hold. Counters are the proxy's."""

    fault: FaultKind
    operation: str | None = None  # e.g. "UploadPart", "GetObject" (see s3_operation)
    method: str | None = None
    pattern: str | None = None  # a regular expression searched in the path and query ("partNumber=")
    every: int = 1  # fires on every Nth request that matches the conditions above
    probability: float = 1.0  # then fires with this probability (the proxy's seeded RNG)
    times: int | None = None  # fires at most this often
    fraction: float = 0.5  # reset/truncate: how much of the request/response body goes through first
    seconds: float = 0.0  # delay
    any_status: bool = False  # truncate error replies (a 404's XML body) too
    matched: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.fault not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(FAULT_KINDS)}")
        if self.every < 1 or not 0.0 <= self.probability <= 1.0 or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"{self}: every >= 1 and probability, fraction in [0, 1]")

    def _matches(self, method: str, operation: str, target: str) -> bool:
        return (
            (self.operation is None or self.operation == operation)
            and (self.method is None or self.method == method)
            and (self.pattern is None or re.search(self.pattern, target) is not None)
        )


@dataclass(frozen=True)
class Report:
    """What went through the proxy: requests per operation, faults per kind and per operation."""

    requests: int
    operations: dict[str, int]
    faults: dict[str, int]
    by_operation: dict[str, dict[str, int]]  # operation -> fault kind -> count
    bytes_got: dict[str, int]  # /bucket/key -> body bytes GetObject sent (ranged reads add up)

    @property
    def injected(self) -> int:
        return sum(self.faults.values())

    @property
    def faulted_operations(self) -> dict[str, int]:
        return {operation: sum(kinds.values()) for operation, kinds in self.by_operation.items()}

    def __str__(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items())) or "none"
        return f"{self.requests} requests, {self.injected} faults injected ({kinds})"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that give up on a reset or slow connection are part of the test, not an error."""


class _Reset(Exception):
    """Ends a request by resetting its connection."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's pool expects; also answers 100-continue
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the report counts requests."""

    def _serve(self) -> None:
        proxy = self.server.proxy
        method, target = self.command, self.path
        operation = s3_operation(method, target)
        rule = proxy._choose(method, operation, target)
        try:
            if rule is not None and rule.fault == "reset":
                self._read_body(rule.fraction)
                raise _Reset
            body = self._read_body(1.0)
            if rule is not None and rule.fault in _ERRORS:
                self._send_error(rule.fault, urlsplit(target).path)
                return
            # A long "hang" ends when the proxy stops, with a reset rather than a late request.
            if rule is not None and rule.fault == "delay" and proxy._stopping.wait(rule.seconds):
                raise _Reset
            status, reason, headers, data = proxy._forward(method, target, self.headers.items(), body)
            self.send_response_only(status, reason)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and (method == "HEAD" or name.lower() != "content-length"):
                    self.send_header(name, value)
            if method != "HEAD" and status not in (204, 304):
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method == "HEAD" or status in (204, 304):
                return
            if rule is not None and rule.fault == "truncate" and (rule.any_status or status < 300):
                self.wfile.write(data[: int(len(data) * rule.fraction)])
                self.wfile.flush()
                raise _Reset
            self.wfile.write(data)
            if operation == "GetObject" and status < 300:
                with proxy._lock:
                    proxy._bytes_got[urlsplit(target).path] += len(data)
        except _Reset:
            self._reset()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    def _read_body(self, fraction: float) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked() if fraction >= 1.0 else self.rfile.read1(65536)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if fraction >= 1.0 else int(length * fraction))

    def _read_chunked(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)

    def _send_error(self, fault: str, resource: str) -> None:
        status, reason, code, message = _ERRORS[fault]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        if fault == "slow_down":
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """SO_LINGER 0 makes close() send RST: the client sees "connection reset", not a clean end."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


class FaultProxy:
    """A reverse proxy on ``127.0.0.1`` (a port the OS picks) in front of ``upstream``, in a thread."""

    def __init__(self, upstream: str, rules: list[Rule] | None = None, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"{upstream!r} is not an http://host:port endpoint")
        self._upstream = (parts.hostname, parts.port)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._rules = [dataclasses.replace(rule) for rule in rules or []]
        self._random = random.Random(seed)
        self._operations: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._faulted: Counter[tuple[str, str]] = Counter()
        self._bytes_got: Counter[str] = Counter()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def set_rules(self, rules: list[Rule]) -> None:
        """Replaces the rules (copies, whose counters start at 0); the proxy's totals keep counting."""
        with self._lock:
            self._rules = [dataclasses.replace(rule) for rule in rules]

    def report(self) -> Report:
        with self._lock:
            return Report(
                requests=sum(self._operations.values()),
                operations=dict(self._operations),
                faults=dict(self._faults),
                by_operation=_nest(self._faulted),
                bytes_got=dict(self._bytes_got),
            )

    def _choose(self, method: str, operation: str, target: str) -> Rule | None:
        with self._lock:
            self._operations[operation] += 1
            for rule in self._rules:
                if not rule._matches(method, operation, target):
                    continue
                rule.matched += 1
                if rule.matched % rule.every or (rule.times is not None and rule.fired >= rule.times):
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                rule.fired += 1
                self._faults[rule.fault] += 1
                self._faulted[operation, rule.fault] += 1
                return rule
        return None

    def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=120)
        try:
            connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    connection.putheader(name, value)
            if body or method in ("PUT", "POST"):
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body or None)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()


def _nest(counts: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    nested: dict[str, dict[str, int]] = {}
    for (operation, kind), count in sorted(counts.items()):
        nested.setdefault(operation, {})[kind] = count
    return nested


@contextmanager
def fault_proxy(upstream: str, rules: list[Rule] | None = None, seed: int = 0) -> Iterator[FaultProxy]:
    """A running :class:`FaultProxy` for the ``with`` block."""
    proxy = FaultProxy(upstream, rules, seed).start()
    try:
        yield proxy
    finally:
        proxy.stop()

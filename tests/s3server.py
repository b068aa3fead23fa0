"""A real S3 endpoint for tests: moto in server mode on loopback, spoken to over HTTP by boto3.

In-process ``mock_aws`` patching would not reach a trainer subprocess and would skip the HTTP layer
(signing, path-style URLs, multipart, retries) that S3-compatible stores exercise. Moto keeps its
buckets in process-wide state, so two servers in one process share them: tests should use their
own bucket names, and the server wipes moto's state when it stops.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from moto.moto_server.threaded_moto_server import ThreadedMotoServer

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT

    def _control(self, action: str, body: bytes = b"") -> None:
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/{action}",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    @contextmanager
    def require_authentication(self) -> Iterator[None]:
        """Makes moto check credentials (it accepts any by default): unknown keys get 403s."""
        self._control("reset-auth", b"0")
        try:
            yield
        finally:
            self._control("reset-auth", b"inf")


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Starts moto on a free loopback port; changes no environment variable."""
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    server = S3Server(f"http://{host}:{port}")
    try:
        yield server
    finally:
        try:
            server._control("reset")
        finally:
            moto.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for a trainer subprocess: fake credentials, no config files, no instance metadata.

    The endpoint itself travels in the trainer's config (``storage.endpoint``); it is a parameter here so
    callers cannot build this environment without a test server at hand. Merge it over an environment
    without other ``AWS_*`` variables (a session token or profile from the developer's shell would leak in).
    """
    assert endpoint.startswith("http://127.0.0.1:"), f"{endpoint} is not a loopback test server"
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }

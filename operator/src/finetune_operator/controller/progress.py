"""Polls global rank 0's /progress while a job runs: the trainer needs no Kubernetes permissions.

Each job is polled at most every ``interval`` seconds, and all jobs together at most ``rate`` times a
second (a token bucket), so that a thousand running jobs neither hammer their pods nor flood the API
server with status patches (the reconciler patches only what changed). An unreachable endpoint is
not an error: the job may be loading its model, or between restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from finetune_trainer.config import PROGRESS_PORT

logger = logging.getLogger(__name__)


class RateLimiter:
    """A token bucket shared by every job's polls."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class ProgressPoller:
    def __init__(
        self, interval: float = 10.0, rate: float = 50.0, timeout: float = 2.0, port: int = PROGRESS_PORT
    ):
        self.interval = interval
        self.port = port
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._limiter = RateLimiter(rate, burst=max(1, int(rate)))
        self._last: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def forget(self, key: tuple[str, str]) -> None:
        self._last.pop(key, None)

    async def fetch(self, key: tuple[str, str], pod_ip: str) -> dict[str, Any] | None:
        """The newest /progress document of a job, fetched again only once ``interval`` has passed."""
        fetched_at, document = self._last.get(key, (0.0, None))
        if time.monotonic() - fetched_at < self.interval:
            return document
        await self._limiter.acquire()
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"http://{pod_ip}:{self.port}/progress"
        try:
            async with self._session.get(url) as response:
                fresh = await response.json(content_type=None) if response.status in (200, 503) else None
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            logger.debug("progress of %s/%s not reachable at %s: %s", *key, url, error)
            fresh = None
        document = fresh if isinstance(fresh, dict) else document
        self._last[key] = (time.monotonic(), document)
        return document

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

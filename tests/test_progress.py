"""The operator's poll budget: a token bucket shared by every job."""

from __future__ import annotations

import pytest
from finetune_operator.controller import progress
from finetune_operator.controller.progress import RateLimiter


@pytest.mark.asyncio
async def test_rate_limiter_spaces_polls_after_the_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress.asyncio, "sleep", sleep)
    limiter = RateLimiter(rate=2.0, burst=2)
    for _ in range(5):
        await limiter.acquire()
    assert sleeps == [0.5, 0.5, 0.5]  # two at once, then one every half second

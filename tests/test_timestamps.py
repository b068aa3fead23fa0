"""Kubernetes timestamps: what the operator writes it must read back unchanged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from finetune_operator.api.timestamps import format_time, parse_time


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        pytest.param(datetime(2026, 11, 21, 12, 0, 5, tzinfo=UTC), "2026-11-21T12:00:05Z", id="utc"),
        pytest.param(
            datetime(2026, 11, 21, 14, 0, 5, 999_999, tzinfo=timezone(timedelta(hours=2))),
            "2026-11-21T12:00:05Z",
            id="other-zone-to-utc-whole-seconds",
        ),
    ],
)
def test_format_time(moment: datetime, text: str) -> None:
    assert format_time(moment) == text
    assert parse_time(text) == moment.replace(microsecond=0)


@pytest.mark.parametrize("text", [None, ""])
def test_absent_timestamps_parse_to_none(text: str | None) -> None:
    assert parse_time(text) is None

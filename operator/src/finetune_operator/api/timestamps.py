"""Timestamps as Kubernetes writes them (RFC 3339, whole seconds, UTC, 'Z'), in one place.

Status fields, conditions and metadata all use this form; a status the operator writes must compare
equal to the one it reads back, so formatting and parsing have to agree exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime

RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def format_time(moment: datetime) -> str:
    """The moment in UTC, to the second."""
    return moment.astimezone(UTC).strftime(RFC3339)


def parse_time(text: str | None) -> datetime | None:
    """The moment a Kubernetes timestamp names; None for an absent or empty one."""
    if not text:
        return None
    return datetime.strptime(text, RFC3339).replace(tzinfo=UTC)

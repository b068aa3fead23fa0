"""Errors that no restart can fix: the trainer exits with the reserved code and says why."""

from __future__ import annotations


class NonRetryableError(Exception):
    """Bad data, bad configuration, a missing object: the operator fails the job at once."""

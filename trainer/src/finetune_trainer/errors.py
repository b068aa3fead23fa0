"""The two kinds of failure a rank reports: those no restart can fix, and those a restart may."""

from __future__ import annotations


class NonRetryableError(Exception):
    """Bad data, bad configuration, a missing object: the operator fails the job at once.

    ``reason`` names the failure for the FinetuneJob's conditions where the exit class alone does not
    (e.g. summary.NON_FINITE_LOSS)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class RetryableError(Exception):
    """A failure with a name (``reason``) after which the gang restarts from the newest checkpoint."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class PeerFailedError(RuntimeError):
    """This rank learned in a collective that another one failed: an echo, not a cause."""

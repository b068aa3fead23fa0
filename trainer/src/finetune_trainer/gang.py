"""One rank's bond with its gang: a failure anywhere ends every rank within seconds, a stop ends within
its grace period, and a stalled run is noticed instead of waiting out the process-group timeout.

Why the process group alone does not do it: a rank that fails between collectives leaves the others
waiting in one until the timeout (30 minutes), and a rank blocked inside a gloo or NCCL call never
returns to Python, so no Python signal handler runs there. No library covers it for torchrun and
DeepSpeed: torchelastic restarts a node when one of its ranks exits but cannot unblock the ranks of
other nodes, and the NCCL watchdog acts only at the process-group timeout. So every rank runs a
watchdog thread that

- learns of SIGTERM and SIGINT through the signal wakeup fd, which the interpreter's C-level handler
  writes even while the main thread sits in a collective; a stop before training began ends the rank
  at once (there is nothing to checkpoint), a stop that overruns ``STOP_GRACE_SECONDS`` ends it then;
- polls the job's abort mark in the c10d store (the TCPStore that torchrun's agent hosts, which
  outlives any rank): the first rank to fail writes its summary there (compare-and-set, so the first
  cause wins), and every other rank, wherever it is blocked, leaves a summary naming that cause and
  exits with the same exit class;
- ends the rank with reason Stalled when no optimizer step came within the stall timeout, after
  writing every thread's stack to the log.

Each rank leaves its summary in ``<workspace>/summaries/rank-<N>.json``; the launcher merges its node's
into the pod's termination message. Every exit here is ``os._exit``: no finalizer, atexit hook or
destructor may block in a collective on the way out.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from finetune_trainer.errors import PeerFailedError
from finetune_trainer.summary import (
    STALLED,
    TerminationSummary,
    parse_termination_message,
    write_rank_summary,
)

logger = logging.getLogger(__name__)

ABORT_KEY = "finetune/abort"
# How often the watchdog looks at signals, the abort mark and the stall clock.
POLL_SECONDS = 1.0
# The derived stall timeout: this many times the slowest step seen, and never less than the floor.
STALL_STEP_MULTIPLE = 10
STALL_FLOOR_SECONDS = 600.0
# Store errors in a row after which the gang counts as gone (torchrun's agent on node 0 has ended).
STORE_FAILURES_TO_GIVE_UP = 3
# What a failing collective says when a peer process ended: not a cause, only its echo.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator")
# How long an echo waits for the cause's own mark before it marks itself (the cause was killed).
ECHO_WAIT_SECONDS = 5.0


def is_peer_gone(error: BaseException) -> bool:
    """True when ``error`` only says that another rank failed or went away (its own summary says why)."""
    return isinstance(error, PeerFailedError) or any(text in str(error) for text in PEER_GONE)


class Gang:
    """The watchdog and the abort mark of one rank; see the module docstring."""

    def __init__(
        self,
        rank: int,
        summary_dir: Path,
        stop_grace_seconds: float,
        stall_timeout_seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = rank
        self.summary_dir = summary_dir
        self.stop_grace_seconds = stop_grace_seconds
        self.stall_timeout_seconds = stall_timeout_seconds
        self.clock = clock
        self.stop = threading.Event()
        self._stop_at: float | None = None
        self._store: Any = None
        self._store_failures = 0
        self._began = False
        self._stall_armed = False
        self._last_beat: float | None = None
        self._slowest_step = 0.0
        self._exiting = threading.Lock()
        self._wakeup_read: socket.socket | None = None

    # --- wiring -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Main thread only: SIGTERM and SIGINT request a stop; the watchdog thread starts."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup_read = reader
        self._wakeup_write = writer  # kept open for the process's lifetime
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="gang-watchdog", daemon=True).start()

    def attach_store(self, store: Any) -> None:
        """A client of the job's rendezvous store (training_support.gang_store), where the abort mark
        lives; None leaves this rank to the process group alone."""
        self._store = store

    def stop_requested(self) -> bool:
        return self.stop.is_set()

    def training_started(self) -> None:
        """From here a stop saves a checkpoint first, and the stall clock runs from the first step."""
        self._began = self._stall_armed = True

    def training_finished(self) -> None:
        """The final evaluation and outputs take as long as they take: no stall clock there."""
        self._stall_armed = False
        self._last_beat = None

    def beat(self) -> None:
        """Progress (an optimizer step, an evaluation batch, a checkpoint saved): the stall clock restarts."""
        now = self.clock()
        if self._last_beat is not None:
            self._slowest_step = max(self._slowest_step, now - self._last_beat)
        self._last_beat = now

    def stall_timeout(self) -> float | None:
        """The configured timeout, or one derived from the slowest step seen so far."""
        if self.stall_timeout_seconds is not None:
            return self.stall_timeout_seconds
        if self._slowest_step == 0.0:
            return None
        return max(STALL_FLOOR_SECONDS, STALL_STEP_MULTIPLE * self._slowest_step)

    # --- ending -----------------------------------------------------------------------------------

    def fail(self, summary: TerminationSummary, *, echo: bool = False) -> NoReturn:
        """Ends this rank for ``summary`` (a failure), marking it as the gang's cause unless another
        rank's failure came first; ``echo``: the error only says that a peer went away."""
        own = summary.model_copy(update={"rank": self.rank, "collateral": echo})
        cause = self._read_mark()
        deadline = self.clock() + ECHO_WAIT_SECONDS
        while echo and cause is None and self.clock() < deadline:  # the cause's own mark is on its way
            time.sleep(0.1)
            cause = self._read_mark()
        if cause is None and self._mark(own):
            self._exit(own)
        cause = cause or self._read_mark()
        self._exit(self._collateral(cause) if cause is not None and cause.rank != self.rank else own)

    def finish(self, summary: TerminationSummary) -> NoReturn:
        """Ends this rank after a run that succeeded or stopped, its summary left for the launcher.

        Through ``os._exit`` too: at interpreter shutdown the process group's and the store's C++
        threads can be destroyed while still joinable, which aborts a finished run (SIGABRT)."""
        self._exit(summary.model_copy(update={"rank": self.rank}))

    def _exit(self, summary: TerminationSummary) -> NoReturn:
        with self._exiting:  # one way out, whichever thread gets here first
            write_rank_summary(self.summary_dir, self.rank, summary)
            logging.shutdown()
            sys.stderr.flush()
            os._exit(summary.exit_code())

    def _collateral(self, cause: TerminationSummary) -> TerminationSummary:
        where = "" if cause.rank is None else f"rank {cause.rank} failed: "
        return cause.model_copy(update={"collateral": True, "error": where + cause.error})

    # --- the abort mark ---------------------------------------------------------------------------

    def _mark(self, summary: TerminationSummary) -> bool:
        """True when this rank's summary became the gang's cause (no other was there first)."""
        if self._store is None:
            return True
        text = summary.to_message()
        try:
            stored = self._store.compare_set(ABORT_KEY, "", text)
        except Exception as error:  # the store's node is gone: nobody is left to tell
            logger.warning("cannot mark the gang as failed: %s", error)
            return True
        return bytes(stored).decode() == text

    def _read_mark(self) -> TerminationSummary | None:
        if self._store is None:
            return None
        try:
            if not self._store.check([ABORT_KEY]):
                self._store_failures = 0
                return None
            text = bytes(self._store.get(ABORT_KEY)).decode()
        except Exception:
            self._store_failures += 1
            return None
        self._store_failures = 0
        cause = parse_termination_message(text)
        # A mark that does not parse still means the gang is failing.
        return cause or TerminationSummary(outcome="failed", error="another rank failed; see its log")

    # --- the watchdog -----------------------------------------------------------------------------

    def _watch(self) -> None:
        assert self._wakeup_read is not None
        while True:
            readable, _, _ = select.select([self._wakeup_read], [], [], POLL_SECONDS)
            try:
                if readable:
                    with contextlib.suppress(BlockingIOError):
                        if any(s in (signal.SIGTERM, signal.SIGINT) for s in self._wakeup_read.recv(64)):
                            self._on_stop()
                self._check(self.clock())
            except Exception:  # the watchdog must outlive anything it trips over
                logger.exception("gang watchdog: unexpected error (it keeps watching)")

    def _on_stop(self) -> None:
        self.stop.set()
        if self._stop_at is None:
            self._stop_at = self.clock()
            logger.info("stop requested: saving a checkpoint within %.0fs", self.stop_grace_seconds)

    def _check(self, now: float) -> None:
        if self._stop_at is not None:
            if not self._began:
                self._exit(self._stopped("stopped before training began: nothing to checkpoint"))
            grace = self.stop_grace_seconds
            if now - self._stop_at > grace:
                self._dump_stacks(f"the stop did not finish within {grace:.0f}s")
                self._exit(
                    self._stopped(f"ended {grace:.0f}s after the stop, before its checkpoint finished")
                )
        cause = self._read_mark()
        if cause is not None and cause.rank != self.rank:
            logger.error("rank %s failed (%s): ending this rank too", cause.rank, cause.error)
            if cause.reason == STALLED:
                self._dump_stacks("the gang stalled")
            self._exit(self._collateral(cause))
        if self._store_failures >= STORE_FAILURES_TO_GIVE_UP:
            self._exit(
                TerminationSummary(
                    outcome="failed",
                    collateral=True,
                    error="lost the job's rendezvous store: worker 0's node ended (see its log)",
                )
            )
        timeout = self.stall_timeout()
        quiet = now - self._last_beat if self._last_beat is not None else 0.0
        if self._stall_armed and timeout is not None and quiet > timeout:
            self._dump_stacks(f"no progress for {quiet:.0f}s")
            self.fail(
                TerminationSummary(
                    outcome="failed",
                    reason=STALLED,
                    error=f"rank {self.rank} made no optimizer step for {quiet:.0f}s (stall timeout "
                    f"{timeout:.0f}s); every rank's stack is in its log",
                )
            )

    def _stopped(self, error: str) -> TerminationSummary:
        return TerminationSummary(outcome="stopped", error=error, rank=self.rank)

    def _dump_stacks(self, why: str) -> None:
        logger.error("rank %d: %s; the stacks of its threads follow", self.rank, why)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

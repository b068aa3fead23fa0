"""Samples the proportional set size (PSS) of every process in a tree, per pid, with timestamps.

PSS (``Pss:`` in ``/proc/<pid>/smaps_rollup``) charges each page shared between processes to them in
equal parts, so the sum over a tree counts a page read by two ranks (a hard-linked model file in the
page cache mapped by both, torch's shared libraries) once, where RSS would count it twice. Linux only.
Used by ``benchmarks/memory.py`` and by tests that bound a rank's memory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")


def pss_bytes(pid: int) -> int | None:
    """The process's PSS in bytes, or None when it is gone or unreadable (a zombie has no mappings)."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def parents() -> dict[int, int]:
    """Every process's parent pid, from /proc/<pid>/stat (the field after the parenthesised name)."""
    found: dict[int, int] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    return found


def tree(root: int, parent_of: dict[int, int] | None = None) -> list[int]:
    """``root`` and every process below it."""
    parent_of = parents() if parent_of is None else parent_of
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier += children.get(pid, [])
    return found


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" when gone)."""
    try:
        return (
            (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        )
    except OSError:
        return ""


@dataclass(frozen=True)
class Sample:
    """One sweep over the tree: ``time`` (time.monotonic()) and each live process's PSS in bytes."""

    time: float
    pss: dict[int, int]
    parent: dict[int, int]


@dataclass
class TreeSampler:
    """Samples ``root``'s tree every ``interval`` seconds in a thread, from ``start()`` to ``stop()``
    (or as a context manager). ``on_sample`` runs after each sweep in the sampler's thread (e.g. to
    note phase boundaries from a log at the same instant). Command lines are read once per new pid."""

    root: int
    interval: float = 0.1
    on_sample: Callable[[Sample], None] | None = None
    samples: list[Sample] = field(default_factory=list)
    cmdlines: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> Sample:
        parent_of = parents()
        pids = tree(self.root, parent_of)
        pss = {pid: value for pid in pids if (value := pss_bytes(pid)) is not None}
        for pid in pss:
            if pid not in self.cmdlines:
                self.cmdlines[pid] = cmdline(pid)
        taken = Sample(time.monotonic(), pss, {pid: parent_of.get(pid, 0) for pid in pss})
        self.samples.append(taken)
        if self.on_sample is not None:
            self.on_sample(taken)
        return taken

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def start(self) -> TreeSampler:
        self._thread = threading.Thread(target=self._loop, name="pss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> TreeSampler:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def matching(self, needle: str) -> list[int]:
        """The sampled pids whose command line contains ``needle``, in order of first appearance."""
        return [pid for pid, line in self.cmdlines.items() if needle in line]

    def owned_pss(self, sample: Sample, owner: int) -> int:
        """``owner``'s PSS plus that of its descendants in ``sample`` (e.g. a compiler a rank started)."""
        total = 0
        for pid, value in sample.pss.items():
            walk = pid
            while walk and walk != owner:
                walk = sample.parent.get(walk, 0)
            if walk == owner:
                total += value
        return total

    def peak(self, owner: int, since: float = float("-inf"), until: float = float("inf")) -> int:
        """The highest PSS of ``owner``'s subtree among the samples taken in [since, until]."""
        return max(
            (self.owned_pss(s, owner) for s in self.samples if since <= s.time <= until),
            default=0,
        )

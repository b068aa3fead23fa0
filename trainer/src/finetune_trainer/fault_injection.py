"""Named points in the trainer where tests make one rank fail, hang or die, to prove the gang ends.

Inert unless ``FINETUNE_TRAINER_FAULTS`` is set, which only tests and fault drills do. Its value is a
``;``-separated list of ``site:rank:action[:step]``: at ``site`` (one of SITES), on global rank
``rank``, from optimizer step ``step`` on (any step when left out), do ``action``:

- ``raise``: a retryable error (InjectedFault), as a lost connection or a failed upload would;
- ``fatal``: a non-retryable error, as bad data would;
- ``hang``: block forever, as a rank stuck in a driver call or a deadlock would;
- ``kill``: SIGKILL the rank itself, as the OOM killer would;
- ``nan``: (site ``step`` only) the caller fills a trainable weight with NaN, as a numerical blow-up
  would, so the real detection path sees a non-finite loss.

Each fault fires once per process: a resumed run (a new process) meets it again only if the test asks.
"""

from __future__ import annotations

import math
import os
import signal
import threading

import torch

from finetune_trainer.errors import NonRetryableError

FAULTS = "FINETUNE_TRAINER_FAULTS"
# Every point the trainer passes, in the order a run meets them; each sits before or inside a collective.
SITES = (
    "before-rendezvous",
    "fetch",
    "engine",
    "resume",
    "step",
    "log",
    "evaluate",
    "checkpoint-save",
    "checkpoint-upload",
    "checkpoint-finish",
    "stop-check",
    "outputs",
)
# The sites that know the step: a fault there waits for its step; elsewhere it fires the first time.
STEPPED_SITES = frozenset(SITES[SITES.index("step") : SITES.index("stop-check") + 1])
ACTIONS = ("raise", "fatal", "hang", "kill", "nan")

_fired: set[str] = set()


class InjectedFault(RuntimeError):
    """The retryable failure a test asked for."""


def fault_point(site: str, step: int = 0) -> bool:
    """Does what ``FINETUNE_TRAINER_FAULTS`` asks for at ``site`` on this rank, if anything; True when
    the caller is to poison its weights (action ``nan``)."""
    spec = os.environ.get(FAULTS)
    if not spec:
        return False
    assert site in SITES, site
    rank = os.environ.get("RANK", "0")
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        where, on_rank, action, *at_step = entry.split(":")
        if where != site or on_rank != rank or entry in _fired or (at_step and step < int(at_step[0])):
            continue
        _fired.add(entry)
        if action == "raise":
            raise InjectedFault(f"injected fault at {site} on rank {rank}")
        if action == "fatal":
            raise NonRetryableError(f"injected non-retryable fault at {site} on rank {rank}")
        if action == "hang":
            threading.Event().wait()
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "nan":
            return True
        raise ValueError(f"{FAULTS}: unknown action {action!r} in {entry!r}; one of {', '.join(ACTIONS)}")
    return False


def poison(module: torch.nn.Module) -> None:
    """Fills the first trainable weight with NaN (action ``nan``)."""
    with torch.no_grad():
        next(p for p in module.parameters() if p.requires_grad).fill_(math.nan)

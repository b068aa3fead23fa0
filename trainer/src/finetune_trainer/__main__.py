"""``python -m finetune_trainer --config FILE``: one rank of a fine-tuning run.

Exit codes: 0 done, STOPPED_EXIT_CODE when SIGTERM or SIGINT stopped it (after a checkpoint once
training has begun), NON_RETRYABLE_EXIT_CODE for errors no restart can fix, 1 for anything else. A
failing rank ends at once and so does every other rank of the gang (see gang.py); each leaves its
summary for the node's launcher.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from finetune_trainer.config import load_trainer_config
from finetune_trainer.gang import Gang, is_peer_gone
from finetune_trainer.summary import TerminationSummary, finite_metrics
from finetune_trainer.worker_env import (
    DEFAULT_STOP_GRACE_SECONDS,
    DEFAULT_WORKSPACE,
    FINETUNE_WORKSPACE,
    STOP_GRACE_SECONDS,
)

logger = logging.getLogger("finetune_trainer")


def _configure_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer")
    parser.add_argument("--config", required=True, help="the trainer configuration (JSON) the operator wrote")
    args = parser.parse_args(argv)
    _configure_logging()
    rank = int(os.environ.get("RANK", "0"))
    workspace = Path(os.environ.get(FINETUNE_WORKSPACE, DEFAULT_WORKSPACE))
    grace = int(os.environ.get(STOP_GRACE_SECONDS, DEFAULT_STOP_GRACE_SECONDS))
    try:
        config = load_trainer_config(args.config)
    except (OSError, ValueError) as error:
        gang = Gang(rank, workspace / "summaries", grace, None)
        gang.fail(TerminationSummary(outcome="failed", retryable=False, error=f"bad configuration: {error}"))
    gang = Gang(rank, workspace / "summaries", grace, config.run_policy.stall_timeout_seconds)
    gang.start()
    # Imported here: the heavy stack (torch, deepspeed) loads only once the configuration is valid.
    from finetune_trainer.errors import NonRetryableError
    from finetune_trainer.recipe import run
    from finetune_trainer.training_support import NonRetryableFailures

    try:
        result = run(config, gang)
    except NonRetryableFailures as error:
        logger.error("%s", error)
        message = str(error) if isinstance(error, NonRetryableError) else f"{type(error).__name__}: {error}"
        reason = getattr(error, "reason", "")
        gang.fail(TerminationSummary(outcome="failed", retryable=False, error=message, reason=reason))
    except Exception as error:
        logger.error("training failed:\n%s", traceback.format_exc())
        summary = TerminationSummary(
            outcome="failed", error=f"{type(error).__name__}: {error}", reason=getattr(error, "reason", "")
        )
        gang.fail(summary, echo=is_peer_gone(error))
    metrics, notes = finite_metrics(result.metrics)
    summary = TerminationSummary(
        outcome=result.outcome,
        metrics=metrics,
        notes=notes,
        output_model=result.output_model,
        step=result.step,
    )
    gang.finish(summary)


if __name__ == "__main__":
    main()

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

from finetune_trainer.config import TrainerConfig, load_trainer_config
from finetune_trainer.gang import Gang, is_peer_gone
from finetune_trainer.summary import TerminationSummary, finite_metrics, rank_log_path
from finetune_trainer.worker_env import (
    DEFAULT_STOP_GRACE_SECONDS,
    DEFAULT_WORKSPACE,
    FINETUNE_WORKSPACE,
    STOP_GRACE_SECONDS,
)

logger = logging.getLogger("finetune_trainer")


def _configure_logging(rank: int, workspace: Path) -> None:
    """Every record to stderr (the pod's log) and to this rank's file in the workspace, which goes to the
    output with the results (``<output>/logs/rank-<N>.log``); a file that cannot be opened is skipped."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = rank_log_path(workspace, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w", encoding="utf-8"))
    except OSError as error:
        print(f"rank {rank}: cannot write its log file {path}: {error}", file=sys.stderr)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
    )


def _upload_log(config: TrainerConfig, rank: int, workspace: Path, brief: bool) -> None:
    """Best effort (outputs.upload_log), ``brief`` after a failure or a stop. Only a rank's own failure
    gets its log there for sure: another rank's failure ends this one wherever it is."""
    from finetune_trainer.outputs import LOG_UPLOAD_BRIEFLY_SECONDS, LOG_UPLOAD_SECONDS, upload_log

    path = rank_log_path(workspace, rank)
    if path.is_file():
        upload_log(config, rank, path, LOG_UPLOAD_BRIEFLY_SECONDS if brief else LOG_UPLOAD_SECONDS)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer")
    parser.add_argument("--config", required=True, help="the trainer configuration (JSON) the operator wrote")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    workspace = Path(os.environ.get(FINETUNE_WORKSPACE, DEFAULT_WORKSPACE))
    _configure_logging(rank, workspace)
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
        _upload_log(config, rank, workspace, brief=True)
        message = str(error) if isinstance(error, NonRetryableError) else f"{type(error).__name__}: {error}"
        reason = getattr(error, "reason", "")
        gang.fail(TerminationSummary(outcome="failed", retryable=False, error=message, reason=reason))
    except Exception as error:
        logger.error("training failed:\n%s", traceback.format_exc())
        _upload_log(config, rank, workspace, brief=True)
        summary = TerminationSummary(
            outcome="failed", error=f"{type(error).__name__}: {error}", reason=getattr(error, "reason", "")
        )
        gang.fail(summary, echo=is_peer_gone(error))
    _upload_log(config, rank, workspace, brief=result.outcome != "succeeded")
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

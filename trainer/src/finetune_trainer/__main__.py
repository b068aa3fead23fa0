"""``python -m finetune_trainer --config FILE``: one rank of a fine-tuning run.

Exit codes: 0 done, STOPPED_EXIT_CODE when SIGTERM stopped it after a checkpoint,
NON_RETRYABLE_EXIT_CODE for errors no restart can fix, 1 for anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from finetune_trainer.config import DEFAULT_TERMINATION_MESSAGE_PATH, load_trainer_config
from finetune_trainer.summary import (
    NON_RETRYABLE_EXIT_CODE,
    STOPPED_EXIT_CODE,
    TerminationSummary,
    write_termination_message,
)
from finetune_trainer.worker_env import TERMINATION_MESSAGE_PATH

logger = logging.getLogger("finetune_trainer")


def _configure_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer")
    parser.add_argument("--config", required=True, help="the trainer configuration (JSON) the operator wrote")
    args = parser.parse_args(argv)
    _configure_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        config = load_trainer_config(args.config)
    except (OSError, ValueError) as error:
        return _finish(
            None, TerminationSummary(outcome="failed", retryable=False, error=f"bad configuration: {error}")
        )
    # Imported here: the heavy stack (torch, deepspeed) loads only once the configuration is valid.
    from finetune_trainer.errors import NonRetryableError
    from finetune_trainer.recipe import run
    from finetune_trainer.training_support import NonRetryableFailures

    try:
        result = run(config, stop.is_set)
    except NonRetryableFailures as error:
        logger.error("%s", error)
        message = str(error) if isinstance(error, NonRetryableError) else f"{type(error).__name__}: {error}"
        return _finish(config, TerminationSummary(outcome="failed", retryable=False, error=message))
    except Exception as error:
        logger.error("training failed:\n%s", traceback.format_exc())
        return _finish(config, TerminationSummary(outcome="failed", error=f"{type(error).__name__}: {error}"))
    summary = TerminationSummary(
        outcome=result.outcome, metrics=result.metrics, output_model=result.output_model, step=result.step
    )
    return _finish(config, summary)


def _finish(config: object, summary: TerminationSummary) -> int:
    """Local rank 0 leaves the node's summary in the termination-message file for the operator."""
    path = getattr(getattr(config, "reporting", None), "termination_message_path", None)
    path = os.environ.get(TERMINATION_MESSAGE_PATH, path or DEFAULT_TERMINATION_MESSAGE_PATH)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        write_termination_message(path, summary)
    if summary.outcome == "failed":
        return 1 if summary.retryable else NON_RETRYABLE_EXIT_CODE
    return STOPPED_EXIT_CODE if summary.outcome == "stopped" else 0


if __name__ == "__main__":
    sys.exit(main())

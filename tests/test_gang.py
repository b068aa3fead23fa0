"""A failure, a hang, a stop or a kill on one rank, at each place a rank can be, ends the whole gang:
two gloo ranks under the real launcher and torchrun, S3 on loopback, faults from fault_injection.py.

The process-group timeout stays at its 30 minutes, so a run that ends within the waits below ended
because of the gang's own mechanism (gang.py), not the timeout.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from finetune_trainer.config import TrainerConfig
from finetune_trainer.fault_injection import FAULTS, STEPPED_SITES
from finetune_trainer.launch import descendants
from finetune_trainer.summary import (
    NON_FINITE_LOSS,
    NON_RETRYABLE_EXIT_CODE,
    STALLED,
    STOPPED_EXIT_CODE,
    parse_termination_message,
)
from finetune_trainer.worker_env import STOP_GRACE_SECONDS

from tests.s3server import S3Server, s3_server
from tests.trainer_runs import Run, run_trainer, s3_client, seed_store, start_trainer, trainer_config

pytestmark = pytest.mark.system

BUCKET = "gang"
# Far below the 30-minute process-group timeout: the gang must end on its own.
ENDS_WITHIN = 150.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with s3_server() as server:
        seed_store(server.endpoint, tmp_path_factory.mktemp("store"), BUCKET)
        yield server


def job(server: S3Server, name: str, max_steps: int = 6, **spec: dict[str, object]) -> TrainerConfig:
    """Two ranks, evaluation and a checkpoint every 2 steps, a log line every step."""
    return trainer_config(
        server.endpoint,
        name,
        BUCKET,
        dataset={"evalSplit": 0.1},
        hyperparameters={"maxSteps": max_steps},
        output={"checkpointEverySteps": 2},
        evaluation={"everySteps": 2},
        **spec,
    )


def complete_steps(server: S3Server, name: str) -> list[int]:
    pages = (
        s3_client(server.endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix=f"out/{name}/checkpoints/")
    )
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return sorted(int(k.split("/")[3].removeprefix("step-")) for k in keys if k.endswith("/manifest.json"))


def run_with_faults(config: TrainerConfig, workdir: Path, server: S3Server, faults: str, **env: str) -> Run:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULTS, faults)
        for name, value in env.items():
            patch.setenv(name, value)
        started = time.monotonic()
        run = run_trainer(config, workdir, server.endpoint, processes=2, timeout=ENDS_WITHIN)
    print(f"{faults}: exit {run.code} after {time.monotonic() - started:.1f}s")
    return run


def fault(site: str, rank: int, action: str, step: int) -> str:
    return f"{site}:{rank}:{action}:{step}" if site in STEPPED_SITES else f"{site}:{rank}:{action}"


# One fault per place a rank can be: before the first collective, inside each collective site of the
# recipe, and while writing the outputs. Sites only local rank 0 or global rank 0 passes fail there.
SITES = [
    ("before-rendezvous", 1),
    ("fetch", 0),
    ("engine", 1),
    ("resume", 1),
    ("step", 1),
    ("log", 0),
    ("evaluate", 1),
    ("checkpoint-save", 1),
    ("checkpoint-upload", 0),
    ("checkpoint-finish", 0),
    ("stop-check", 1),
    ("outputs", 0),
]


@pytest.mark.parametrize(("site", "rank"), SITES, ids=[site for site, _ in SITES])
def test_a_failure_on_one_rank_at_each_site_ends_every_rank_with_its_reason(
    store: S3Server, tmp_path: Path, site: str, rank: int
) -> None:
    run = run_with_faults(job(store, f"fail-{site}"), tmp_path, store, fault(site, rank, "raise", 2))
    assert run.code == 1, run.log[-3000:]
    assert run.summary is not None and run.summary.outcome == "failed" and run.summary.retryable
    assert run.summary.error == f"InjectedFault: injected fault at {site} on rank {rank}"
    assert run.summary.rank == rank and not run.summary.collateral
    assert "ChildFailedError" in run.log  # torchrun's report stays in the log


def test_a_non_retryable_failure_on_one_rank_gives_the_whole_node_the_reserved_code(
    store: S3Server, tmp_path: Path
) -> None:
    run = run_with_faults(job(store, "fatal"), tmp_path, store, "step:1:fatal:3")
    assert run.code == NON_RETRYABLE_EXIT_CODE, run.log[-3000:]
    assert run.summary is not None and not run.summary.retryable and run.summary.rank == 1
    assert "injected non-retryable fault at step on rank 1" in run.summary.error


def test_a_hung_rank_is_reported_stalled_with_every_ranks_stack(store: S3Server, tmp_path: Path) -> None:
    config = job(store, "stall", max_steps=50, runPolicy={"stallTimeoutSeconds": 3})
    run = run_with_faults(config, tmp_path, store, "step:1:hang:3")
    assert run.code == 1, run.log[-3000:]
    assert run.summary is not None and run.summary.reason == STALLED and run.summary.retryable
    assert "made no optimizer step for" in run.summary.error and "stall timeout 3s" in run.summary.error
    # Both ranks wrote their threads' stacks (whichever noticed first is the cause), the hung one
    # showing where it hangs.
    for rank in (0, 1):
        noticed = rf"rank {rank} ERROR finetune_trainer.gang: "
        noticed += rf"rank {rank}: (no progress for \d+s|the gang stalled)"
        assert re.search(f"{noticed}; the stacks of its threads follow", run.log), run.log[-3000:]
    assert "in fault_point" in run.log and "Current thread 0x" in run.log


def test_a_stop_ends_a_rank_stuck_in_a_collective_within_the_grace_period(
    store: S3Server, tmp_path: Path
) -> None:
    config = job(store, "stuck-stop", max_steps=100000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULTS, "step:1:hang:3")
        patch.setenv(STOP_GRACE_SECONDS, "5")
        process, termination = start_trainer(config, tmp_path, store.endpoint, processes=2)
        log = tmp_path / "trainer.log"
        deadline = time.monotonic() + ENDS_WITHIN
        while "checkpoint step-2 saved locally" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "checkpoint step-2 saved locally" in log.read_text(), log.read_text()[-3000:]
        time.sleep(3)  # rank 0 is now waiting in a collective for rank 1, hung before step 4
        ranks = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        code = process.wait(ENDS_WITHIN)
    log = (tmp_path / "trainer.log").read_text()
    summary = parse_termination_message(termination.read_text())
    assert code == STOPPED_EXIT_CODE, log[-3000:]
    assert summary is not None and summary.outcome == "stopped"
    assert "the stop did not finish within 5s" in log
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]


@pytest.mark.parametrize(("policy", "code"), [("fail", NON_RETRYABLE_EXIT_CODE), ("restart", 1)])
def test_a_nan_loss_stops_with_reason_non_finite_loss_and_keeps_the_good_checkpoints(
    store: S3Server, tmp_path: Path, policy: str, code: int
) -> None:
    name = f"nan-{policy}"
    config = job(store, name, max_steps=20, runPolicy={"nonFiniteLoss": policy})
    run = run_with_faults(config, tmp_path, store, "step:0:nan:5")
    assert run.code == code, run.log[-3000:]
    assert run.summary is not None and run.summary.reason == NON_FINITE_LOSS
    assert "the training loss became nan by step 6" in run.summary.error
    # The checkpoints before the NaN are complete; none was saved after it.
    assert complete_steps(store, name) == [2, 4]
    assert f"newest good checkpoint: s3://{BUCKET}/out/{name}/checkpoints/step-4/" in run.summary.error


def test_sigkill_of_one_rank_at_random_points_always_resumes_and_finishes(
    store: S3Server, tmp_path: Path
) -> None:
    """Kills during a step, a checkpoint save and upload, an evaluation and the final output, in a random
    order; each rerun resumes from the newest complete checkpoint: it loses the steps since that
    checkpoint, at most one interval plus the one whose upload the kill interrupted."""
    name, total, every = "kills", 12, 2
    config = job(store, name, max_steps=total)
    rng = random.Random(11)
    kills = [("checkpoint-save", rng.choice([0, 1])), ("checkpoint-upload", 0), ("evaluate", 1), ("step", 0)]
    rng.shuffle(kills)
    kills.append(("outputs", 0))
    reached, lost = 0, []
    for attempt, (site, rank) in enumerate(kills):
        at = reached + rng.randint(1, 3)
        run = run_with_faults(config, tmp_path / f"attempt-{attempt}", store, fault(site, rank, "kill", at))
        assert run.code != 0 and run.summary is not None, run.log[-3000:]
        assert "ended without a report" in run.summary.error
        logged = [int(m) for m in re.findall(rf"step (\d+)/{total} loss", run.log)]
        resumed = re.search(r"resumed from s3://\S+/step-(\d+)/", run.log)
        start = int(resumed.group(1)) if resumed else 0
        lost.append(reached - start)
        reached = max([start, *logged])
    final = run_trainer(config, tmp_path / "final", store.endpoint, processes=2, timeout=ENDS_WITHIN)
    assert final.code == 0 and final.summary is not None, final.log[-3000:]
    assert final.summary.outcome == "succeeded" and final.summary.step == total
    resumed = re.search(r"resumed from s3://\S+/step-(\d+)/", final.log)
    assert resumed is not None
    lost.append(reached - int(resumed.group(1)))
    print(f"{len(kills)} kills at {kills}; steps lost per rerun: {lost}")
    assert max(lost) <= 2 * every

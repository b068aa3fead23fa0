"""``decide`` is total: for every spec the API accepts and anything the workers and the kubelet may
report, it returns a decision whose status serialises to JSON without NaN, and never raises.

Specs are the examples (examples/*.yaml) with their run policy and node count varied within the
bounds the pydantic models declare (what the API server accepts too); pods are arbitrary
observations (any phase, exit code, rank in or out of range, duplicated ranks and names, stale
attempts, termination messages of any text or JSON); /progress documents are arbitrary JSON, NaN and
Infinity included. Bounded to a few seconds a run (max_examples) so that CI keeps it.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from finetune_operator.api.spec import Condition, FinetuneJob, FinetuneJobStatus, Phase, RunPolicySpec
from finetune_operator.api.timestamps import format_time
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.controller.observation import PodObservation
from finetune_operator.controller.state import JobObservation, decide
from finetune_trainer.summary import NON_RETRYABLE_EXIT_CODE, STALLED, TerminationSummary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
JOBS = [parse_finetune_job(yaml.safe_load(path.read_text())) for path in EXAMPLES]
INT64_MAX = 2**63 - 1
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
MAX_EXAMPLES = 300


def _bounds(model: type[Any], name: str) -> tuple[int, int]:
    """The integer bounds a field of a spec model declares (ge/le), int64 where it has no upper one."""
    low, high = 0, INT64_MAX
    for constraint in model.model_fields[name].metadata:
        if isinstance(constraint, annotated_types.Ge):
            low = int(constraint.ge)
        elif isinstance(constraint, annotated_types.Le):
            high = int(constraint.le)
    return low, high


def _integers(model: type[Any], name: str) -> st.SearchStrategy[int]:
    low, high = _bounds(model, name)
    return st.one_of(st.sampled_from([low, high, min(low + 1, high)]), st.integers(low, high))


@st.composite
def jobs(draw: st.DrawFn) -> FinetuneJob:
    """An example job with its run policy and node count varied within the models' constraints."""
    job = draw(st.sampled_from(JOBS))
    policy = job.spec.run_policy.model_copy(
        update={
            "backoff_limit": draw(_integers(RunPolicySpec, "backoff_limit")),
            "active_deadline_seconds": draw(_integers(RunPolicySpec, "active_deadline_seconds")),
            "ttl_seconds_after_finished": draw(_integers(RunPolicySpec, "ttl_seconds_after_finished")),
            "suspend": draw(st.booleans()),
        }
    )
    # Many nodes make big gangs and slow examples; the bound itself is drawn now and then.
    nodes = draw(st.one_of(st.integers(1, 4), st.just(_bounds(type(job.spec.resources), "nodes")[1])))
    resources = job.spec.resources.model_copy(update={"nodes": nodes})
    spec = job.spec.model_copy(update={"run_policy": policy, "resources": resources})
    return job.model_copy(update={"spec": spec})


def _json(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )


NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**64, float("nan"), float("inf"), float("-inf")]),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20))
ANY_JSON = _json(LEAVES)
TIMESTAMPS = st.one_of(
    st.none(),
    st.just(""),
    st.text(max_size=20),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)).map(
        format_time
    ),
)

PROGRESS_KEYS = ["step", "totalSteps", "epoch", "etaSeconds", "tokensPerSecond", "trainLoss"]


@st.composite
def progress_documents(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    document: dict[str, Any] = {
        key: draw(LEAVES | ANY_JSON) for key in draw(st.sets(st.sampled_from(PROGRESS_KEYS)))
    }
    if draw(st.booleans()):
        document["evalMetrics"] = draw(st.dictionaries(st.text(max_size=200), LEAVES, max_size=5) | ANY_JSON)
    if draw(st.booleans()):
        entry = st.fixed_dictionaries(
            {}, optional={"step": LEAVES, "uri": LEAVES, "evalLoss": LEAVES, "time": LEAVES}
        )
        document["checkpoints"] = draw(st.lists(entry | ANY_JSON, max_size=5) | ANY_JSON)
    if draw(st.booleans()):
        document["huge"] = "x" * draw(st.integers(0, 100_000))
    return document


@st.composite
def termination_messages(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["empty", "text", "json", "summary", "hostile-summary"]))
    if kind == "empty":
        return ""
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "json":
        return json.dumps(draw(ANY_JSON))
    if kind == "summary":
        return TerminationSummary(
            outcome=draw(st.sampled_from(["succeeded", "failed", "stopped"])),
            retryable=draw(st.booleans()),
            error=draw(st.text(max_size=50)),
            reason=draw(st.sampled_from(["", STALLED, "NonFiniteLoss", "bad reason!"])),
            collateral=draw(st.booleans()),
            output_model=draw(st.sampled_from(["", "s3://out/job/model/", "s3://elsewhere/x/"])),
            step=draw(st.none() | st.integers(0, INT64_MAX)),
        ).to_message()
    fields = {
        "outcome": draw(st.sampled_from(["succeeded", "failed", "stopped", "other"]) | LEAVES),
        "error": draw(st.text(max_size=10) | st.just("e" * 100_000) | LEAVES),
        "reason": draw(st.text(max_size=40) | LEAVES),
        "rank": draw(LEAVES),
        "step": draw(LEAVES),
        "collateral": draw(LEAVES),
        "metrics": draw(st.dictionaries(st.text(max_size=10), NUMBERS, max_size=4) | ANY_JSON),
        "notes": draw(st.lists(st.text(max_size=10), max_size=3) | ANY_JSON),
        "outputModel": draw(st.text(max_size=30) | st.just("s3://out/../../etc/") | LEAVES),
    }
    return json.dumps(fields)


@st.composite
def pods(draw: st.DrawFn, nodes: int) -> list[PodObservation]:
    observed = []
    for _ in range(draw(st.integers(0, min(nodes, 4) + 2))):
        rank = draw(st.integers(-2, nodes + 2))
        observed.append(
            PodObservation(
                name=draw(st.sampled_from(["w-0", "w-1", "w-2", f"w-{rank}", ""])),
                node_rank=rank,
                attempt=draw(st.integers(-1, 3)),
                phase=draw(st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown", "?"])),
                deleting=draw(st.booleans()),
                started=draw(st.booleans()),
                ready=draw(st.booleans()),
                exit_code=draw(
                    st.none() | st.sampled_from([0, 1, 137, 143, NON_RETRYABLE_EXIT_CODE]) | st.integers()
                ),
                finished_at=draw(TIMESTAMPS.map(lambda t: t or "")),
                reason=draw(st.sampled_from(["", "OOMKilled", "Evicted", "Error"]) | st.text(max_size=20)),
                message=draw(st.text(max_size=30)),
                termination_message=draw(termination_messages()),
                unschedulable=draw(st.sampled_from(["", "0/3 nodes are available"])),
                waiting=draw(st.sampled_from(["", "ImagePullBackOff: nope"])),
                ip=draw(st.sampled_from(["", "10.0.0.1"])),
            )
        )
    return observed


@st.composite
def statuses(draw: st.DrawFn, job: FinetuneJob) -> FinetuneJobStatus:
    conditions = [
        Condition(type=type_, status=draw(st.sampled_from(["True", "False"])), reason="R")
        for type_ in draw(
            st.sets(st.sampled_from(["Running", "ReconcileError", "ChildrenDeleted", "Suspended"]))
        )
    ]
    return FinetuneJobStatus(
        phase=draw(st.none() | st.sampled_from(Phase.__args__)),
        restarts=draw(st.integers(0, job.spec.run_policy.backoff_limit + 1)),
        start_time=draw(TIMESTAMPS),
        completion_time=draw(TIMESTAMPS),
        conditions=conditions,
    )


@st.composite
def observations(draw: st.DrawFn) -> tuple[JobObservation, list[PodObservation], datetime]:
    job = draw(jobs())
    observed = JobObservation(
        name=job.metadata.name or "job",
        namespace="team",
        generation=draw(st.integers(0, INT64_MAX)),
        created=NOW - timedelta(hours=1),
        job=job,
        status=draw(statuses(job)),
        progress=draw(progress_documents()),
        progress_poll_seconds=draw(st.none() | st.floats(0.1, 3600)),
        previous_pass_failed=draw(st.booleans()),
    )
    now = draw(
        st.sampled_from([NOW, datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, tzinfo=UTC)])
        | st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
    )
    return observed, draw(pods(job.spec.resources.nodes)), now


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(observations())
def test_decide_never_raises_and_its_status_is_json_without_nan(
    case: tuple[JobObservation, list[PodObservation], datetime],
) -> None:
    observed, observed_pods, now = case
    decision = decide(observed, observed_pods, now)
    written = decision.status.to_api()
    json.dumps(written, allow_nan=False)  # raises on NaN or Infinity anywhere in it
    assert FinetuneJobStatus.model_validate(written).to_api() == written
    assert decision.requeue_after is None or math.isfinite(decision.requeue_after)
    # Only this job's workers are deleted, each once; only its own output is named.
    assert len(decision.delete_pods) == len(set(decision.delete_pods))
    assert set(decision.delete_pods) <= {p.name for p in observed_pods}
    output = observed.job.spec.output.uri if observed.job else ""
    model = decision.status.output_model
    assert model in ("", observed.status.output_model) or model.startswith(output.rstrip("/") + "/")

"""The MemoryFit condition as a table: a job's declared model shape and the GPU memory in, the
condition out, and a job that clearly does not fit failed before any pod is created."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator.api.memory_fit import GIB, MODEL_CONFIG_ANNOTATION
from finetune_operator.api.spec import FinetuneJobStatus
from finetune_operator.api.timestamps import format_time
from finetune_operator.api.validation import parse_finetune_job
from finetune_operator.controller.observation import PodObservation
from finetune_operator.controller.state import INSUFFICIENT_GPU_MEMORY, JobObservation, decide, memory_fit

from tests.manifests import minimal_manifest
from tests.test_memory_fit import LLAMA_3_8B

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
FULL_ZERO2 = {"method": {"type": "full"}, "deepspeed": {"zeroStage": 2}}
FULL_ZERO3_8 = {"method": {"type": "full"}, "deepspeed": {"zeroStage": 3}, "resources": {"gpusPerNode": 8}}


def observed(
    spec: dict[str, Any],
    annotation: str | None = json.dumps(LLAMA_3_8B),
    gpu_memory: int | None = 80 * GIB,
    status: dict[str, Any] | None = None,
) -> JobObservation:
    manifest = minimal_manifest(**spec)
    if annotation is not None:
        manifest["metadata"]["annotations"] = {MODEL_CONFIG_ANNOTATION: annotation}
    return JobObservation(
        name="job",
        namespace="team",
        generation=1,
        created=NOW - timedelta(minutes=1),
        job=parse_finetune_job(manifest),
        status=FinetuneJobStatus.model_validate(status or {}),
        gpu_memory=gpu_memory,
    )


def worker(rank: int = 0) -> PodObservation:
    return PodObservation(name=f"job-worker-{rank}", node_rank=rank, attempt=0, phase="Running", started=True)


GPU_LABEL_48GIB = {"nodeSelector": {"nvidia.com/gpu.memory": "49152"}}

# (id, observation, pods, MemoryFit (status, reason, words) or None, phase, pods created)
CASES: list[tuple[str, JobObservation, list[PodObservation], tuple[str, str, str] | None, str, bool]] = [
    ("fits", observed(FULL_ZERO3_8), [], ("True", "Fits", "fits: "), "Pending", True),
    (
        "does not fit: failed before any pod",
        observed(FULL_ZERO2),
        [],
        ("False", "DoesNotFit", "would fit: deepspeed.offload cpu"),
        "Failed",
        False,
    ),
    (
        "the message names the GPU memory assumed",
        observed(FULL_ZERO2),
        [],
        ("False", "DoesNotFit", "of 80.0 GiB"),
        "Failed",
        False,
    ),
    (
        "the nodeSelector's GPU label wins over the flag",
        observed({**FULL_ZERO3_8, "resources": {"gpusPerNode": 8, **GPU_LABEL_48GIB}}, gpu_memory=None),
        [],
        ("True", "Fits", "nvidia.com/gpu.memory] 49152 MiB"),
        "Pending",
        True,
    ),
    (
        "a running gang is never failed by the estimate",
        observed(FULL_ZERO2, status={"phase": "Running", "startTime": format_time(NOW)}),
        [worker()],
        ("False", "DoesNotFit", "does not fit"),
        "Running",
        False,
    ),
    (
        "no GPU memory known: Unknown, not failed",
        observed(FULL_ZERO2, gpu_memory=None),
        [],
        ("Unknown", "UnknownGPUMemory", "--gpu-memory"),
        "Pending",
        True,
    ),
    (
        "a bad annotation: Unknown, naming the key",
        observed(FULL_ZERO2, annotation=json.dumps({**LLAMA_3_8B, "hidden_size": "big"})),
        [],
        ("Unknown", "InvalidModelShape", "hidden_size is 'big'"),
        "Pending",
        True,
    ),
    (
        "an annotation that is not JSON",
        observed(FULL_ZERO2, annotation="{hidden_size: 4096"),
        [],
        ("Unknown", "InvalidModelShape", "not JSON"),
        "Pending",
        True,
    ),
    ("no annotation: no condition", observed(FULL_ZERO2, annotation=None), [], None, "Pending", True),
    (
        "CPU jobs: no condition",
        observed({"resources": {"gpusPerNode": 0}}, gpu_memory=1 * GIB),
        [],
        None,
        "Pending",
        True,
    ),
]


@pytest.mark.parametrize(
    ("observation", "pods", "condition", "phase", "creates"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_memory_fit(
    observation: JobObservation,
    pods: list[PodObservation],
    condition: tuple[str, str, str] | None,
    phase: str,
    creates: bool,
) -> None:
    decision = decide(observation, pods, NOW)
    found = next((c for c in decision.status.conditions if c.type == "MemoryFit"), None)
    if condition is None:
        assert found is None
    else:
        assert found is not None
        assert (found.status, found.reason) == condition[:2]
        assert condition[2] in found.message
    assert decision.status.phase == phase
    assert (decision.create_attempt is not None) == creates
    if phase == "Failed":
        failed = next(c for c in decision.status.conditions if c.type == "Failed")
        assert failed.reason == INSUFFICIENT_GPU_MEMORY
        assert "does not fit in GPU memory" in decision.status.message
        assert decision.events[-1].type == "Warning"


def test_a_failed_job_stays_failed_and_the_decision_is_idempotent() -> None:
    first = decide(observed(FULL_ZERO2), [], NOW)
    again = decide(
        JobObservation(**{**observed(FULL_ZERO2).__dict__, "status": first.status}),
        [],
        NOW + timedelta(seconds=5),
    )
    assert again.status.to_api() == first.status.to_api()
    assert again.create_attempt is None and not again.events


def test_memory_fit_is_pure_and_short() -> None:
    job = observed(FULL_ZERO2).job
    assert job is not None
    status, reason, message = memory_fit(job, 80 * GIB) or (None, "", "")
    assert (status, reason) == (False, "DoesNotFit")
    assert memory_fit(job, 80 * GIB) == (status, reason, message)
    assert len(message) <= 2048

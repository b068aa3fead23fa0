"""The MemoryFit condition as a table: a job's declared model shape and the GPU memory in, the
condition out, and a job that clearly does not fit failed before any pod is created; and where the GPU
memory comes from (``gpu_memory_for``) as a table of nodeSelectors, node labels and the flag."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator.api.memory_fit import (
    GIB,
    GPU_MEMORY_LABEL,
    MIB,
    MODEL_CONFIG_ANNOTATION,
    GpuNode,
    gpu_memory_for,
)
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
    nodes: tuple[GpuNode, ...] = (),
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
        gpu_nodes=nodes,
    )


def worker(rank: int = 0) -> PodObservation:
    return PodObservation(name=f"job-worker-{rank}", node_rank=rank, attempt=0, phase="Running", started=True)


GPU_LABEL_48GIB = {"nodeSelector": {"nvidia.com/gpu.memory": "49152"}}


def gpu_node(name: str, mib: str | None = None, **labels: str) -> GpuNode:
    """A node as the operator's index keeps it, labelled with ``mib`` as GPU feature discovery does."""
    return GpuNode.of(name, {**labels, **({GPU_MEMORY_LABEL: mib} if mib is not None else {})})


A100_40 = gpu_node("a100-40", "40960", pool="a100")

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
        "the matching nodes' label, without the flag: failed before any pod",
        observed(FULL_ZERO2, gpu_memory=None, nodes=(A100_40,)),
        [],
        ("False", "DoesNotFit", "GPU memory: nvidia.com/gpu.memory 40960 MiB on node a100-40"),
        "Failed",
        False,
    ),
    (
        "the matching nodes' label wins over the flag",
        observed(FULL_ZERO3_8, gpu_memory=1 * GIB, nodes=(gpu_node("h200", "143771"),)),
        [],
        ("True", "Fits", "of 140.4 GiB"),
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


# (id, the job's nodeSelector, the indexed nodes, --gpu-memory, bytes found, words of the origin)
SOURCES: list[tuple[str, dict[str, str], list[GpuNode], int | None, int | None, str]] = [
    ("no nodes: the flag", {}, [], 80 * GIB, 80 * GIB, "80.0 GiB, the configured GPU memory"),
    ("no nodes, no flag: unknown", {}, [], None, None, "no GPU memory configured"),
    (
        "nodes without the label: the flag",
        {},
        [gpu_node("cpu-0"), gpu_node("cpu-1")],
        80 * GIB,
        80 * GIB,
        "configured",
    ),
    ("nodes without the label, no flag: unknown", {}, [gpu_node("cpu-0")], None, None, "no GPU memory"),
    ("a non-matching selector: the flag", {"pool": "h100"}, [A100_40], 80 * GIB, 80 * GIB, "configured"),
    (
        "every pair of the selector must match",
        {"pool": "a100", "zone": "b"},
        [A100_40, gpu_node("a100-80", "81920", pool="a100", zone="b")],
        None,
        81920 * MIB,
        "81920 MiB on node a100-80, the only matching node",
    ),
    (
        "the smallest of several",
        {"pool": "a100"},
        [
            gpu_node("a100-80", "81920", pool="a100"),
            A100_40,
            gpu_node("h100", "81559"),
            gpu_node("b", "97871", pool="a100"),
        ],
        80 * GIB,
        40960 * MIB,
        "nvidia.com/gpu.memory 40960 MiB on node a100-40, the smallest of the 3 matching nodes",
    ),
    (
        "no selector: any labelled node",
        {},
        [gpu_node("cpu-0"), A100_40],
        None,
        40960 * MIB,
        "the only matching node",
    ),
    (
        "a label that is not a size (a word, under 1 GiB) is ignored",
        {},
        [gpu_node("odd", "lots"), gpu_node("tiny", "512"), A100_40],
        None,
        40960 * MIB,
        "on node a100-40, the only matching node",
    ),
    ("only bad labels: the flag", {}, [gpu_node("odd", "lots")], 80 * GIB, 80 * GIB, "configured"),
    (
        "the job's label wins over the nodes",
        {GPU_MEMORY_LABEL: "49152"},
        [A100_40, gpu_node("l40", "49152")],
        80 * GIB,
        48 * GIB,
        "spec.resources.nodeSelector[nvidia.com/gpu.memory] 49152 MiB",
    ),
    (
        "the job's label, not a size: the nodes carry no size for it either, so the flag",
        {GPU_MEMORY_LABEL: "big"},
        [gpu_node("odd", "big"), A100_40],
        80 * GIB,
        80 * GIB,
        "configured",
    ),
]


@pytest.mark.parametrize(
    ("selector", "nodes", "flag", "size", "origin"), [c[1:] for c in SOURCES], ids=[c[0] for c in SOURCES]
)
def test_where_the_gpu_memory_comes_from(
    selector: dict[str, str], nodes: list[GpuNode], flag: int | None, size: int | None, origin: str
) -> None:
    job = parse_finetune_job(minimal_manifest(resources={"nodeSelector": selector}))
    found, words = gpu_memory_for(job, flag, nodes)
    assert found == size, words
    assert origin in words

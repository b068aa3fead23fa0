"""Pod bodies and rank 0's /progress document, read into what the state machine works with."""

from __future__ import annotations

from finetune_operator.controller.observation import observe_pod, progress_status


def test_observe_pod_reads_the_kubelet_status() -> None:
    body = {
        "metadata": {
            "name": "job-worker-1",
            "labels": {"finetune.dev/node-rank": "1", "finetune.dev/attempt": "2"},
            "deletionTimestamp": "2026-11-21T12:00:00Z",
        },
        "status": {
            "phase": "Failed",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "state": {
                        "terminated": {
                            "exitCode": 137,
                            "reason": "OOMKilled",
                            "message": '{"outcome":"failed"}',
                        }
                    }
                }
            ],
        },
    }
    observed = observe_pod(body)
    assert (observed.node_rank, observed.attempt, observed.exit_code) == (1, 2, 137)
    assert (observed.reason, observed.deleting, observed.started, observed.ip) == (
        "OOMKilled",
        True,
        True,
        "10.0.0.7",
    )
    pending = observe_pod(
        {
            "metadata": {"name": "p", "labels": {}},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "no GPUs",
                    }
                ],
            },
        }
    )
    assert pending.unschedulable == "no GPUs" and not pending.started


def test_progress_document_becomes_status() -> None:
    document = {
        "step": 7,
        "totalSteps": 9,
        "epoch": 1.23456,
        "etaSeconds": 12.7,
        "tokensPerSecond": 1234.56,
        "trainLoss": 0.123456,
        "evalMetrics": {"evalLoss": 0.5, "f1": 0.75},
        "checkpoints": [{"step": s, "uri": f"s3://o/step-{s}/", "time": "t"} for s in range(1, 13)],
    }
    reported = progress_status(document).to_api()
    assert reported["progress"] == {
        "step": 7,
        "totalSteps": 9,
        "epoch": 1.235,
        "percent": 77,
        "etaSeconds": 12,
        "tokensPerSecond": 1234.6,
    }
    assert reported["metrics"] == {"evalLoss": 0.5, "f1": 0.75, "trainLoss": 0.1235}
    assert [c["step"] for c in reported["checkpoints"]] == list(range(3, 13))  # the newest ten

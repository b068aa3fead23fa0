"""The operator's Prometheus metrics, in a registry of their own (one per operator instance)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from finetune_operator.api.spec import Phase

PHASES: tuple[str, ...] = Phase.__args__


class _JobsByPhase(Collector):
    """finetune_jobs{phase}: counted at scrape time from the phase each job was last seen in."""

    def __init__(self, phases: dict[tuple[str, str], str]) -> None:
        self._phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("finetune_jobs", "FinetuneJobs by phase.", labels=["phase"])
        counts = Tally(self._phases.values())
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phases: dict[tuple[str, str], str] = {}
        self.registry.register(_JobsByPhase(self.phases))
        self.gang_restarts = Counter(
            "finetune_gang_restarts",
            "Gang restarts after worker failures.",
            ["namespace"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "finetune_reconcile_errors",
            "Kubernetes API calls of the operator that failed.",
            ["reason"],
            registry=self.registry,
        )
        self.dropped_report_values = Counter(
            "finetune_worker_report_values_dropped",
            "Values of workers' reports (source: progress, the /progress document; termination, a "
            "termination message) left out as malformed, out of bounds or not finite.",
            ["source"],
            registry=self.registry,
        )
        self.time_to_running = Histogram(
            "finetune_time_to_all_workers_running_seconds",
            "From a job's creation to all of its workers running (first attempt).",
            buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf")),
            registry=self.registry,
        )

    def forget(self, key: tuple[str, str]) -> None:
        self.phases.pop(key, None)

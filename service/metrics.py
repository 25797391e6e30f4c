"""Prometheus metrics: one prefix (`imh_`), base units, `_total` counters.

Labels are bounded: `model` (the generator's name) and `method`, plus the route template
and status code on HTTP metrics, and small fixed sets (job type and state, work stream).
Never request ids, job ids, seeds or versions.

API front ends and `imh worker` processes build the same class; each exports what it
does (the engine's series come from workers in distributed mode, the queue and job
gauges from the API, which reads them from Redis at scrape time).

Each app gets its own CollectorRegistry, so tests can build several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ROW_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SAMPLE_LABELS = ("model", "method")

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "imh_http_requests_total", "HTTP requests answered", ("route", "status"), registry=r
        )
        self.http_duration = Histogram(
            "imh_http_request_duration_seconds",
            "Time to answer (streams: to the last byte)",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sample_requests = Counter(
            "imh_sample_requests_total",
            "Sampling requests by outcome",
            (*SAMPLE_LABELS, "outcome"),
            registry=r,
        )
        self.sample_duration = Histogram(
            "imh_sample_duration_seconds",
            "Sampling request time from submission to done",
            SAMPLE_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_sample = Histogram(
            "imh_time_to_first_sample_seconds",
            "Stream time from submission to first sample",
            SAMPLE_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "imh_batch_rows",
            "Rows (chains) stepped together in one kernel step",
            SAMPLE_LABELS,
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.step_duration = Histogram(
            "imh_step_duration_seconds",
            "Time of one batched kernel step",
            SAMPLE_LABELS,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.proposals = Counter(
            "imh_proposals_total", "Proposals evaluated", SAMPLE_LABELS, registry=r
        )
        self.accepted = Counter(
            "imh_accepted_total", "Proposals accepted", SAMPLE_LABELS, registry=r
        )
        self.queued_rows = Gauge(
            "imh_queued_rows",
            "Rows waiting to join a batch (queue depth)",
            SAMPLE_LABELS,
            registry=r,
        )
        self.active_chains = Gauge(
            "imh_active_chains", "Chains held by running requests", SAMPLE_LABELS, registry=r
        )
        self.running_fid = Gauge(
            "imh_running_fid",
            "Latest running FID of a stream against the model's reference",
            SAMPLE_LABELS,
            registry=r,
        )
        self.r_hat = Histogram(
            "imh_r_hat",
            "Split R-hat of a finished request's traced chains (above 1.05: did not mix)",
            SAMPLE_LABELS,
            buckets=(1.0, 1.01, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0, 5.0),
            registry=r,
        )
        self.models_loaded = Gauge(
            "imh_models_loaded", "Models in the registry", ("kind",), registry=r
        )
        self.model_load_errors = Gauge(
            "imh_model_load_errors", "Model folders skipped at start", registry=r
        )

        # Distributed mode and batch jobs.
        self.jobs = Gauge(
            "imh_jobs", "Batch jobs kept in the store, by type and state", ("type", "state"),
            registry=r,
        )  # fmt: skip
        self.jobs_submitted = Counter(
            "imh_jobs_submitted_total", "Batch jobs accepted", ("type",), registry=r
        )
        self.job_shards = Counter(
            "imh_job_shards_total",
            "Job shards a worker finished, by outcome (done, duplicate, failed, cancelled)",
            ("type", "outcome"),
            registry=r,
        )
        self.job_items = Counter(
            "imh_job_items_total",
            "Samples produced (generate) or candidates scored (filter) by job shards",
            ("type",),
            registry=r,
        )
        self.queue_depth = Gauge(
            "imh_queue_depth",
            "Work messages not yet acknowledged by a worker (waiting plus in flight)",
            ("stream",),
            registry=r,
        )
        self.redeliveries = Counter(
            "imh_redeliveries_total",
            "Work messages reclaimed from a worker that stopped answering",
            ("stream",),
            registry=r,
        )
        self.dead_letters = Counter(
            "imh_dead_letters_total",
            "Work messages moved to the dead-letter stream after too many deliveries",
            ("stream",),
            registry=r,
        )
        self.worker_heartbeats = Counter(
            "imh_worker_heartbeats_total", "Heartbeats this worker wrote to Redis", registry=r
        )
        self.workers = Gauge(
            "imh_workers", "Workers whose heartbeat is fresh (seen by the API)", registry=r
        )
        self.worker_inflight = Gauge(
            "imh_worker_inflight", "Work messages this worker is running", ("stream",), registry=r
        )
        self.redis_up = Gauge(
            "imh_redis_up", "1 when the last Redis health check answered, else 0", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def engine_totals(self) -> dict[str, float]:
        """This process's engine counters summed over models and methods: proposals,
        accepted, active chains and queued rows (a worker's heartbeat carries them)."""
        names = {
            "proposals": "imh_proposals_total",
            "accepted": "imh_accepted_total",
            "active_chains": "imh_active_chains",
            "queued_rows": "imh_queued_rows",
        }
        totals = dict.fromkeys(names, 0.0)
        for family in self.registry.collect():
            for sample in family.samples:
                for key, name in names.items():
                    if sample.name == name:
                        totals[key] += sample.value
        return totals

    def forget_model(self, name: str) -> None:
        """Drop every series labelled with model `name` (its last version was deleted)."""
        # prometheus_client keeps a metric's children by label values; it has no public
        # way to list them, so read its own table to find the ones to remove.
        for collector in list(self.registry._collector_to_names):  # noqa: SLF001
            labels = getattr(collector, "_labelnames", ())
            if "model" not in labels:
                continue
            at = labels.index("model")
            for values in list(getattr(collector, "_metrics", {})):
                if values[at] == name:
                    collector.remove(*values)

"""GET /metrics: Prometheus text from a registry of the service's own (prometheus-client)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from paradit.serve.jobs import STATUSES

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue = Gauge("paradit_queue_depth", "Jobs accepted and waiting for the engine", registry=r)
        self.jobs = Gauge("paradit_jobs", "Jobs in the state directory, by status", ["status"], registry=r)
        self.step = Histogram("paradit_step_seconds", "One denoising step (a CHORDS round under --chords), timed "
                              "on the first rank of each stage (0: high-noise or both experts, 1: low-noise)", ["stage"],
                              buckets=STEP_BUCKETS, registry=r)
        self.request = Histogram("paradit_request_seconds", "From acceptance to the finished video",
                                 buckets=REQUEST_BUCKETS, registry=r)
        self.finished_jobs = Counter("paradit_jobs_finished", "Jobs finished since this start, by status",
                                     ["status"], registry=r)
        self.rejected = Counter("paradit_requests_rejected", "Requests answered with an error, by HTTP status",
                                ["code"], registry=r)
        self.lora_switch = Histogram("paradit_lora_switch_seconds", "Restoring the base weights and merging a "
                                     "job's LoRA set, where it differs from the last job's on its lane",
                                     buckets=STEP_BUCKETS, registry=r)
        self.memory = Gauge("paradit_gpu_memory_bytes", "Device memory per rank after its last job "
                            "(allocated, and the peak since start; 0 without CUDA)", ["rank", "kind"], registry=r)

    def finished(self, job, flight, channel, world: int) -> None:
        """Called by the scheduler when a job ends (the store is read on its thread only)."""
        self.finished_jobs.labels(job.status).inc()
        for stage, report in flight.progress.items():
            for seconds in report["step_s"]:
                self.step.labels(str(stage)).observe(seconds)
        if job.status == "completed":
            self.request.observe(job.completed_at - job.created_at)
            if (job.timings or {}).get("lora_switch_s"):
                self.lora_switch.observe(job.timings["lora_switch_s"])
        for rank in range(world):
            mem = channel.get(f"mem/{rank}")
            if mem is not None:
                self.memory.labels(str(rank), "allocated").set(mem["allocated"])
                self.memory.labels(str(rank), "peak").set(mem["peak"])

    def render(self, counts: dict[str, int]) -> bytes:
        self.queue.set(counts["queued"])
        for status in STATUSES:
            self.jobs.labels(status).set(counts[status])
        return generate_latest(self.registry)

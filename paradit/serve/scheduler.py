"""Rank 0's scheduler: hands queued jobs to free lanes in arrival order, collects their results.

A thread that ticks every POLL_S (at once when a job arrives): it reads the reports of the jobs in
flight (progress, done), commits finished ones to the job store, and posts the oldest queued jobs
to lanes with room: one job at a time per data-parallel replica; with split experts, up to
SPLIT_DEPTH jobs in the two-stage pipeline, so that the high-noise stage starts request N+1 while
the low-noise stage finishes request N. It also watches the abort key of paradit.launch.faults: when
another rank fails, the failing job is marked failed (with the failing rank's reason), the other
jobs in flight go back to the queue, and this process exits non-zero like every other rank.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from paradit.launch.faults import EXIT_PEER_FAILED, peer_failure
from paradit.serve.engine import Channel, command_key
from paradit.serve.jobs import Job, JobStore, disk_full

log = logging.getLogger("paradit")
POLL_S = 0.05
SPLIT_DEPTH = 3  # jobs in a split pipeline at once: one per stage, and the next one ready
MAX_PASSES = 3   # a queued job passed over this often (for jobs with its lane's LoRA set) goes next


@dataclass
class Flight:
    job: Job
    lane: int
    n: int                                   # the command's number on its lane
    progress: dict[int, dict] = field(default_factory=dict)   # stage -> its last progress report
    cancelled: bool = False                  # DELETE asked: the job goes, whether it stopped or finished


class Scheduler:
    def __init__(self, jobs: JobStore, channel: Channel, lanes: int, split: bool, stages: int, world: int,
                 metrics=None):
        self.jobs, self.channel, self.metrics = jobs, channel, metrics
        self.lanes, self.depth = lanes, (SPLIT_DEPTH if split else 1)
        self.stages, self.world = stages, world
        self.flights: dict[int, Flight] = {}     # seq -> the job in flight
        self.lane_loras: list = [None] * lanes   # the LoRA set each lane's last job had
        self.passed: dict[int, int] = {}         # seq -> how often a later job went before it
        self.next_n = [0] * lanes
        self.wake = threading.Event()
        self.lock = threading.Lock()             # flights, between this thread and the API's reads
        self.exit_lock = threading.Lock()        # one of this thread and the main thread ends the process
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="paradit-scheduler", daemon=True)

    # ------------------------------------------------------------------ what the API reads
    def progress(self, job: Job) -> int:
        """0-99 from the denoising steps (CHORDS rounds) reported so far (100 is for completed jobs)."""
        with self.lock:
            flight = self.flights.get(job.seq)
            reports = list(flight.progress.values()) if flight else []
        return min(99, int(100 * max((r["step"] / max(1, r["of"]) for r in reports), default=0)))

    def queue_depth(self) -> int:
        return self.jobs.counts()["queued"]

    # ------------------------------------------------------------------ the loop
    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def _loop(self) -> None:
        full = False
        while not self.stopping:
            self.wake.wait(POLL_S)
            self.wake.clear()
            try:
                self.tick()
                full = False
            except Exception as err:  # the store is gone (another rank took the job down) or a bug
                if self.stopping:
                    return
                if disk_full(err):    # nothing is lost: the reports wait in the store, the jobs in the queue
                    if not full:
                        log.warning("the state directory %s is full: finished jobs are recorded, and queued ones "
                                    "start, once space is freed there", self.jobs.dir)
                    full = True
                    continue
                self.end_after_failure(f"the scheduler stopped ({type(err).__name__}: {err})", code=1)

    def tick(self) -> None:
        reason = peer_failure(wait_s=0) if self.world > 1 else None
        if reason is not None:  # another rank failed: its job's report is in the store already
            self.end_after_failure(f"stopping because {reason}", code=EXIT_PEER_FAILED)
        for seq, flight in list(self.flights.items()):
            self.collect(seq, flight)
        self.dispatch()

    def collect(self, seq: int, flight: Flight) -> None:
        for stage in range(self.stages):
            report = self.channel.get(f"progress/{seq}/{stage}")
            if report is not None:
                with self.lock:
                    flight.progress[stage] = report
        done = self.channel.get(f"done/{seq}")
        if done is None:
            return
        if done.get("cancelled") or flight.cancelled:   # the job is gone, as DELETE said
            self.jobs.delete(flight.job, ("in_progress",))
            video = self.jobs.dir / flight.job.video_file   # written where it finished before a step boundary
            for f in (video, video.with_suffix(".json"), video.with_suffix(".latent.safetensors")):
                f.unlink(missing_ok=True)
            log.info("job %s %s", flight.job.id, done["error"] if done.get("cancelled") else "cancelled")
        elif done["ok"]:
            self.jobs.complete(seq, flight.job.video_file, self.timings(flight) |
                               ({"lora_switch_s": done["lora_switch_s"]} if done.get("lora_switch_s") else {}))
            log.info("job %s completed", flight.job.id)
        else:
            self.jobs.fail(seq, done["error"])
            log.warning("job %s failed: %s", flight.job.id, done["error"])
        ended = self.jobs.get(flight.job.id)   # None: cancelled, and deleted
        if self.metrics is not None and ended is not None:
            self.metrics.finished(ended, flight, self.channel, self.world)
        with self.lock:
            del self.flights[seq]
        self.channel.delete(command_key(flight.lane, flight.n), f"done/{seq}", f"cancel/{seq}",
                            *(f"progress/{seq}/{s}" for s in range(self.stages)))

    def cancel(self, job: Job) -> str | None:
        """Stop a running job at its next step boundary (a sampler step or a CHORDS round; every rank of
        its lane); None, or why not."""
        with self.lock:
            flight = self.flights.get(job.seq)
        if flight is None:
            return "it is not running"
        flight.cancelled = True
        self.channel.set(f"cancel/{job.seq}", True)
        return None

    def timings(self, flight: Flight) -> dict:
        job = flight.job
        spans = [{"stage": s, "start": r["start"], "end": r["end"], "steps": len(r["step_s"])}
                 for s, r in sorted(flight.progress.items())]
        return {"queued_s": job.started_at - job.created_at, "run_s": time.time() - job.started_at,
                "stages": spans}

    def dispatch(self) -> None:
        while True:
            lane = self.free_lane()
            if lane is None:
                return
            job = self.jobs.next_queued(lambda queued: self.choose(lane, queued))
            if job is None:
                return
            self.lane_loras[lane] = lora_key(job.request)
            self.passed.pop(job.seq, None)
            n = self.next_n[lane]
            self.next_n[lane] += 1
            with self.lock:
                self.flights[job.seq] = Flight(job, lane, n)
            self.channel.set(command_key(lane, n), {"op": "run", "seq": job.seq, "id": job.id,
                                                    "request": job.request, "file": job.video_file})
            log.debug("job %s -> lane %d", job.id, lane)

    def choose(self, lane: int, queued: list) -> Job:
        """The next job of `lane` among the oldest queued: the first with the lane's current LoRA set
        (no switch), unless the oldest has been passed over MAX_PASSES times (none starves)."""
        oldest = queued[0]
        if self.passed.get(oldest.seq, 0) >= MAX_PASSES:
            return oldest
        want = self.lane_loras[lane]
        pick = next((j for j in queued if lora_key(j.request) == want), oldest)
        for j in queued:
            if j is pick:
                break
            self.passed[j.seq] = self.passed.get(j.seq, 0) + 1
        return pick

    def free_lane(self) -> int | None:
        busy = [0] * self.lanes
        for f in self.flights.values():
            busy[f.lane] += 1
        free = [lane for lane in range(self.lanes) if busy[lane] < self.depth]
        return min(free, key=lambda lane: busy[lane]) if free else None

    # ------------------------------------------------------------------ endings
    def stop(self) -> None:
        """A clean stop: the lanes get a stop command, the jobs in flight go back to the queue."""
        with self.exit_lock:
            self.stopping = True
            self.thread.join(timeout=5)
            for lane in range(self.lanes):
                self.channel.set(command_key(lane, self.next_n[lane]), {"op": "stop"})
            self.requeue_flights()

    def requeue_flights(self) -> None:
        for seq in list(self.flights):
            self.jobs.requeue(seq)

    def settle_after_failure(self) -> None:
        """Record what the failing rank reported: its job failed, the other jobs in flight requeued."""
        for seq, flight in list(self.flights.items()):
            done = self.channel.get(f"done/{seq}")
            if done is not None and done["ok"]:
                self.jobs.complete(seq, flight.job.video_file, self.timings(flight))
            elif done is not None:
                self.jobs.fail(seq, done["error"])
            else:
                self.jobs.requeue(seq)

    def end_after_failure(self, message: str, code: int) -> None:
        """Settle the jobs, then end like every rank (paradit.generate.report): say why, post it if
        this is the root cause, wait for the others to say it too, exit non-zero."""
        from paradit.generate import report
        self.exit_lock.acquire()  # never released: this process ends here
        self.stopping = True
        try:
            self.settle_after_failure()
        except Exception as err:  # the store is gone: the jobs stay in_progress for recover() to settle
            log.warning("could not read the failing job's report (%s); a restart settles it", err)
        report(code, message, None)


def lora_key(request: dict) -> tuple:
    """A job's LoRA set, comparable: jobs with the same one run without a switch between them."""
    return tuple(tuple(x) for x in request.get("loras") or ())

"""The engine side of the service: what every rank runs, and how commands reach it.

Rank 0's scheduler posts each lane's commands as numbered keys in the job's store (the TCPStore
every rank already shares; an in-process HashStore in a world of one). A lane is the group of
ranks that runs a job together: one data-parallel replica, or the whole two-stage pipeline with
split experts. Idle ranks poll their lane's next key; they never wait inside a collective, so an
idle service never reaches the collective timeout, however long it idles. Ranks report back
through the same store: `progress/SEQ/STAGE` after each denoising step (each round under CHORDS),
`done/SEQ` when the video is written (or why it failed), `mem/RANK` after each job.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from paradit.engine.request import Stopped
from paradit.outputs import Outputs
from paradit.serve.images import load_stored
from paradit.serve.schema import settings_of

log = logging.getLogger("paradit")
POLL_S = 0.05


class Channel:
    """JSON values under paradit/serve/ in a store shared by every rank."""

    def __init__(self, store=None):
        base = store if store is not None else (
            dist.distributed_c10d._get_default_store() if dist.is_initialized() else dist.HashStore())
        self.store = dist.PrefixStore("paradit/serve/", base)

    def set(self, key: str, value) -> None:
        self.store.set(key, json.dumps(value))

    def set_once(self, key: str, value) -> bool:
        """Set key unless it exists (the first report of a failure wins); True if this one was set."""
        text = json.dumps(value)
        return self.store.compare_set(key, "", text).decode() == text

    def get(self, key: str):
        """The value, or None if the key is not there."""
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def delete(self, *keys: str) -> None:
        for k in keys:
            self.store.delete_key(k)

    def commands(self, lane: int):
        """The commands of a lane, in order, until a stop (polling; never a collective)."""
        n = 0
        while True:
            key = command_key(lane, n)
            while not self.store.check([key]):
                time.sleep(POLL_S)
            cmd = json.loads(self.store.get(key))
            if cmd["op"] == "stop":
                return
            yield cmd
            n += 1


def command_key(lane: int, n: int) -> str:
    return f"lane{lane}/cmd{n}"


class JobCancelled(Stopped):
    """The running job was cancelled (DELETE): raised on every rank of the stage running it, at the
    same step (with split experts the driver then ends it on both stages: paradit.engine.split)."""


class Worker:
    """One rank's part of the service: take the lane's jobs, run them through the pipeline, write
    the videos atomically into the state directory (from the output rank), report to the store."""

    def __init__(self, pipe, channel: Channel, state_dir: Path, save_latents: bool = False, chords=None,
                 lora_dir: Path | None = None, lora_base: list | None = None):
        self.pipe, self.channel, self.dir, self.save_latents = pipe, channel, Path(state_dir), save_latents
        self.chords = chords   # the server's CHORDS settings (--chords): every job solves with them
        mesh = pipe.mesh
        self.split = mesh.split is not None
        self.stage = mesh.coords["stage"]
        self.lane = 0 if self.split else mesh.rank("dp")
        # the first rank of each stage of the lane reports its steps; the output rank the result
        self.reporter = mesh.roles.leads
        self.current: dict | None = None   # the command this rank is working on
        self.steps: list[float] = []
        self.boundaries = ("step", 0)      # the current job's step boundaries: their unit and count
        self.jobs = self.requests()        # one iterator of the lane's commands, across cancelled jobs
        self.lora_dir, self.switch_s = lora_dir, 0.0   # --lora-dir: per-request LoRA sets, switched per job
        self.lora_sets = None
        if lora_dir is not None:
            from paradit.models.lora_sets import LoraSets
            self.lora_sets = LoraSets(pipe.experts, pipe.cfg, lora_base)   # base weights: read back, or copied
        pipe.on_step = self.on_step

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    def run(self) -> None:
        """Serve until rank 0 posts a stop. A cancelled job leaves the pipeline at a step boundary (every
        rank of the lane at the same one); the lane then takes its next command (split experts go on
        inside the driver, which ends the job on both stages)."""
        while True:
            try:
                self.pipe.stream(self.jobs, on_done=lambda i, latent, _: self.finish(latent), progress=False,
                                 chords=self.chords)
                return
            except JobCancelled:
                pass

    def requests(self):
        """The lane's commands as the pipeline's requests, taken as this rank is ready for the next
        (with split experts the low stage then waits for each hand-off in the store, never in a
        receive: paradit.parallel.stages.HandoffSignal)."""
        for cmd in self.channel.commands(self.lane):
            self.begin(cmd)
            r = cmd["request"]
            image = load_stored(self.dir, r["image"]) if r.get("image") else None   # the same file on every rank
            if self.lora_sets is not None:   # every rank of the lane, before the job's first step
                self.switch_s = self.lora_sets.switch(self.lora_specs(r))
            yield r["prompt"], r["negative_prompt"], settings_of(r), image

    def begin(self, cmd: dict) -> None:
        self.report_memory()  # after the previous job
        self.current, self.steps, self.first_step_at = cmd, [], None
        self.boundaries = self.boundaries_of(cmd["request"]["steps"])

    def boundaries_of(self, steps: int) -> tuple[str, int]:
        """The step boundaries of a job of `steps` steps, where it reports progress and may be cancelled:
        its sampler steps, or under CHORDS its rounds (at most: a residual stop may end it sooner)."""
        return ("step", steps) if self.chords is None else ("round", self.chords.max_rounds(steps))

    def on_step(self, i: int, seconds: float) -> None:
        """After sampler step i (CHORDS round i) on every rank of the request group: cancel, progress."""
        self.check_cancelled(i)
        if not (self.reporter and self.current):
            return
        now = time.time()
        self.first_step_at = self.first_step_at or now - seconds
        self.steps.append(seconds)
        self.channel.set(f"progress/{self.current['seq']}/{self.stage}",
                         {"step": i + 1, "of": self.boundaries[1], "start": self.first_step_at, "end": now,
                          "step_s": self.steps})

    def lora_specs(self, request: dict) -> tuple:
        from paradit.models.lora import LoraSpec
        return tuple(LoraSpec(self.lora_dir / f"{name}.safetensors", scale, expert)
                     for name, scale, expert in request.get("loras") or ())

    def check_cancelled(self, i: int) -> None:
        """At a step boundary (a sampler step, or a CHORDS round): whether the job was cancelled, agreed
        over the request group (the lane, every CHORDS core of it included, or with split experts the
        stage running the job: any rank that has seen the cancel key stops them all, at this same
        boundary). The stage's first rank reports it; then JobCancelled on every rank."""
        if self.current is None:
            return
        seq = self.current["seq"]
        seen = self.channel.store.check([f"cancel/{seq}"])
        group = self.pipe.request_group
        if group is not None and dist.get_world_size(group) > 1:
            flag = torch.tensor([1 if seen else 0], device=self.pipe.mesh.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            seen = bool(flag.item())
        if not seen:
            return
        unit, count = self.boundaries
        stop = JobCancelled(f"cancelled at {unit} {i + 1} of {count}")
        if self.reporter:
            self.channel.set_once(f"done/{seq}", {"ok": False, "cancelled": True, "rank": self.rank,
                                                  "error": str(stop)})
        self.current = None
        raise stop

    def finish(self, latent: torch.Tensor) -> None:
        """Decode (every rank of the decode group) and, on the output rank, write and report."""
        cmd, t0 = self.current, time.time()
        video = self.pipe.decode(latent)
        if self.pipe.mesh.is_output_rank:
            try:
                self.write(cmd, video, latent)
            except (OSError, SafetensorError) as err:  # a full disk: the job fails with the reason, the service goes on
                self.channel.set(f"done/{cmd['seq']}", {"ok": False, "rank": self.rank, "error": (
                    f"its video could not be written under {self.dir} ({type(err).__name__}: {err})")})
            else:
                self.channel.set(f"done/{cmd['seq']}", {"ok": True, "decode_s": time.time() - t0, "rank": self.rank,
                                                        "lora_switch_s": self.switch_s})
        self.current = None

    def write(self, cmd: dict, video: torch.Tensor, latent: torch.Tensor) -> None:
        """The video, its sidecar and its latent: all of them or none."""
        path, out = self.dir / cmd["file"], Outputs()
        try:
            out.video(path, video.numpy(), self.pipe.cfg.fps)
            if self.save_latents:
                out.tensors(path.with_suffix(".latent.safetensors"), {"latent": latent})
            cache = self.pipe.record.cache   # the step cache: skipped steps, evaluations saved
            out.json(path.with_suffix(".json"), {"id": cmd["id"], "request": cmd["request"],
                                                 "layout": self.pipe.runtime.describe(),
                                                 "cache": cache.as_dict() if cache else None})
            out.commit()
        finally:
            out.discard()

    def report_memory(self) -> None:
        dev = self.pipe.mesh.device
        cuda = dev.type == "cuda"
        self.channel.set(f"mem/{self.rank}", {"allocated": torch.cuda.memory_allocated(dev) if cuda else 0,
                                              "peak": torch.cuda.max_memory_allocated(dev) if cuda else 0})

    def report_failure(self, message: str) -> None:
        """Mark the job this rank was running failed (first report wins), before the service ends."""
        if self.current is not None:
            self.channel.set_once(f"done/{self.current['seq']}", {"ok": False, "error": message, "rank": self.rank})

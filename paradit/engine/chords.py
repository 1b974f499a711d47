"""The CHORDS driver: K cores, each core a whole (cfg x ring x ulysses) group of the mesh.

Every rank runs the same pure controller (paradit.schedulers.chords.Chords) on its own token
shard; there is no master. In a round, the core groups active in that round evaluate their points
in parallel and the velocities are exchanged over the chords axis (each rank only with the ranks
holding the same token shard). The controller is deterministic, so every rank already holds every
core's x: only v travels. With a chords degree of 1 the K cores are evaluated in turn on the same
ranks (the single-process emulation), which computes the same hits. The one value-dependent choice,
a residual stop, is taken from the whole latent's residual, summed over the request group to the same
bits on every rank (whole_sums): a rank deciding from its own shard could stop while the others ran
on into the next round's collectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from paradit.engine.denoiser import Denoiser
from paradit.engine.request import Request
from paradit.parallel.collectives import agreed_sum, all_gather_equal
from paradit.schedulers import wan_sigmas, wan_timesteps
from paradit.schedulers.chords import Chords
from paradit.settings import ChordsSettings


@dataclass
class ChordsReport:
    init: list[int]
    rounds: int = 0
    nfe: int = 0
    hits: list[dict] = field(default_factory=list)

    def as_dict(self, steps: int) -> dict:
        return {"init": self.init, "rounds": self.rounds, "nfe": self.nfe, "sequential_nfe": steps,
                "ideal_speedup": steps / max(1, self.rounds), "hits": self.hits}


def chords_denoise(den: Denoiser, req: Request, settings: ChordsSettings, on_hit=None) -> torch.Tensor:
    """Solve req with CHORDS; returns the last hit's full latent [C, F, H, W] fp32 and leaves a
    ChordsReport in req.record.chords. on_hit(hit, latent) sees every hit (preview included) as it
    arrives; every rank calls it together (the latent is gathered over the sp group)."""
    s, mesh = req.settings, den.mesh
    x, space = den.initial_tokens(req)
    init = settings.resolve_init(s.steps)
    ch = Chords(wan_sigmas(s.steps, s.shift), init)
    plan, ts = ch.schedule(), wan_timesteps(s.steps, s.shift).tolist()
    my_core = mesh.rank("chords") if mesh.size("chords") > 1 else None
    group, traffic = mesh.group("chords"), den.runtime.traffic
    state = {"round": 0}

    cache = den.step_cache(req, trajectories=len(init))      # the step cache (or None): one trajectory per core

    def evaluate(pos: int, core: int, index: int, xi: torch.Tensor, skips: list[bool]) -> torch.Tensor:
        t = ts[index]
        if skips[pos]:                                         # served from the step cache
            den.skip(req, t)
            return cache.reuse(core)
        assert den.experts[den.expert_for(t)] is not None, f"core needs the expert of t={t}, not loaded here"
        return den.velocity(req, xi, t, space.grid, f"CHORDS round {state['round']} step {index}")

    def velocity(points):
        pairs = plan[state["round"]]                           # [(core, index)] of this round
        state["round"] += 1
        with den.boundary(f"round{state['round']}", state["round"] - 1):   # on every rank: the server's cancel
            vs = round_velocities(pairs, points)
        return vs

    def round_velocities(pairs, points):
        assert [i for _, i in pairs] == [i for i, _ in points], "controller left the static schedule"
        # every rank decides every core's step, from the same numbers (one reduction a round)
        skips = cache_plan(cache, req, pairs, points, den, ts) if cache else [False] * len(points)
        if my_core is None:                                    # emulation: every core in turn
            vs = [evaluate(pos, core, i, xi, skips) for pos, ((core, _), (i, xi)) in enumerate(zip(pairs, points))]
        else:
            pos = next((p for p, (core, _) in enumerate(pairs) if core == my_core), None)
            v = (evaluate(pos, my_core, *points[pos], skips) if pos is not None
                 else torch.zeros_like(points[0][1], dtype=torch.float32))   # not spawned yet, or retired
            gathered = all_gather_equal(v.float(), group, traffic)   # one v per core group
            vs = [gathered[core] for core, _ in pairs]
        if cache:                                              # every rank keeps every core's cache
            for (core, _), (_, xi), v, skipped in zip(pairs, points, vs, skips):
                cache.update(core, xi, v, skipped)
        return vs

    report = req.record.chords = ChordsReport(init=init)
    hits = []
    for hit in ch.run(velocity, x, stop=settings.stop, distance=lambda d: whole_residual(d, mesh, traffic)):
        report.rounds, report.nfe = hit.round, hit.nfe
        report.hits.append({"core": hit.core, "round": hit.round, "nfe": hit.nfe, "preview": hit.preview,
                            "ideal_speedup": s.steps / hit.round})
        hits.append(hit.x)
        if on_hit is not None:
            on_hit(hit, space.to_latent(hit.x))
    for entry, dist in zip(report.hits, hit_distances(hits, mesh, traffic)):
        entry["rms_from_last"] = dist
    return space.to_latent(hits[-1])


def cache_plan(cache, req: Request, pairs, points, den: Denoiser, ts: list[int]) -> list[bool]:
    """The step cache's decision for each core's point of a round, recorded in req.record.cache."""
    experts = [den.expert_for(ts[i]) for _, i in pairs]
    skips = cache.plan([(core, i, k, xi) for (core, i), k, (_, xi) in zip(pairs, experts, points)])
    report = req.record.cache
    report.evaluations += len(pairs)
    for (core, i), k, skipped in zip(pairs, experts, skips):
        if skipped:
            report.skip(i, ts[i], k, core)
    return skips


def whole_sums(shards: list[torch.Tensor], mesh, traffic=None) -> list[tuple[float, float]]:
    """(sum of squares, element count) of each token-space tensor, of which this rank holds one token
    shard, over the whole latent (each shard counted once over the request group) in float64: the same
    bits on every rank, so that a decision taken from them (a residual stop) is the same everywhere.
    One collective; every rank of the request calls it together."""
    local = torch.zeros(len(shards), 2, dtype=torch.float64, device=mesh.device)
    if mesh.counts_shard:
        for row, d in enumerate(shards):
            local[row, 0], local[row, 1] = d.double().pow(2).sum(), d.numel()
    return [tuple(row) for row in agreed_sum(local, mesh.group("request"), traffic).tolist()]


def whole_residual(diff: torch.Tensor, mesh, traffic=None) -> float:
    """A residual stop's distance (paradit.schedulers.chords.residual) of the whole latent, of which
    diff is this rank's token shard: the same number one device computes, the same bits on every rank."""
    squares, numel = whole_sums([diff], mesh, traffic)[0]
    return math.sqrt(squares) / numel


def hit_distances(hits: list[torch.Tensor], mesh, traffic=None) -> list[float]:
    """RMS distance of every hit's latent from the last one, over the whole latent."""
    ref = hits[-1].double()
    sums = whole_sums([h.double() - ref for h in hits], mesh, traffic)
    return [math.sqrt(squares / numel) for squares, numel in sums]

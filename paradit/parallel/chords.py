"""CHORDS runtime: K cores, each core a whole (cfg x ring x ulysses) group of the mesh.

Every rank runs the same pure controller (paradit.schedulers.chords.Chords) on its own token
shard; there is no master. In a round, the core groups active in that round evaluate their points
in parallel and the velocities are exchanged over the chords axis (each rank only with the ranks
holding the same token shard). The controller is deterministic, so every rank already holds every
core's x: only v travels. With a chords degree of 1 the K cores are evaluated in turn on the same
ranks (the single-process emulation), which computes the same hits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from paradit.launch.faults import maybe_fail
from paradit.parallel.collectives import all_gather_equal
from paradit.schedulers import wan_sigmas, wan_timesteps
from paradit.schedulers.chords import Chords, Hit, init_sequence, validate_init

log = logging.getLogger("paradit")


@dataclass(frozen=True)
class ChordsSettings:
    cores: int
    init: tuple[int, ...] | None = None   # None: the default rule for (cores, steps)
    stop: int | float | None = 1          # hit count m, residual tau, or None (run to the exact result)

    def resolve_init(self, steps: int) -> list[int]:
        if self.cores > steps:
            raise ValueError(f"--chords {self.cores} needs at least as many steps; got --steps {steps}")
        init = list(self.init) if self.init is not None else init_sequence(self.cores, steps)
        return validate_init(init, steps, self.cores)

    def validate(self, steps: int, mesh_cores: int) -> None:
        """Everything checkable before weights load; ValueError with the fix."""
        if mesh_cores not in (1, self.cores):
            raise ValueError(f"the mesh has chords={mesh_cores} core groups but --chords asks for "
                             f"{self.cores} cores; give the same number (or run the cores in turn "
                             f"on one group with --chords {self.cores} and no chords axis)")
        self.resolve_init(steps)
        Chords(wan_sigmas(steps, 5.0), self.resolve_init(steps)).rounds_for(self.stop)  # checks stop


@dataclass
class ChordsReport:
    init: list[int]
    rounds: int = 0
    nfe: int = 0
    hits: list[dict] = None

    def as_dict(self, steps: int) -> dict:
        return {"init": self.init, "rounds": self.rounds, "nfe": self.nfe, "sequential_nfe": steps,
                "ideal_speedup": steps / max(1, self.rounds), "hits": self.hits}


def chords_denoise(pipe, settings: ChordsSettings, s, x: torch.Tensor, cond, uncond, grid, on_hit=None):
    """Run CHORDS on this rank's token shard x; returns (final shard, ChordsReport).

    on_hit(hit, x_shard) is called for every hit (preview included) as it arrives.
    """
    mesh = pipe.mesh
    init = settings.resolve_init(s.steps)
    sigmas, ts = wan_sigmas(s.steps, s.shift), wan_timesteps(s.steps, s.shift).tolist()
    ch = Chords(sigmas, init)
    plan = ch.schedule()
    my_core = mesh.rank("chords") if mesh.size("chords") > 1 else None
    group = mesh.group("chords")
    state = {"round": 0}

    def evaluate(index: int, xi: torch.Tensor) -> torch.Tensor:
        t = ts[index]
        assert pipe.experts[pipe.expert_for(t)] is not None, f"core needs the expert of t={t}, not loaded here"
        return pipe.velocity(s, xi, t, cond, uncond, grid, f"CHORDS round {state['round']} step {index}")

    def velocity(points):
        pairs = plan[state["round"]]                           # [(core, index)] of this round
        state["round"] += 1
        maybe_fail(f"round{state['round']}")
        assert [i for _, i in pairs] == [i for i, _ in points], "controller left the static schedule"
        if my_core is None:                                    # emulation: every core in turn
            return [evaluate(i, xi) for i, xi in points]
        active = {core: pos for pos, (core, _) in enumerate(pairs)}
        if my_core in active:
            v = evaluate(*points[active[my_core]])
        else:                                                  # not spawned yet, or retired
            v = torch.zeros_like(points[0][1], dtype=torch.float32)
        vs = all_gather_equal(v.float(), group)                # one v per core group
        return [vs[core] for core, _ in pairs]

    report = ChordsReport(init=init, hits=[])
    hits = []
    for hit in ch.run(velocity, x, stop=settings.stop):
        report.rounds, report.nfe = hit.round, hit.nfe
        report.hits.append({"core": hit.core, "round": hit.round, "nfe": hit.nfe, "preview": hit.preview,
                            "ideal_speedup": s.steps / hit.round})
        hits.append(hit.x)
        if on_hit is not None:
            on_hit(hit, hit.x)
    for entry, dist in zip(report.hits, hit_distances(hits)):
        entry["rms_from_last"] = dist  # of this rank's shard; the shards are equal-sized samples
    return hits[-1], report


def chords_layout(settings: ChordsSettings | None, world: int, inner: int) -> int:
    """The mesh's chords degree: one core group per core if the world has room, else 1 (in turn)."""
    if settings is None or settings.cores == 1 or world == inner:
        return 1
    if world == inner * settings.cores:
        return settings.cores
    raise ValueError(f"--chords {settings.cores} with a core group of {inner} GPUs needs {inner} "
                     f"(cores in turn) or {inner * settings.cores} processes (one group per core); "
                     f"the world has {world}")


def hit_distances(hits: list[torch.Tensor]) -> list[float]:
    """RMS distance of every hit's latent from the last one."""
    ref = hits[-1].double()
    return [((h.double() - ref).pow(2).mean().sqrt()).item() for h in hits]


__all__ = ["ChordsSettings", "chords_denoise", "hit_distances", "Hit"]

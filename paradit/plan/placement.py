"""Where the work of a layout goes, as pure functions of a ParallelConfig and the step counts.

Experts are numbered 0 (high noise, or a one-expert model's only one) and 1 (low noise). A global
rank's place in the layout is ParallelConfig.coords(rank); nothing here builds a process group, so
the CLI, the loader and the planner ask the same questions before torch is imported, and the
runtime's mesh answers them the same way (tests/test_placement.py checks it against a gloo mesh).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from paradit.errors import ParameterError
from paradit.plan.layout import ParallelConfig, auto_sp
from paradit.schedulers.chords_schedule import core_experts, init_sequence, rounds_for, rounds_to_first_hit


def stage_sizes(world: int, high_steps: int, steps: int) -> tuple[int, int]:
    """GPUs per stage of split experts, in proportion to each stage's steps (T2V-A14B 26:14 -> 5 + 3 of 8)."""
    if world < 2:
        raise ParameterError("experts", "split", f"needs at least 2 processes (one per stage), but the world has "
                             f"{world}", "use", ({"experts": "colocated"},))
    high = min(world - 1, max(1, round(world * high_steps / steps)))
    return high, world - high


def split_layout(num_heads: int, sizes: tuple[int, int], cfg: int = 1) -> ParallelConfig:
    """Split experts with `sizes` GPUs per stage (e.g. stage_sizes' step split), each stage
    cfg-parallel by `cfg` and sequence-parallel over the rest (as much Ulysses as the heads allow)."""
    sizes = tuple(sizes)
    for n in sizes:
        if n % cfg:
            raise ParameterError("cfg", cfg, f"a stage of {n} GPUs (split {'+'.join(map(str, sizes))}) cannot hold "
                                 f"{cfg} CFG-parallel groups", f"give stage sizes divisible by {cfg}, or use",
                                 ({"cfg": 1},))
    return ParallelConfig(experts="split", stages=tuple((*auto_sp(num_heads, n // cfg), cfg) for n in sizes))


# ---------------------------------------------------------------------------------------------
# CHORDS cores


def chords_init(cores: int, steps: int) -> tuple[int, ...] | None:
    """The runtime's default initialisation sequence (the paper's, rescaled; the rule otherwise);
    None when `cores` cannot fit `steps`."""
    return tuple(init_sequence(cores, steps)) if 1 <= cores <= steps else None


def chords_rounds(cores: int, steps: int) -> int | None:
    """Rounds to CHORDS' first hit: (K - 1) + (N - i_{K-1}); `steps` when cores == 1."""
    if cores == 1:
        return steps
    init = chords_init(cores, steps)
    return None if init is None else rounds_to_first_hit(init, steps)


def chords_experts(init: Sequence[int], steps: int, high_steps: int,
                   stop: int | float | None = 1) -> tuple[frozenset[int], ...]:
    """The experts each CHORDS core evaluates until the run stops under `stop` (a hit count m, a
    residual threshold, or None for the whole run): a grid index below high_steps needs the
    high-noise expert, the others the low-noise one. A residual threshold may let any round run."""
    rounds = rounds_for(init, steps, stop)
    return tuple(frozenset(e) for e in core_experts(init, steps, rounds, high_steps))


def experts_needed(config: ParallelConfig, rank: int, steps: int, high_steps: int,
                   init: Sequence[int] | None = None, stop: int | float | None = 1) -> frozenset[int] | None:
    """The experts global rank `rank` runs; None: all of them.

    Split experts: its stage's. CHORDS (init, its initialisation sequence, and stop given): those of
    its core when each core has its own group, of every core when one group runs them in turn.
    """
    if config.stages is not None:
        return frozenset({config.coords(rank)["stage"]})
    if init is None:
        return None
    per_core = chords_experts(init, steps, high_steps, stop)
    return per_core[config.coords(rank)["chords"]] if config.chords > 1 else frozenset().union(*per_core)


# ---------------------------------------------------------------------------------------------
# Roles of a rank in the once-per-request work


@dataclass(frozen=True)
class RankRoles:
    """What a rank does for its request besides denoising."""
    encodes: bool   # encodes the prompt (and the image) and broadcasts them: the request group's first rank
    decodes: bool   # a member of the decode group, which the VAE decode is spread over
    writes: bool    # the output rank: it gets the frames and writes them (one per replica)
    leads: bool = False  # the first of its stage's sp, cfg and chords groups: reports the stage's progress

    @property
    def components(self) -> frozenset[str]:
        """Which of "text_encoder" and "vae" the rank loads (the VAE encodes an I2V image too)."""
        return frozenset({"text_encoder", "vae"} if self.encodes else set()) | (
            {"vae"} if self.decodes else set())


def rank_roles(config: ParallelConfig, rank: int) -> RankRoles:
    """The roles of global rank `rank`: the one definition (the built mesh holds this answer as
    Mesh.roles, and every runtime question about a rank's role reads it there).

    A request is served by one dp replica, or with split experts by the two stages in turn: the
    high-noise stage encodes, the low-noise stage finishes the video. The encoder is the first rank of
    the replica (stage); the decode group is the sequence-parallel group at cfg and chords index 0
    of the last stage, and its first rank writes.
    """
    at = config.coords(rank)
    last_stage = 1 if config.stages is not None else 0
    first_of_stage = all(at[a] == 0 for a in ("ulysses", "ring", "cfg", "chords"))
    decodes = at["stage"] == last_stage and at["cfg"] == 0 and at["chords"] == 0
    return RankRoles(encodes=at["stage"] == 0 and first_of_stage, decodes=decodes,
                     writes=decodes and first_of_stage, leads=first_of_stage)

"""CHORDS: multi-core hierarchical parallel-in-time sampling, as a pure controller.

Han et al., "CHORDS: Diffusion Sampling Accelerator with Multi-core Hierarchical ODE Solvers"
(ICCV 2025, arXiv 2507.15260), which states the algorithm. This file is tensor
arithmetic and bookkeeping only: no torch.distributed, no model. The only contact with a model is
the `velocity(points)` callback, called once per round with every active core's point, so

  * evaluating the points one after another IS the single-process emulation of K cores, and
  * a distributed runtime evaluates a round's points on different GPU groups, exchanges the
    velocities, and runs this same controller on every rank.

The schedule of evaluations is static (it does not depend on the values), so `schedule()`,
`core_indices()` and `hit_rounds()` (paradit.schedulers.chords_schedule, plain Python) say without
running anything which grid indices each core evaluates in each round; `Chords.run` follows exactly
that schedule (tests/test_chords.py checks).

Vocabulary: N grid steps, sigmas[0] > ... > sigmas[N] = 0; K cores, core 0 the slowest (it runs
the exact sequential Euler solve), core K-1 the fastest; init[c] is core c's start index. A round
is one call of velocity() (one parallel batch of NFEs).

Decisions where the paper leaves room (each follows hanjq17/CHORDS, algorithms/chords.py, unless
it says otherwise):
  * Core c+1 is spawned in the round in which core c evaluates its own start point init[c],
    by the coarse jump Phi(x, v, init[c] -> init[c+1]) from that start point (not from core c's
    later, more accurate states). So core c evaluates its first point in round c+1 and index
    init[c] + j in round c+1+j: the schedule is fixed in advance.
  * A spawned core's anchor ("begin") is its start point; its velocity is filled in when the core
    evaluates it (the next round). After a rectification the anchor moves to the rectified point.
  * Core c is rectified when its anchor index equals the index core c-1 evaluated this round. The
    formula reads core c-1's *evaluated* point (x, v at b), never its freshly updated state, so the
    slowest-first update order changes no value; we keep it anyway, as the paper states it.
  * A core is always at or ahead of its slower neighbour on the grid, so cores retire fastest
    first and the neighbour that core c is rectified against always exists while core c runs.
    Cores that reach N in the same round (possible only when init[c+1] == init[c] + 1) are
    reported fastest first; the official code lists them slowest first.
  * The preview ("hit 0") is the coarse jump Phi(x, v, init[K-1] -> N) made when the last core
    evaluates its start point (round K). K=1 has one too: the one-step jump from the noise.
  * stop=tau compares consecutive *real* hits; the official code also compares the first real
    hit with the preview.
  * Controller arithmetic runs in float32, or in the input's dtype if that is wider (float64),
    whatever dtype velocities come back in; the official code does it in bf16.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from paradit.schedulers.chords_schedule import (core_indices, count_nfe, hit_rounds, init_sequence, parse_stop,
                                                rounds_for, rounds_to_first_hit, schedule, validate_init)

Points = list[tuple[int, torch.Tensor]]
Velocity = Callable[[Points], Sequence[torch.Tensor]]

@dataclass(frozen=True, eq=False)
class Hit:
    """One output at grid index N.

    core: the core that produced it. round: how many velocity() calls (rounds) had been made when
    it was produced (1-based). x: the output, in the controller's compute dtype. nfe: total network
    evaluations so far. preview: True for the coarse preview ("hit 0"), False for a real hit (a core
    that reached N by fine steps and rectifications).
    """

    core: int
    round: int
    x: torch.Tensor
    nfe: int
    preview: bool = False


# ---------------------------------------------------------------- the solver and rectification


def phi(x: torch.Tensor, v: torch.Tensor, sigma_a: float, sigma_b: float) -> torch.Tensor:
    """One Euler step of the flow ODE from sigma_a to sigma_b: x + (sigma_b - sigma_a) v."""
    return x + (sigma_b - sigma_a) * v


def rectify(
    x_f: torch.Tensor, v_f: torch.Tensor, x_b: torch.Tensor, v_b: torch.Tensor,
    x_prev: torch.Tensor, v_prev: torch.Tensor, sigma_b: float, sigma_f: float, sigma_next: float,
) -> torch.Tensor:
    """Phi(x_f, v_f, f->f+1) - Phi(x_b, v_b, b->f+1) + Phi(x_prev, v_prev, b->f+1).

    Expanding Phi, the two coarse jumps from b share their step (sigma_{f+1} - sigma_b), so this is
    the fine step plus the slower core's correction at b: (x_prev - x_b) + dt (v_prev - v_b).
    Differences of nearby states are taken first, which loses less than subtracting two full jumps.
    """
    return phi(x_f, v_f, sigma_f, sigma_next) + (x_prev - x_b) + (sigma_next - sigma_b) * (v_prev - v_b)


def residual(diff: torch.Tensor) -> float:
    """The stop rule's distance of two consecutive real hits: ||x_j - x_{j-1}||_2 / numel (the paper's),
    in float64. A runtime that holds one token shard of x passes its own: this one sees only diff."""
    diff = diff.double()
    return diff.pow(2).sum().sqrt().item() / diff.numel()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype if it is wider (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------- the controller


@dataclass
class _Core:
    """One core's mutable state: its pending point, its last evaluated point, its anchor."""

    id: int
    index: int                          # the point waiting for evaluation
    x: torch.Tensor
    begin_index: int                    # anchor: where it was started or last rectified
    begin_x: torch.Tensor
    begin_v: torch.Tensor | None = None
    f_index: int = -1                   # last evaluated point ("finish")
    f_x: torch.Tensor | None = None
    f_v: torch.Tensor | None = None

    def evaluated(self, v: torch.Tensor) -> None:
        self.f_index, self.f_x, self.f_v = self.index, self.x, v
        if self.begin_index == self.index:
            self.begin_v = v


class Chords:
    """The CHORDS controller for one grid and one initialisation sequence.

    sigmas: N+1 noise levels, strictly decreasing, ending in 0 (list or tensor).
    init: K start indices (validated), or an int K for init_sequence(K, N).
    num_cores: if given, init must have exactly this many entries.
    """

    def __init__(self, sigmas: Sequence[float] | torch.Tensor, init: Sequence[int] | int,
                 num_cores: int | None = None):
        if isinstance(sigmas, torch.Tensor):
            sigmas = sigmas.detach().double().cpu().flatten().tolist()
        self.sigmas = [float(s) for s in sigmas]
        n = len(self.sigmas) - 1
        if n < 1:
            raise ValueError(f"sigmas needs N+1 >= 2 noise levels; got {len(self.sigmas)}")
        if self.sigmas[-1] != 0.0 or any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ValueError(
                "sigmas must be strictly decreasing and end in 0 (the full flow schedule, "
                f"e.g. a scheduler's sigmas with the final 0); got {self.sigmas[:3]} ... {self.sigmas[-3:]}"
            )
        if isinstance(init, numbers.Integral) and not isinstance(init, bool):
            if num_cores is not None and num_cores != init:
                raise ValueError(f"init={init} cores disagrees with num_cores={num_cores}; give one K")
            if not 1 <= init <= n:
                raise ValueError(f"K={init} cores needs 1 <= K <= N={n}; use fewer cores or more steps")
            init = init_sequence(int(init), n)
        self.init = validate_init(init, n, num_cores)

    @property
    def num_cores(self) -> int:
        return len(self.init)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def __repr__(self) -> str:
        return f"Chords(N={self.num_steps}, init={self.init})"

    # Static bookkeeping: what run() will evaluate, known before any model runs.

    def schedule(self, rounds: int | None = None) -> list[list[tuple[int, int]]]:
        return schedule(self.init, self.num_steps, rounds)

    def core_indices(self, rounds: int | None = None) -> list[set[int]]:
        return core_indices(self.init, self.num_steps, rounds)

    def hit_rounds(self) -> list[tuple[int, int]]:
        return hit_rounds(self.init, self.num_steps)

    def rounds_to_first_hit(self) -> int:
        return rounds_to_first_hit(self.init, self.num_steps)

    def preview_round(self) -> int:
        return self.num_cores

    def nfe(self, rounds: int | None = None) -> int:
        return count_nfe(self.init, self.num_steps, rounds)

    def rounds_for(self, stop: int | float | None) -> int | None:
        """Rounds run() makes under `stop`; None for a residual threshold (data-dependent)."""
        return rounds_for(self.init, self.num_steps, stop)

    # The run.

    def run(self, velocity: Velocity, x: torch.Tensor, stop: int | float | None = None,
            distance: Callable[[torch.Tensor], float] = residual) -> Iterator[Hit]:
        """Solve from x at sigmas[0]; yield hits as they appear (see the module docstring).

        velocity(points) gets [(index, x), ...], one pair per active core, core order (slowest
        first), x in the compute dtype, and returns their velocities in the same order.
        stop: None (until core 0 reaches N: its hit is sequential Euler), int m (after the m-th
        real hit), float tau (when ||x_j - x_{j-1}||_2 / numel < tau for consecutive real hits).
        distance(x_j - x_{j-1}): that residual; a runtime whose x is one token shard gives the whole
        latent's, the same number on every rank, or its ranks would stop after different hits.
        """
        max_hits, tau = parse_stop(stop, self.num_cores)
        dtype = compute_dtype(x.dtype)
        x = x.to(dtype)
        cores = [_Core(0, 0, x, 0, x)]
        rounds = nfe = real_hits = 0
        last_real: torch.Tensor | None = None
        while cores:
            points = [(core.index, core.x) for core in cores]
            vs = list(velocity(points))
            if len(vs) != len(points):
                raise ValueError(f"velocity() returned {len(vs)} velocities for {len(points)} points")
            rounds += 1
            nfe += len(points)
            for core, v in zip(cores, vs):
                if v.shape != core.x.shape:
                    raise ValueError(
                        f"velocity() returned shape {tuple(v.shape)} for x of shape {tuple(core.x.shape)}"
                    )
                core.evaluated(v.to(dtype))
            preview = self._update(cores)
            if preview is not None:
                yield Hit(self.num_cores - 1, rounds, preview, nfe, preview=True)
            while cores and cores[-1].index == self.num_steps:  # fastest cores sit at the tail
                core = cores.pop()
                real_hits += 1
                done = real_hits >= max_hits
                if tau is not None and last_real is not None:
                    done = done or distance(core.x - last_real) < tau
                last_real = core.x
                yield Hit(core.id, rounds, core.x, nfe)
                if done:
                    return

    def _update(self, cores: list[_Core]) -> torch.Tensor | None:
        """Advance every evaluated core one grid step, slowest first; return the preview if made."""
        s, init, preview = self.sigmas, self.init, None
        for pos in range(len(cores)):  # a core spawned in this loop is appended and not advanced
            core = cores[pos]
            f = core.f_index
            if pos == len(cores) - 1 and f == init[core.id]:  # newest core, just evaluated its start
                if core.id + 1 < self.num_cores:
                    nxt = init[core.id + 1]
                    x_new = phi(core.f_x, core.f_v, s[f], s[nxt])
                    cores.append(_Core(core.id + 1, nxt, x_new, nxt, x_new))
                else:
                    preview = phi(core.f_x, core.f_v, s[f], s[self.num_steps])
            prev = cores[pos - 1] if pos > 0 else None
            if prev is not None and core.begin_index == prev.f_index:
                b = core.begin_index
                assert core.begin_v is not None and prev.f_index == b
                x_next = rectify(core.f_x, core.f_v, core.begin_x, core.begin_v,
                                 prev.f_x, prev.f_v, s[b], s[f], s[f + 1])
                core.begin_index, core.begin_x, core.begin_v = f + 1, x_next, None
            else:
                x_next = phi(core.f_x, core.f_v, s[f], s[f + 1])
            core.index, core.x = f + 1, x_next
        return preview

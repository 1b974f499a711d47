"""The step cache: a denoising step that would barely change the transformer's output reuses the
last computed one, decided the same way on every rank of the request.

Method "easy" is EasyCache's runtime-adaptive rule (Zhou et al., "Less is Enough: Training-Free
Video Diffusion Acceleration via Runtime-Adaptive Caching", arXiv 2507.02860). It needs nothing
per checkpoint: TeaCache's rescaling polynomial and MagCache's magnitude-ratio curve are fitted
or recorded once per model, and none exists for the two Wan2.2 A14B experts; EasyCache measures
what it needs as the run goes:

  k    = mean|v_c - v_c'| / mean|x_c - x_c'|   the transformation rate: output change per input
                                               change between the last two computed steps c', c
  e_i  = k * mean|x_i - x_{i-1}| / mean|v_c|    the predicted relative change of the output at step i
  skip step i while e_(c+1) + ... + e_i < threshold, reusing v_c; at or above it, compute, and
  start the sum again.

What a skipped step reuses departs from EasyCache, which adds the last residual to the new input,
v_i = x_i + (v_c - x_c). Wan is a flow-matching model: its output is the velocity eps - x0, constant
along a straight path, while x_i - x_c = (sigma_i - sigma_c) v_c is a step's worth of drift added to
it. Reusing v_c itself measured 2-5 dB PSNR better at equal savings on the demo model (24 and 40
steps, thresholds 0.05-0.3), and needs no input at all.

Every quantity is a sum of absolute values over the latent (the means' element counts cancel), so
over token shards it is a sum of per-shard sums: each step all-gathers four numbers per trajectory
over the request group (paradit.parallel.collectives.agreed_sum) and every rank takes the same
decision from the same bits. Ranks that hold a copy of a shard another rank already counts (the
second CFG group, CHORDS core groups other than the first) add zeros.

The cache works on the guided velocity v = v_u + g (v_c - v_u): reusing each branch's output and
combining them again gives the same v, from one stored tensor instead of two; cond and uncond skip
together by construction (EasyCache decides on the cond branch; here the guided output decides).

Per expert: nothing cached crosses the expert switch. A new expert's first step is computed, and
its second too (the rate needs two computed steps of that expert); so are the first `warmup` steps
and the last one. A trajectory is a sequential run, or one CHORDS core: the cores' points are
decided together, one reduction per round.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paradit.parallel.collectives import agreed_sum
from paradit.settings import CacheSettings

STATS = 4   # per trajectory: |x_i - x_prev|, then from the last compute |v_c - v_c'|, |x_c - x_c'|, |v_c|


@dataclass
class CacheReport:
    """What the cache did in one request: every skipped step and the evaluations it saved."""
    settings: CacheSettings
    evaluations: int = 0                                # the evaluations the request would have made
    skipped: list[dict] = field(default_factory=list)   # {"step", "t", "expert"[, "core"]}

    def skip(self, step: int, t: int, expert: int, core: int | None = None) -> None:
        self.skipped.append({"step": step, "t": int(t), "expert": expert} | ({} if core is None else {"core": core}))

    def as_dict(self) -> dict:
        saved = len(self.skipped)
        return {"method": self.settings.method, "threshold": self.settings.threshold,
                "warmup": self.settings.warmup, "evaluations": self.evaluations,
                "computed": self.evaluations - saved, "saved": saved,
                "saved_fraction": saved / max(1, self.evaluations), "skipped": self.skipped}


@dataclass
class _Trajectory:
    """EasyCache's state for one trajectory (tensors: this rank's token shard)."""
    expert: int | None = None
    x_prev: torch.Tensor | None = None   # the input of the last step, computed or not
    x_c: torch.Tensor | None = None      # input and output of the last computed step
    v_c: torch.Tensor | None = None
    pending: torch.Tensor | None = None  # local sums from the last computed step, reduced at the next
    paired: bool = False                 # pending holds a rate (two computed steps of one expert)
    k: float | None = None
    norm: float = 0.0                    # sum |v_c| over the request
    acc: float = 0.0


class StepCache:
    """The cache of one request's steps on this rank. trajectories: 1, or the CHORDS cores.

    Per step: skips = plan(points) -- collective over the request group; then each point's velocity,
    computed, or reuse() where skipped; then update() with every point's velocity."""

    def __init__(self, settings: CacheSettings, steps: int, mesh, traffic=None, trajectories: int = 1):
        self.settings, self.last = settings, steps - 1
        self.group, self.device, self.traffic = mesh.group("request"), mesh.device, traffic
        self.counted = mesh.counts_shard   # one copy of each token shard
        self.paths = [_Trajectory() for _ in range(trajectories)]

    def plan(self, points: list[tuple[int, int, int, torch.Tensor]]) -> list[bool]:
        """points: (trajectory, step index, expert, x) -> whether each step reuses. Every rank of the
        request calls it together, with the same trajectories, steps and experts."""
        local = torch.zeros(len(points), STATS, dtype=torch.float64, device=self.device)
        if self.counted:
            for row, (j, _, _, x) in enumerate(points):
                tr = self.paths[j]
                if tr.x_prev is not None:
                    local[row, 0] = _abs_sum(x - tr.x_prev)
                if tr.pending is not None:
                    local[row, 1:] = tr.pending
        totals = agreed_sum(local, self.group, self.traffic).tolist()
        return [self._decide(self.paths[j], i, k, tot) for (j, i, k, _), tot in zip(points, totals)]

    def _decide(self, tr: _Trajectory, i: int, expert: int, tot: list[float]) -> bool:
        if tr.pending is not None:      # the last computed step's numbers, now summed over the request
            tr.norm = tot[3]
            if tr.paired:
                tr.k = tot[1] / tot[2] if tot[2] > 0 else float("inf")
            tr.pending, tr.paired = None, False
        if expert != tr.expert:         # nothing crosses the expert switch
            tr.expert, tr.k, tr.x_c, tr.v_c = expert, None, None, None
        forced = i < self.settings.warmup or i >= self.last or tr.k is None or tr.v_c is None
        if forced or not tr.norm > 0:
            tr.acc = 0.0
            return False
        tr.acc += tr.k * tot[0] / tr.norm
        if tr.acc < self.settings.threshold:
            return True
        tr.acc = 0.0
        return False

    def reuse(self, j: int) -> torch.Tensor:
        """The velocity of a skipped step of trajectory j: the last computed one (a copy: samplers
        keep their inputs)."""
        return self.paths[j].v_c.clone()

    def update(self, j: int, x: torch.Tensor, v: torch.Tensor, skipped: bool) -> None:
        """After the step: its input x and velocity v (computed, or reused where skipped)."""
        tr = self.paths[j]
        if not skipped:
            pending = torch.zeros(STATS - 1, dtype=torch.float64, device=self.device)
            tr.paired = tr.v_c is not None
            if tr.paired:
                pending[0], pending[1] = _abs_sum(v - tr.v_c), _abs_sum(x - tr.x_c)
            pending[2] = _abs_sum(v)
            tr.pending, tr.x_c, tr.v_c = pending, x, v
        tr.x_prev = x


def _abs_sum(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sum(dtype=torch.float64)

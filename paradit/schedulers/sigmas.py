"""The Wan flow-matching noise schedule: float sigmas for the solver, integer timesteps for the model.

Flow path: x_sigma = (1 - sigma) * x0 + sigma * noise, sigma from ~1 (noise) down to 0 (data).

How the original Wan builds it (wan/utils/fm_solvers_unipc.py, scheduler created with shift=1,
then set_timesteps(N, shift=shift)):
    sigma_max = float32(1 - 1/1000)                    # its base table is a float32 tensor
    s         = numpy.linspace(sigma_max, 0, N + 1)[:-1]  # float64
    sigma     = shift * s / (1 + (shift - 1) * s)
    timestep  = int64(sigma * 1000)                    # truncated, from the float64 values
    sigmas    = [sigma..., 0]                          # then stored as float32

What we found checking this against WAN_SPEC's facts (T2V-A14B 40 steps shift 12 starts
999, 997, 995, 993, 990, 988 and has 26 steps at t >= 875; I2V-A14B 40 steps shift 5 has 15 at
t >= 900): the literal formula with 0.999 gives those facts as well. sigma_max = float32(0.999)
= 0.99900001287 differs from 0.999 in the timesteps only where sigma * 1000 lands on an integer,
which in practice is shift = 1 (N = 3: 999, 666, 333 vs 999, 665, 332). We follow the original (float32 sigma_max,
numpy linspace, the same expression order) so timesteps match it bit for bit.
We keep the sigmas in float64 and do not round them to float32 as the original does: rounding
would make int(1000 * sigma) differ from the timesteps in rare cases (e.g. N=109, shift=12.5), so
`set_timesteps(sigmas=wan_sigmas(N, shift))` would no longer reproduce `set_timesteps(N)`. The
difference is below 6e-8 relative, far under what a bf16 model resolves.

diffusers' UniPCMultistepScheduler(use_flow_sigmas=True) starts from linspace(1, 1/1000, N + 1)
instead, so its schedule differs (40 steps, shift 12: t starts 1000, 997, ...); give it our sigmas
to compare the solvers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def wan_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas float64 [steps + 1] ending in 0, timesteps int64 [steps]) of the original Wan sampler."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}; Wan releases use 40 or 50")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}; Wan uses 12.0 (T2V-A14B) or 5.0 (most others)")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps!r}; Wan uses 1000")
    # float32, as the original's base table: float32(0.999) = 0.99900001287 (see the module docstring).
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]  # float64 [N]
    s = shift * s / (1 + (shift - 1) * s)  # same expression order as the original: same bits
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]))  # float64 [N + 1]
    return sigmas, sigmas_to_timesteps(sigmas, num_train_timesteps)


def wan_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """float64 [steps + 1]: the Wan sigmas, decreasing from ~0.999 to a final 0."""
    return wan_schedule(steps, shift, num_train_timesteps)[0]


def wan_timesteps(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """int64 [steps]: the integer timesteps the model sees, int(1000 * sigma) truncated."""
    return wan_schedule(steps, shift, num_train_timesteps)[1]


def sigmas_to_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """int64 [N] from float sigmas [N + 1]: truncation toward zero, as the original's int64 cast."""
    return (sigmas[:-1].to(torch.float64) * num_train_timesteps).to(torch.int64)


def check_sigmas(sigmas: Sequence[float] | torch.Tensor, *, below_one: bool) -> torch.Tensor:
    """Validate user sigmas (N + 1 values, strictly decreasing, ending in 0); float64 CPU copy."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).clone()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D sequence of N + 1 >= 2 values ending in 0, got shape {tuple(s.shape)}; "
            "e.g. wan_sigmas(steps, shift)"
        )
    if not bool(torch.isfinite(s).all()):
        raise ValueError("sigmas must be finite")
    if float(s[-1]) != 0.0:
        raise ValueError(
            f"sigmas must end in 0 (N + 1 values, the last step lands on data), got last {float(s[-1])}; append 0"
        )
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (noise to data); sort descending and drop repeats")
    top = float(s[0])
    if top > 1.0 or (below_one and top >= 1.0):
        raise ValueError(
            f"sigmas[0] = {top} is out of range: UniPC needs sigma < 1 (log(1 - sigma) is -inf at 1), "
            "Euler sigma <= 1; start at 0.999 as Wan does"
        )
    return s

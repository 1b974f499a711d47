"""The Wan flow-matching noise schedule: float sigmas for the solver, integer timesteps for the model.

Plain Python, no torch (the planner and the CLI's checks use it); paradit.schedulers.sigmas gives
the same values as tensors.

Flow path: x_sigma = (1 - sigma) * x0 + sigma * noise, sigma from ~1 (noise) down to 0 (data).

How the original Wan builds it (wan/utils/fm_solvers_unipc.py, scheduler created with shift=1,
then set_timesteps(N, shift=shift)):
    sigma_max = float32(1 - 1/1000)                    # its base table is a float32 tensor
    s         = numpy.linspace(sigma_max, 0, N + 1)[:-1]  # float64
    sigma     = shift * s / (1 + (shift - 1) * s)
    timestep  = int64(sigma * 1000)                    # truncated, from the float64 values
    sigmas    = [sigma..., 0]                          # then stored as float32

What we found checking this against the original schedule's facts (T2V-A14B 40 steps shift 12 starts
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

import struct


def wan_sigma_list(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """The sigmas [steps + 1] of the original Wan sampler, decreasing from ~0.999 to a final 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}; Wan releases use 40 or 50")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}; Wan uses 12.0 (T2V-A14B) or 5.0 (most others)")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps!r}; Wan uses 1000")
    # float32, as the original's base table: float32(0.999) = 0.99900001287 (see the module docstring).
    sigma_max = struct.unpack("f", struct.pack("f", 1.0 - 1.0 / num_train_timesteps))[0]
    step = (0.0 - sigma_max) / steps
    s = [i * step + sigma_max for i in range(steps)]  # numpy.linspace(sigma_max, 0, N + 1)[:-1], same bits
    return [shift * x / (1 + (shift - 1) * x) for x in s] + [0.0]  # the original's expression order


def wan_timestep_list(steps: int, shift: float, num_train_timesteps: int = 1000) -> list[int]:
    """The integer timesteps [steps] the model sees: int(1000 * sigma), truncated."""
    return [int(s * num_train_timesteps) for s in wan_sigma_list(steps, shift, num_train_timesteps)[:-1]]


def expert_at(boundary: float | None, t: float) -> int:
    """The expert that denoises timestep t: 0 = high noise (t >= boundary * 1000), 1 = low noise;
    always 0 for a one-expert model (boundary None)."""
    return 0 if boundary is None or t >= boundary * 1000 else 1


def high_noise_steps(boundary: float | None, steps: int, shift: float) -> int:
    """How many leading steps run the high-noise expert: all of them for a one-expert model."""
    return sum(expert_at(boundary, t) == 0 for t in wan_timestep_list(steps, shift))

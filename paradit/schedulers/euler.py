"""Flow-matching Euler: x_next = x + (sigma_next - sigma) * v (diffusers' FlowMatchEulerDiscreteScheduler)."""
from __future__ import annotations

import torch

from .base import FlowScheduler, compute_dtype


class FlowEulerScheduler(FlowScheduler):
    """First-order flow sampler; its only state is the step index (and the schedule)."""

    kind = "euler"

    def step(self, v: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One Euler step. v, x: any (same) shape; returns x_next in fp32 (fp64 if x is fp64)."""
        i = self._begin_step(t)
        dtype = compute_dtype(x)
        dt = self._sig[i + 1] - self._sig[i]  # < 0: towards data
        x_next = x.to(dtype) + dt * v.to(dtype)
        self.step_index = i + 1
        return x_next

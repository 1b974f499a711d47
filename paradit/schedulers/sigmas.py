"""The Wan schedule as torch tensors (paradit.schedulers.schedule holds it in plain Python), and the
check of user-given sigmas."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedule import wan_sigma_list


def wan_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas float64 [steps + 1] ending in 0, timesteps int64 [steps]) of the original Wan sampler."""
    sigmas = torch.tensor(wan_sigma_list(steps, shift, num_train_timesteps), dtype=torch.float64)
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

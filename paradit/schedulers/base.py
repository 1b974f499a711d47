"""What the flow samplers share: the schedule, the step counter, the timestep check, the state.

State is explicit and plain (ints, floats, tensors, lists, None) so that it survives torch.save
with weights_only=True and can be sent between processes: at the Wan2.2 expert boundary the
low-noise stage continues the high-noise stage's trajectory bit for bit.

The samplers are elementwise in the latent: they accept any tensor shape, so a rank can step its
own token-space shard [L_local, C] of the latent with no communication.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .sigmas import check_sigmas, sigmas_to_timesteps, wan_schedule


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 at least: bf16/fp16 latents are upcast (and stay fp32, as the original keeps its latent)."""
    return torch.promote_types(x.dtype, torch.float32)


class FlowScheduler:
    """Base of the flow samplers; subclasses add `step` and their own history."""

    kind = "flow"
    # UniPC takes log(1 - sigma), so it needs sigma < 1; Euler accepts sigma = 1.
    _sigma_below_one = False

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}; Wan uses 12.0 (T2V-A14B) or 5.0")
        ntt = num_train_timesteps
        if isinstance(ntt, bool) or not isinstance(ntt, int) or ntt < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {ntt!r}; Wan uses 1000")
        self.shift = float(shift)
        self.num_train_timesteps = ntt
        self.sigmas: torch.Tensor | None = None  # float64 [N + 1], CPU, ends in 0
        self.timesteps: torch.Tensor | None = None  # int64 [N], CPU
        self.step_index: int | None = None  # index of the next step; N when finished
        # The same sigmas as Python floats: the solver's scalar coefficients are computed on the
        # host in float64, with no device syncs and no dependence on the latent's device.
        self._sig: list[float] = []

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: `type(s)(**s.config)` builds an equal, unscheduled scheduler."""
        return {"shift": self.shift, "num_train_timesteps": self.num_train_timesteps}

    @property
    def num_inference_steps(self) -> int | None:
        return None if self.timesteps is None else int(self.timesteps.numel())

    def set_timesteps(
        self, num_inference_steps: int | None = None, *, sigmas: Sequence[float] | torch.Tensor | None = None
    ) -> None:
        """Start a trajectory: the Wan schedule of N steps with self.shift, or explicit sigmas.

        sigmas: N + 1 values, strictly decreasing, ending in 0 (the same layout as `self.sigmas`,
        so `b.set_timesteps(sigmas=a.sigmas)` reproduces a's schedule); they are used as given
        (shift is not applied again); timesteps = int(1000 * sigma), truncated.
        """
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("pass exactly one of num_inference_steps or sigmas=, e.g. set_timesteps(40)")
        if sigmas is None:
            s, t = wan_schedule(num_inference_steps, self.shift, self.num_train_timesteps)
        else:
            s = check_sigmas(sigmas, below_one=self._sigma_below_one)
            t = sigmas_to_timesteps(s, self.num_train_timesteps)
        self._set_schedule(s, t)
        self.step_index = 0
        self._reset_history()

    def _set_schedule(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> None:
        self.sigmas = sigmas
        self.timesteps = timesteps
        self._sig = sigmas.tolist()

    def _begin_step(self, t: int | torch.Tensor) -> int:
        """Index of the step about to run, after checking the caller is where the scheduler is."""
        if self.step_index is None:
            raise ValueError("call set_timesteps(steps) (or load_state_dict) before step()")
        i = self.step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"the trajectory is finished ({i} steps); call set_timesteps to start another")
        want = int(self.timesteps[i])
        if isinstance(t, torch.Tensor):
            ok = t.numel() > 0 and bool((t == want).all())  # t may be a per-sample [B] tensor
        else:
            ok = t == want
        if not ok:
            raise ValueError(
                f"step() got timestep {t!r} but step {i} of the schedule is t={want}; "
                "pass sched.timesteps[sched.step_index] (the scheduler counts steps itself)"
            )
        return i

    # ---- state -------------------------------------------------------------------------------
    def _reset_history(self) -> None:
        pass

    def _history_dict(self) -> dict[str, Any]:
        return {}

    def _load_history(self, d: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Plain dict (ints, tensors, lists, None): everything needed to continue the trajectory.

        Tensors are shared, not copied: the schedulers never write into a tensor in place.
        """
        if self.step_index is None:
            raise ValueError("nothing to save: call set_timesteps first")
        return {
            "kind": self.kind,
            "step_index": self.step_index,
            "sigmas": self.sigmas,
            "timesteps": self.timesteps,
            **self._history_dict(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a state_dict (possibly from another process); the shift is not needed."""
        if d.get("kind") != self.kind:
            raise ValueError(
                f"state was saved by a {d.get('kind')!r} scheduler; load it into the same kind, not {self.kind!r}"
            )
        sigmas = check_sigmas(d["sigmas"], below_one=self._sigma_below_one)
        timesteps = torch.as_tensor(d["timesteps"]).to("cpu", torch.int64)
        step_index = int(d["step_index"])
        if timesteps.numel() != sigmas.numel() - 1 or not 0 <= step_index <= timesteps.numel():
            raise ValueError("inconsistent state: needs N + 1 sigmas, N timesteps and 0 <= step_index <= N")
        self._set_schedule(sigmas, timesteps)
        self.step_index = step_index
        self._load_history(d)

    def copy(self) -> "FlowScheduler":
        """An independent scheduler at the same point of the same trajectory."""
        new = type(self)(**self.config)
        if self.step_index is not None:
            new.load_state_dict(self.state_dict())
        return new

    # ---- the tensors of the state, for torch.distributed send/recv ----------------------------
    def num_state_tensors(self, step_index: int | None = None) -> int:
        """How many latent-shaped tensors `state_tensors()` holds after `step_index` steps."""
        return 0

    def state_tensors(self) -> list[torch.Tensor]:
        """The state's latent-shaped tensors, in a fixed order; each like the latent (compute dtype).

        A receiver that ran set_timesteps with the same schedule and knows the step index
        allocates `num_state_tensors(step_index)` buffers like its latent, receives into them, and
        calls `load_state_tensors(step_index, buffers)`.
        """
        return []

    def load_state_tensors(self, step_index: int, tensors: Sequence[torch.Tensor]) -> None:
        """Jump to `step_index` of the current schedule with the given state tensors (taken, not copied)."""
        if self.step_index is None:
            raise ValueError("call set_timesteps with the sender's schedule before load_state_tensors")
        if not 0 <= step_index <= self.num_inference_steps:
            raise ValueError(f"step_index {step_index} is outside 0..{self.num_inference_steps}")
        if len(tensors) != self.num_state_tensors(step_index):
            n = self.num_state_tensors(step_index)
            raise ValueError(f"expected {n} state tensors at step {step_index}, got {len(tensors)}")
        self.step_index = step_index
        self._load_tensors(list(tensors))

    def _load_tensors(self, tensors: list[torch.Tensor]) -> None:
        pass

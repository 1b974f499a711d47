"""The samplers by name: make_scheduler(name, shift, steps). Importing this module imports no torch
(the settings check sampler names before torch is loaded); making a scheduler does."""
from __future__ import annotations

from paradit.settings import SAMPLER_NAMES  # noqa: F401 (the names the settings check, before torch)


def make_scheduler(name: str, shift: float, steps: int):
    """A fresh sampler `name` with its timesteps set for `steps` steps at `shift`."""
    if name == "unipc":
        from paradit.schedulers.unipc import FlowUniPCScheduler as cls
    elif name == "euler":
        from paradit.schedulers.euler import FlowEulerScheduler as cls
    else:
        raise ValueError(f"sampler {name!r}: choose one of {', '.join(SAMPLER_NAMES)}")
    sched = cls(shift=shift)
    sched.set_timesteps(steps)
    return sched

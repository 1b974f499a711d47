"""Flow samplers for Wan: pure tensor code on any latent shape, no torch.distributed.

Names are imported on first use: the schedule in plain Python (schedule.py) needs no torch."""
__all__ = ["FlowEulerScheduler", "FlowUniPCScheduler", "make_scheduler", "SAMPLER_NAMES", "wan_sigmas", "wan_timesteps"]
_LAZY = {"FlowEulerScheduler": "euler", "FlowUniPCScheduler": "unipc", "wan_sigmas": "sigmas",
         "wan_timesteps": "sigmas", "make_scheduler": "registry", "SAMPLER_NAMES": "registry"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"paradit.schedulers.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'paradit.schedulers' has no attribute {name!r}")

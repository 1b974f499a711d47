"""Flow samplers for Wan: pure tensor code on any latent shape, no torch.distributed."""
from .euler import FlowEulerScheduler
from .sigmas import wan_sigmas, wan_timesteps
from .unipc import FlowUniPCScheduler

__all__ = ["FlowEulerScheduler", "FlowUniPCScheduler", "wan_sigmas", "wan_timesteps"]

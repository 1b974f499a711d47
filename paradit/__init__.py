"""paradit: Wan 2.x video diffusion transformers on 1 to 8+ GPUs.

Public API: WanConfig, WanTransformer, load_transformer, Pipeline; the parallel layer
lives in paradit.parallel and the samplers in paradit.schedulers. Names are imported on first use,
so that light entry points (the planner CLI) do not pay for torch, diffusers or transformers.
"""
from paradit.config import WanConfig

__all__ = ["WanConfig", "WanTransformer", "load_transformer", "Pipeline"]
_LAZY = {"WanTransformer": "paradit.models.transformer", "load_transformer": "paradit.models.loading",
         "Pipeline": "paradit.pipeline"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paradit' has no attribute {name!r}")

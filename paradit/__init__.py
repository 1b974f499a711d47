"""paradit: Wan 2.x video diffusion transformers on 1 to 8+ GPUs.

Public API (DESIGN.md): WanConfig, WanTransformer, load_transformer, Pipeline; the parallel layer
lives in paradit.parallel and the samplers in paradit.schedulers.
"""
from paradit.config import WanConfig
from paradit.models import WanTransformer, load_transformer

__all__ = ["WanConfig", "WanTransformer", "load_transformer", "Pipeline"]


def __getattr__(name):  # the pipeline pulls in diffusers and transformers: import it on first use
    if name == "Pipeline":
        from paradit.pipeline import Pipeline
        return Pipeline
    raise AttributeError(name)

"""Parallel machinery, the code that talks to process groups: the mesh, the collectives,
sequence-parallel attention, the runtime (token shards, CFG), the stage hand-off, the spread decode.

Names are imported on first use. The layout (ParallelConfig, re-exported here) and the planner are
paradit.plan; the denoising drivers that use this machinery are paradit.engine."""
from paradit.plan.layout import ParallelConfig  # plain Python

__all__ = ["Mesh", "ParallelConfig", "init_parallel", "parallelize", "ParallelWan", "Runtime"]
_LAZY = {"Mesh": "mesh", "init_parallel": "mesh", "parallelize": "runtime", "ParallelWan": "runtime",
         "Runtime": "runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"paradit.parallel.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'paradit.parallel' has no attribute {name!r}")

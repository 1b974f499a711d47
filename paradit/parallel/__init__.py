"""Parallel machinery: the mesh, sequence-parallel attention, CFG, CHORDS, expert stages.

Names are imported on first use. The layout (ParallelConfig) and the planner are paradit.plan."""
__all__ = ["Mesh", "init_parallel", "parallelize", "ParallelWan", "Runtime"]
_LAZY = {"Mesh": "mesh", "init_parallel": "mesh", "parallelize": "runtime", "ParallelWan": "runtime",
         "Runtime": "runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"paradit.parallel.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'paradit.parallel' has no attribute {name!r}")

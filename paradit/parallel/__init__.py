"""Parallel machinery: the mesh, sequence-parallel attention, CFG, CHORDS, expert stages, planner.

Names are imported on first use (ParallelConfig and the planner need no torch)."""
__all__ = ["ParallelConfig", "Mesh", "init_parallel", "parallelize", "ParallelWan", "Runtime", "auto_sp"]
_LAZY = {"ParallelConfig": "layout", "Mesh": "mesh", "init_parallel": "mesh", "auto_sp": "layout",
         "parallelize": "runtime", "ParallelWan": "runtime", "Runtime": "runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"paradit.parallel.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'paradit.parallel' has no attribute {name!r}")

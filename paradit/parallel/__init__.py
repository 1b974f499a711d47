"""Parallel machinery: the mesh, sequence-parallel attention, CFG, CHORDS, expert stages, planner."""
from paradit.parallel.mesh import Mesh, ParallelConfig, auto_sp, init_parallel
from paradit.parallel.runtime import ParallelWan, Runtime, parallelize

__all__ = ["ParallelConfig", "Mesh", "init_parallel", "parallelize", "ParallelWan", "Runtime", "auto_sp"]

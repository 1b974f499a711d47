"""Planning a run, in plain Python (no torch): the layout, where experts and roles go, the planner.

    layout     ParallelConfig: the degree of each parallel axis
    cli        `python -m paradit.plan`: rank the layouts of a machine for one video
"""
from paradit.plan.layout import AXES, EXPERT_MODES, ParallelConfig, Stage, auto_sp, suggest_layouts

__all__ = ["AXES", "EXPERT_MODES", "ParallelConfig", "Stage", "auto_sp", "suggest_layouts"]

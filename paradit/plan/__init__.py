"""Planning a run, in plain Python (no torch): the layout, where experts and roles go, the planner.

    layout     ParallelConfig: the degree of each parallel axis
    placement  which experts and which once-per-request roles each rank takes
    hardware   GPU specs and the calibrated efficiency factors (calibration.json)
    model      one Wan expert in numbers: parameters, FLOPs, working sets
    costs      the time and memory of one layout: evaluate -> Candidate
    sharding   weight sharding: memory, all-gathers, which group (if any) a layout shards over
    memory     the peak allocated per phase (load, encode, denoise, decode), pinned host memory per host
    video      the time to the video: start-up, encode, denoise, decode, write
    results    Candidate, its typed breakdowns, Infeasibility (why a layout cannot run)
    ranking    the order of candidates, and why one ranks below the choice (Defeat)
    search     every layout of a machine, evaluated and ranked: plan -> Plan
    explain    a plan in words
    cli        `python -m paradit.plan`
"""
from paradit.plan.costs import Problem, evaluate
from paradit.plan.explain import explain
from paradit.plan.hardware import (DEFAULT_CALIBRATION, GPUS, MAX_GPUS, Calibration, GPUSpec, load_calibration,
                                   rewrite_calibration)
from paradit.plan.layout import AXES, EXPERT_MODES, ParallelConfig, Stage, auto_sp, suggest_layouts
from paradit.plan.model import forward_flops, param_count, param_parts
from paradit.plan.placement import (RankRoles, chords_experts, chords_init, chords_rounds, experts_needed, rank_roles,
                                    stage_sizes)
from paradit.plan.ranking import Defeat, defeat, rank
from paradit.plan.results import (Candidate, ColocatedBreakdown, HighLow, Infeasibility, MemoryCost, Phases,
                                  RequestParts, SplitBreakdown, StepCost)
from paradit.plan.search import Plan, candidates, make_problem, plan

__all__ = ["AXES", "EXPERT_MODES", "ParallelConfig", "Stage", "auto_sp", "suggest_layouts",
           "stage_sizes", "chords_init", "chords_rounds", "chords_experts", "experts_needed",
           "RankRoles", "rank_roles", "GPUSpec", "GPUS", "MAX_GPUS", "Calibration", "DEFAULT_CALIBRATION", "load_calibration",
           "rewrite_calibration",
           "forward_flops", "param_count", "param_parts", "Problem", "evaluate", "Candidate", "Infeasibility",
           "StepCost", "MemoryCost", "Phases", "RequestParts", "ColocatedBreakdown", "SplitBreakdown", "HighLow",
           "rank", "defeat", "Defeat", "Plan", "candidates", "make_problem", "plan", "explain"]

"""Ranking evaluated layouts: by the objective, then by how many moving parts they have; and why
a layout ranks below the choice."""
from __future__ import annotations

import enum
import math

from paradit.plan.layout import ParallelConfig
from paradit.plan.results import Candidate

TIE = 0.005     # relative difference below which two layouts tie on the objective


class Defeat(enum.Enum):
    """Why a runnable layout ranks below the choice."""
    MORE_COMPLEX = "a tie, and the choice has fewer parallel axes"
    TIE = "a tie, decided by the secondary objective"
    ONE_STAGE_AT_A_TIME = "split experts: a request uses one stage's GPUs at a time (latency)"
    SLOWER_STAGE = "split experts: the slower stage bounds the pipeline (throughput)"
    SMALLER_REPLICAS = "data parallelism leaves each request fewer GPUs (latency)"
    COSTLIER = "more of one cost (compute, a collective, copies, start-up, decode) per request"


def complexity(layout: ParallelConfig) -> int:
    """Tie-break: fewer moving parts first."""
    return sum(s[1] > 1 for s in layout.stage_degrees) + sum(s[2] > 1 for s in layout.stage_degrees) + \
        (layout.chords > 1) + (layout.stages is not None) + (layout.dp > 1)


def rank(cands: list[Candidate], objective: str) -> list[Candidate]:
    """Feasible first, best first by the objective (latency: the request's time to video, start-up
    included; throughput: videos per hour once running); then infeasible ones."""
    def key(c: Candidate):
        if not c.feasible:      # the nearest misses (least memory) first
            return (1, c.mem_gb if math.isfinite(c.mem_gb) else math.inf, 0.0, 0)
        primary = c.time_to_video_s if objective == "latency" else -c.throughput_per_h
        secondary = -c.throughput_per_h if objective == "latency" else c.time_to_video_s
        return (0, round(primary, 6), round(secondary, 6), complexity(c.layout))
    return sorted(cands, key=key)


def defeat(choice: Candidate, other: Candidate, objective: str) -> Defeat:
    """Why `other` (runnable) ranks below `choice` under the objective."""
    metric = "time_to_video_s" if objective == "latency" else "throughput_per_h"
    if abs(getattr(other, metric) / getattr(choice, metric) - 1) < TIE:
        return Defeat.MORE_COMPLEX if complexity(choice.layout) < complexity(other.layout) else Defeat.TIE
    if other.layout.stages:
        return Defeat.ONE_STAGE_AT_A_TIME if objective == "latency" else Defeat.SLOWER_STAGE
    if other.layout.dp > 1 and objective == "latency":
        return Defeat.SMALLER_REPLICAS
    return Defeat.COSTLIER

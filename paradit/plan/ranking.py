"""Ranking evaluated layouts: by the objective, then by how many moving parts they have."""
from __future__ import annotations

import math

from paradit.plan.costs import Candidate
from paradit.plan.layout import ParallelConfig


def complexity(layout: ParallelConfig) -> int:
    """Tie-break: fewer moving parts first."""
    return sum(s[1] > 1 for s in layout.stage_degrees) + sum(s[2] > 1 for s in layout.stage_degrees) + \
        (layout.chords > 1) + (layout.stages is not None) + (layout.dp > 1)


def rank(cands: list[Candidate], objective: str) -> list[Candidate]:
    """Feasible first, best first by the objective; then infeasible ones."""
    def key(c: Candidate):
        if not c.feasible:      # the nearest misses (least memory) first
            return (1, c.mem_gb if math.isfinite(c.mem_gb) else math.inf, 0.0, 0)
        primary = c.latency_s if objective == "latency" else -c.throughput_per_h
        secondary = -c.throughput_per_h if objective == "latency" else c.latency_s
        return (0, round(primary, 6), round(secondary, 6), complexity(c.layout))
    return sorted(cands, key=key)

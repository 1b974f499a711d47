"""Explaining a plan in words: why the choice won, why the next best lost, what could not run."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from paradit.plan.costs import evaluate
from paradit.plan.memory import HOST_MARGIN_GB, host_gb, memory_limit, ranks_per_host
from paradit.plan.ranking import Defeat, defeat
from paradit.plan.results import Candidate, ColocatedBreakdown, Infeasibility, SplitBreakdown, StepCost

if TYPE_CHECKING:
    from paradit.plan.search import Plan


def explain(plan: Plan, losers: int = 3) -> str:
    """Why the choice won, why the best few others lost, and what could not run."""
    p, choice = plan.problem, plan.choice
    lines = [f"{p.model.name}: {p.width}x{p.height}x{p.frames} ({p.tokens:,} tokens), "
             f"{p.steps} steps, {'guided' if p.guidance else 'guidance 1 (no uncond forward)'}"
             f"{f', {p.loras} LoRA(s)' if p.loras else ''}, {p.gpus} x {p.gpu.name} ({p.gpu.matmul_tflops:g} "
             f"TFLOP/s, {memory_limit(p):.1f} GB for the allocator); objective: {plan.objective}",
             f"calibration: {p.calibration.source}", _host_text(plan)]
    if choice is None:
        return "\n".join(lines + _no_choice(plan) + _infeasible_summary(plan))
    lines.append(f"Choice: {choice.label()}: {choice.time_to_video_s:.4g} s to the video, "
                 f"{choice.latency_s:.4g} s denoising, {choice.throughput_per_h:.4g} videos/h, "
                 f"{choice.mem_gb:.1f} GB per GPU.")
    lines += ["  " + s for s in _video_text(choice) + _memory_text(choice) + _step_text(choice, p.steps)]
    if choice.note:
        lines.append(f"  note: {choice.note}")
    others = plan.feasible[1:1 + losers]
    if others:
        lines.append("Why not the next best:")
        lines += [f"  {o.label()}: {_why_lost(choice, o, plan.objective)}" for o in others]
    return "\n".join(lines + _infeasible_summary(plan))


def _host_text(plan: Plan) -> str:
    """The host memory the plan was held to, and what the choice pins on the fullest host."""
    p, c, ranks = plan.problem, plan.choice, ranks_per_host(plan.problem)
    text = (f"host memory: {p.host_gb:.1f} GB available on each host" if p.host_gb is not None else
            "host memory: not checked (unknown: give host_gb, --host-gb)") + f", {ranks} rank(s) per host"
    if c is not None:
        need = host_gb(p, c, c.offload)[1]
        text += (f"; the choice needs {need:.1f} GB of it on the fullest host (its pinned copies, "
                 f"{HOST_MARGIN_GB:g} GB a rank besides)" if need else "; the choice pins none")
    return text


def _video_text(c: Candidate) -> list[str]:
    """The phases of the predicted time to video."""
    v = c.video
    return [f"time to video {v.total:.4g} s = start-up {v.startup:.3g} (" + ", ".join(
        f"{name} {s:.3g}" for name, s in list(v.named().items())[:3]) + ") + " + " + ".join(
        f"{name} {s:.3g}" for name, s in list(v.named().items())[3:])]


def _memory_text(c: Candidate) -> list[str]:
    """The predicted peak allocated memory of each phase (the fullest GPU's)."""
    b = c.breakdown
    mem = b.mem_gb if isinstance(b, ColocatedBreakdown) else max((b.mem_gb.high, b.mem_gb.low), key=lambda m: m.total)
    return ["memory (GB allocated, peak " + mem.phase + "): " + ", ".join(
        f"{name} {getattr(mem.phases, name):.1f}" for name in ("load", "encode", "denoise", "decode"))]


def _step_text(c: Candidate, steps: int) -> list[str]:
    b = c.breakdown
    stages = [("", b.step)] if isinstance(b, ColocatedBreakdown) else [("high stage ", b.high), ("low stage ", b.low)]
    out = [_one_step_text(name, s) for name, s in stages]
    if b.parts_s.weight_gather:
        out.append(f"sharded weights: {b.parts_s.weight_gather:.3g} s per request of block all-gathers not hidden "
                   f"behind compute (in the step above)")
    if b.parts_s.host_copies:
        out.append(f"offload: {b.parts_s.host_copies:.3g} s per request waiting on host-link copies")
    if isinstance(b, ColocatedBreakdown) and c.layout.chords > 1:
        out.append(f"CHORDS: {b.rounds} rounds to the first hit instead of {steps} steps")
    if isinstance(b, SplitBreakdown):
        out.append(f"stages: {b.steps.high} high-noise steps take {b.stage_s.high:.4g} s, "
                   f"{b.steps.low} low-noise steps {b.stage_s.low:.4g} s")
    return out


def _one_step_text(name: str, s: StepCost) -> str:
    text = (f"{name}step {s.step_s:.4g} s = compute {s.compute_s:.4g} (linear {s.linear_s:.4g}, "
            f"attention {s.attention_s:.4g}, elementwise {s.elementwise_s:.4g})")
    if s.ulysses_s:
        text += f" + all-to-all {s.ulysses_s:.4g}"
    if s.ring_total_s:
        text += (f" + ring {s.ring_exposed_s:.4g} exposed (of {s.ring_total_s:.4g}, "
                 f"the rest hidden behind attention) + LSE merges {s.ring_merge_s:.4g}")
    if s.cfg_s:
        text += f" + CFG exchange {s.cfg_s:.2g}"
    return text + f" + launches {s.launch_s:.4g}" + (" (CFG in turn: two forwards)" if s.forwards == 2 else "")


def _why_lost(choice: Candidate, other: Candidate, objective: str) -> str:
    if objective == "latency":
        head = (f"{100 * (other.time_to_video_s / choice.time_to_video_s - 1):.1f}% slower to the video "
                f"({other.time_to_video_s:.4g} s vs {choice.time_to_video_s:.4g} s)")
    else:
        head = (f"{100 * (1 - other.throughput_per_h / choice.throughput_per_h):.1f}% fewer videos "
                f"per hour ({other.throughput_per_h:.4g} vs {choice.throughput_per_h:.4g})")
    return head + ": " + _defeat_text(defeat(choice, other, objective), choice, other, objective)


def _defeat_text(why: Defeat, choice: Candidate, other: Candidate, objective: str) -> str:
    layout = other.layout
    if why is Defeat.MORE_COMPLEX:
        return "a tie; the choice has fewer parallel axes"
    if why is Defeat.TIE:
        return "a tie within 0.5%"
    if why is Defeat.ONE_STAGE_AT_A_TIME:
        return "a request runs on one stage at a time, so each step uses part of the GPUs"
    if why is Defeat.SLOWER_STAGE:
        s = other.breakdown.stage_s
        return f"the slower stage bounds the pipeline ({max(s.high, s.low):.4g} s per request)"
    if why is Defeat.SMALLER_REPLICAS:
        return f"dp{layout.dp} leaves each request {layout.group_size} GPUs"
    # latency: seconds per request; throughput: GPU-seconds per request (replicas differ)
    unit = "s" if objective == "latency" else "GPU-s"
    mine, theirs = _cost(choice, objective), _cost(other, objective)
    part = max(theirs, key=lambda k: theirs[k] - mine.get(k, 0.0))
    why = f"more {part} ({theirs[part]:.4g} {unit} vs {mine.get(part, 0.0):.4g} {unit} per request"
    if part == "compute" and other.breakdown.step.head_padding > 1:
        why += ", padded heads"
    return why + ")"


def _cost(c: Candidate, objective: str) -> dict[str, float]:
    scale = 1 if objective == "latency" else c.layout.group_size
    costs = {k: v * scale for k, v in c.breakdown.parts_s.named().items()}
    if objective == "latency":   # and the phases of the time to video around the denoising
        costs |= {k: v for k, v in c.video.named().items() if k != "denoise"}
    return costs


def _infeasible_summary(plan: Plan) -> list[str]:
    groups: dict[Infeasibility, list[Candidate]] = {}
    for c in plan.infeasible:
        groups.setdefault(c.why, []).append(c)
    if not groups:
        return []
    lines = [f"Ruled out ({len(plan.infeasible)}):"]
    for why, cs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = cs[0]
        lines.append(f"  {why.value} ({len(cs)}), e.g. {example.label()}: {example.reason}")
    return lines


def _no_choice(plan: Plan) -> list[str]:
    p = plan.problem
    lines = ["No layout runs."]
    oom = [c for c in plan.infeasible if c.why is Infeasibility.OUT_OF_MEMORY]
    if oom:
        least = min(oom, key=lambda c: c.mem_gb)
        lines.append(f"  Least memory: {least.label()} needs {least.mem_gb:.1f} GB per GPU, "
                     f"{memory_limit(p):.1f} GB for the allocator (it would take {least.latency_s:.4g} s "
                     f"denoising).")
        hints = ["more GPUs (split experts hold one expert per GPU)", "a GPU with more memory",
                 "a smaller video"]
        free = dataclasses.replace(p, offload="auto", cfg_mode="auto")
        auto = evaluate(free, least.layout) if free != p else None
        if auto is not None and auto.feasible:
            what = [f"offload={auto.offload!r} (--offload {auto.offload})"] if auto.offload != p.offload else []
            if auto.layout.cfg_mode != least.layout.cfg_mode:
                what.append(f"cfg_mode={auto.layout.cfg_mode!r} (--cfg-mode {auto.layout.cfg_mode})")
            hints.insert(0, f"{' and '.join(what)}, with which {least.layout.label()} needs {auto.mem_gb:.1f} GB")
        lines.append("  Try " + ", ".join(hints) + ".")
    return lines

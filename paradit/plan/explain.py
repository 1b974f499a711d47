"""Explaining a plan in words: why the choice won, why the next best lost, what could not run."""
from __future__ import annotations

from typing import TYPE_CHECKING

from paradit.plan.costs import Candidate, evaluate
from paradit.plan.ranking import complexity

if TYPE_CHECKING:
    from paradit.plan.search import Plan


def explain(plan: Plan, losers: int = 3) -> str:
    """Why the choice won, why the best few others lost, and what could not run."""
    p, choice = plan.problem, plan.choice
    lines = [f"{p.model.name}: {p.width}x{p.height}x{p.frames} ({p.tokens:,} tokens), "
             f"{p.steps} steps, {p.gpus} x {p.gpu.name} ({p.gpu.matmul_tflops:g} TFLOP/s, "
             f"{p.gpu.usable_gb:.0f} GB usable); objective: {plan.objective}",
             f"calibration: {p.calibration.source}"]
    if choice is None:
        return "\n".join(lines + _no_choice(plan) + _infeasible_summary(plan))
    lines.append(f"Choice: {choice.label()}: {choice.latency_s:.4g} s per video, "
                 f"{choice.throughput_per_h:.4g} videos/h, {choice.mem_gb:.1f} GB per GPU.")
    lines += ["  " + s for s in _step_text(choice, p.steps)]
    if choice.note:
        lines.append(f"  note: {choice.note}")
    others = plan.feasible[1:1 + losers]
    if others:
        lines.append("Why not the next best:")
        lines += [f"  {o.label()}: {_why_lost(choice, o, plan.objective)}" for o in others]
    return "\n".join(lines + _infeasible_summary(plan))


def _step_text(c: Candidate, steps: int) -> list[str]:
    b = c.breakdown
    stages = [("", b["step"])] if "step" in b else [("high stage ", b["high"]), ("low stage ", b["low"])]
    out = []
    for name, s in stages:
        text = (f"{name}step {s['step_s']:.4g} s = compute {s['compute_s']:.4g} (linear "
                f"{s['linear_s']:.4g}, attention {s['attention_s']:.4g}, elementwise "
                f"{s['elementwise_s']:.4g})")
        if s["ulysses_s"]:
            text += f" + all-to-all {s['ulysses_s']:.4g}"
        if s["ring_total_s"]:
            text += (f" + ring {s['ring_exposed_s']:.4g} exposed (of {s['ring_total_s']:.4g}, "
                     f"the rest hidden behind attention) + LSE merges {s['ring_merge_s']:.4g}")
        if s["cfg_s"]:
            text += f" + CFG exchange {s['cfg_s']:.2g}"
        out.append(text + f" + launches {s['launch_s']:.4g}")
    copies = b.get("parts_s", {}).get("host copies (offload)", 0.0)
    if copies:
        out.append(f"offload: {copies:.3g} s per request waiting on host-link copies")
    if "rounds" in b and c.layout.chords > 1:
        out.append(f"CHORDS: {b['rounds']} rounds to the first hit instead of {steps} steps")
    if "stage_s" in b:
        out.append(f"stages: {b['steps']['high']} high-noise steps take {b['stage_s']['high']:.4g} s, "
                   f"{b['steps']['low']} low-noise steps {b['stage_s']['low']:.4g} s")
    return out


def _why_lost(choice: Candidate, other: Candidate, objective: str) -> str:
    if objective == "latency":
        head = (f"{100 * (other.latency_s / choice.latency_s - 1):.1f}% slower "
                f"({other.latency_s:.4g} s vs {choice.latency_s:.4g} s)")
    else:
        head = (f"{100 * (1 - other.throughput_per_h / choice.throughput_per_h):.1f}% fewer videos "
                f"per hour ({other.throughput_per_h:.4g} vs {choice.throughput_per_h:.4g})")
    metric = "latency_s" if objective == "latency" else "throughput_per_h"
    if abs(getattr(other, metric) / getattr(choice, metric) - 1) < 0.005:
        simpler = complexity(choice.layout) < complexity(other.layout)
        return head + (": a tie; the choice has fewer parallel axes" if simpler else
                       ": a tie within 0.5%")
    layout = other.layout
    if layout.stages and objective == "latency":
        return head + ": a request runs on one stage at a time, so each step uses part of the GPUs"
    if layout.stages:
        s = other.breakdown["stage_s"]
        return head + f": the slower stage bounds the pipeline ({max(s.values()):.4g} s per request)"
    if layout.dp > 1 and objective == "latency":
        return head + f": dp{layout.dp} leaves each request {layout.group_size} GPUs"
    # latency: seconds per request; throughput: GPU-seconds per request (replicas differ)
    unit = "s" if objective == "latency" else "GPU-s"
    mine, theirs = _cost(choice, objective), _cost(other, objective)
    part = max(theirs, key=lambda k: theirs[k] - mine.get(k, 0.0))
    why = f": more {part} ({theirs[part]:.4g} {unit} vs {mine.get(part, 0.0):.4g} {unit} per request"
    if part == "compute" and other.note.startswith("uneven"):
        why += ", padded heads"
    return head + why + ")"


def _cost(c: Candidate, objective: str) -> dict:
    scale = 1 if objective == "latency" else c.layout.group_size
    return {k: v * scale for k, v in c.breakdown["parts_s"].items()}


def _category(reason: str) -> str:
    if ":" in reason:
        return reason.split(":")[0]
    return "".join("N" if ch.isdigit() else ch for ch in reason).replace("NN", "N").replace("NN", "N")


def _infeasible_summary(plan: Plan) -> list[str]:
    groups: dict[str, list[Candidate]] = {}
    for c in plan.infeasible:
        groups.setdefault(_category(c.reason), []).append(c)
    if not groups:
        return []
    lines = [f"Ruled out ({len(plan.infeasible)}):"]
    for cat, cs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = cs[0]
        lines.append(f"  {cat} ({len(cs)}), e.g. {example.label()}: {example.reason}")
    return lines


def _no_choice(plan: Plan) -> list[str]:
    p = plan.problem
    lines = ["No layout runs."]
    oom = [c for c in plan.infeasible if c.reason.startswith("out of memory")]
    if oom:
        least = min(oom, key=lambda c: c.mem_gb)
        lines.append(f"  Least memory: {least.label()} needs {least.mem_gb:.1f} GB per GPU, "
                     f"{p.gpu.usable_gb:.1f} GB usable (it would take {least.latency_s:.4g} s).")
        hints = ["more GPUs (split experts hold one expert per GPU)", "a GPU with more memory",
                 "a smaller video"]
        auto = evaluate(p, least.layout, "auto") if p.offload != "auto" else None
        if auto is not None and auto.feasible:
            hints.insert(0, f"offload={auto.offload!r} (--offload {auto.offload}), with which "
                            f"{least.layout.label()} needs {auto.mem_gb:.1f} GB")
        lines.append("  Try " + ", ".join(hints) + ".")
    return lines

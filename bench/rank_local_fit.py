"""rank_local.py's fit: the planner's compute parts of a stage's step, the fit of its compute factors
(matmul and attention efficiency, gemm_half_rows, the per-block overhead) to measured steps, its
error on other results files, and its writing into a calibration file (the entry's other factors kept)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from scaling_fit import write_calibration

import paradit.plan as pl
from paradit.config import WanConfig
from paradit.plan.step import stage_step

FITTED = ("matmul_efficiency", "attention_efficiency", "layer_overhead_us")
HALF_ROWS = (0, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)   # gemm_half_rows tried


def predicted_parts(cfg: WanConfig, stage, size: tuple[int, int, int], spec: pl.GPUSpec,
                    cal: pl.Calibration) -> dict:
    """The planner's compute parts of this stage's step (one rank, no communication), in seconds."""
    p = pl.make_problem(cfg, math.prod(stage), spec, *size, calibration=cal)        # the per-GPU entry applied there
    s = stage_step(p, stage, [0])
    return dict(linear_s=s.linear_s, attention_s=s.attention_s, elementwise_s=s.elementwise_s,
                launch_s=s.launch_s, ring_merge_s=s.ring_merge_s, local_tokens=s.local_tokens,
                busy_s=s.compute_s + s.launch_s + s.ring_merge_s,
                flops=s.flops_linear + s.flops_attention)


def fit_rank_local(points: list[dict], cfg: WanConfig, spec: pl.GPUSpec, base: pl.Calibration,
                   fixed: dict | None = None) -> dict:
    """matmul_efficiency, attention_efficiency, gemm_half_rows and layer_overhead_us that make the
    planner's rank-local step (linear + attention + elementwise + merges + launches) match the
    measured one; elementwise_efficiency stays `base`'s, and any factor in `fixed` keeps the value
    given there (across one model's stages linear and attention work grow nearly together, so
    their two efficiencies are hard to tell apart from step times alone: fix attention_efficiency
    to the attention kernel's measured rate, bench/attention_kernels.py --layouts). For each
    gemm_half_rows of HALF_ROWS, a non-negative least-squares fit of the relative error over the
    points (each point's time divided by its measurement, so small shapes count as much as large
    ones) of 1 / matmul_efficiency, 1 / attention_efficiency and the per-block overhead; the
    gemm_half_rows with the smallest error wins. points: {"stage", "size" (w, h, f), "step_s"};
    cfg: the model as built (its layers)."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(FITTED) - {"gemm_half_rows"}
    if unknown:
        raise ValueError(f"cannot fix {sorted(unknown)}: the fitted factors are {FITTED + ('gemm_half_rows',)}")
    rows = []
    for h in ([int(fixed["gemm_half_rows"])] if "gemm_half_rows" in fixed else HALF_ROWS):
        unit = dataclasses.replace(base, matmul_efficiency=1.0, attention_efficiency=1.0, gemm_half_rows=h,
                                   layer_overhead_us=0.0, per_gpu={})
        a, y = [], []
        for pt in points:
            parts = predicted_parts(cfg, tuple(pt["stage"]), tuple(pt["size"]), spec, unit)
            cols = dict(matmul_efficiency=parts["linear_s"], attention_efficiency=parts["attention_s"],
                        layer_overhead_us=cfg.num_layers * 1e-6)         # seconds per unit of each unknown
            known = parts["elementwise_s"] + parts["ring_merge_s"]
            known += sum(cols[k] / fixed[k] if k.endswith("efficiency") else cols[k] * fixed[k]
                         for k in FITTED if k in fixed)
            a.append([cols[k] / pt["step_s"] for k in FITTED if k not in fixed])
            y.append(1.0 - known / pt["step_s"])
        a_t, y_t = torch.tensor(a, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        sol = _nonneg_lstsq(a_t, y_t) if a_t.numel() else torch.zeros(0, dtype=torch.float64)
        resid = (a_t @ sol - y_t) if a_t.numel() else -y_t
        rows.append((float(resid.square().mean().sqrt()), float(resid.abs().max()), h, sol.tolist()))
    rms, worst, h, sol = min(rows)
    values = dict(zip([k for k in FITTED if k not in fixed], sol))
    factors = {}
    for k in FITTED:
        if k in fixed:
            factors[k] = float(fixed[k])
        elif k.endswith("efficiency"):
            factors[k] = min(1.0, 1 / values[k]) if values[k] > 0 else 1.0
        else:
            factors[k] = values[k]
    factors["gemm_half_rows"] = h
    return dict(factors=factors, fixed=sorted(fixed), rms_relative_error=rms, max_relative_error=worst,
                points=len(points), tried=[dict(gemm_half_rows=r[2], rms_relative_error=r[0]) for r in rows])


def prediction_errors(points: list[dict], cfg: WanConfig, spec: pl.GPUSpec, cal: pl.Calibration) -> dict:
    """The planner's rank-local step under `cal` against each measured point: relative errors."""
    errs = [predicted_parts(cfg, tuple(p["stage"]), tuple(p["size"]), spec, cal)["busy_s"] / p["step_s"] - 1
            for p in points]
    return dict(points=len(errs), rms_relative_error=math.sqrt(sum(e * e for e in errs) / len(errs)),
                max_relative_error=max(abs(e) for e in errs), mean_relative_error=sum(errs) / len(errs))


def _nonneg_lstsq(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares with every coefficient >= 0 (drop the most negative one and refit, until none is)."""
    free = list(range(a.shape[1]))
    while True:
        sol = torch.zeros(a.shape[1], dtype=a.dtype)
        if free:
            sol[free] = torch.linalg.lstsq(a[:, free], y[:, None]).solution[:, 0]
        if (sol >= 0).all():
            return sol
        free.remove(int(sol.argmin()))



def built_config(data: dict) -> WanConfig:
    """The model a results file measured: its preset with the blocks it built."""
    return WanConfig.preset(data["settings"]["preset"]).replace(num_layers=data["settings"]["layers"])


def fit_results(data: dict, base: pl.Calibration, args) -> dict | None:
    """fit_rank_local on a results file's --fit-mode points (None without any), with --fix and --check."""
    spec = pl.GPUSpec(**data["planner"]["spec"])
    points = [p for p in data["points"] if p["mode"] == args.fit_mode]
    if not points:
        return None
    fit = fit_rank_local(points, built_config(data), spec, base.for_gpu(spec.name), dict(args.fix))
    fit["checks"] = check_fit(fit, spec, base, args.check, args.fit_mode)
    return fit


def write_fit(data: dict, fit: dict | None, name: str, args) -> None:
    """--write-calibration: the fitted compute factors under gpus.<this GPU>, the entry's others kept."""
    if args.write_calibration and fit:
        gpu = data["planner"]["spec"]["name"]
        write_calibration(args.write_calibration, gpu, fit, args.calibration,
                          calibration_note(data, fit, name, args.note), merge=True)
        print(f"wrote calibration {args.write_calibration} (gpus.{gpu})")


def check_fit(fit: dict, spec: pl.GPUSpec, base: pl.Calibration, files: list[str], mode: str) -> list[dict]:
    """The fitted factors' prediction error on the `mode` points of other results files."""
    cal = dataclasses.replace(base.for_gpu(spec.name), **fit["factors"])
    out = []
    for f in files:
        data = json.loads(Path(f).read_text())
        pts = [p for p in data["points"] if p["mode"] == mode]
        if pts:
            out.append(dict(file=Path(f).name, preset=data["settings"]["preset"],
                            **prediction_errors(pts, built_config(data), spec, cal)))
    return out


def calibration_note(data: dict, fit: dict, name: str, extra: str = "") -> str:
    st = data["settings"]
    f = fit["factors"]
    fixed = "".join(f", {k} fixed at {f[k]:g}" for k in fit["fixed"])
    checks = "".join(f"; on {c['preset']}'s stages ({c['file']}) rms error {c['rms_relative_error']:.1%}"
                     for c in fit.get("checks", []))
    return (f"compute factors fitted by bench/rank_local.py to measurements of {data['date']}, "
            f"{data['environment'].get('gpu', data['machine'])}, torch {data['environment']['torch']}; {st['preset']} "
            f"({st['layers']} blocks), {', '.join('x'.join(map(str, s)) for s in st['sizes'])}, {st['dtype']}, "
            f"{data['fit_mode']} mode, attention {st['attention']}, {fit['points']} rank-local stages of "
            f"{st['world']}-GPU layouts{fixed} (rms error {fit['rms_relative_error']:.1%}{checks}); "
            f"comm factors from bench/scaling.py; details in {name}" + (f"; {extra}" if extra else ""))


"""The planner's memory model against measured peaks, and the fit of its constants: no GPU needed.

    python bench/memory_fit.py bench/results/*_e2e*.json                    # predicted against measured
    python bench/memory_fit.py bench/results/*_e2e*.json --fit \\
        --write-calibration paradit/plan/calibration.json                   # refit and ship the constants

Every successful run in bench/e2e.py's results files is a point: the problem the CLI posed the
planner (the preset, the video, the steps, the guidance and the LoRAs of its argv; the layout and
offload mode its sidecar recorded, or the argv's on results written before e2e kept them), and the
highest allocated peak of its ranks (torch.cuda.max_memory_allocated, the sidecar's gpu_memory_gb), or
of its phases where the probe measured them (the probe resets the peak as each phase starts, so the
sidecar's figure is then the last phase's alone).
Runs with --compile (compiled blocks keep fewer activations) or --quant are left out, saying so.
Where bench/cli_probe.py measured each phase's peak (the rows' `phases`), the table sets the
model's phases beside them, and the fit uses the denoise and decode peaks too (PROBE_PHASES).

--fit adjusts the constants of paradit.plan.memory (FITTED, or --fit-only NAME,...; others stay as
the calibration has them) to minimise the squared relative error of the predicted peaks: Gauss-Newton
on a finite-difference Jacobian (the model is a maximum of phases, each linear in the constants).
--write-calibration writes them at the top level of a calibration file (memory does not depend on the
GPU kind: the same tensors are allocated) with a memory_source note naming the files and the error.
The acceptance: the predicted peak within 5% of the measured one; the table says where.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import paradit.plan as pl  # noqa: E402
from paradit.cli.flags import parse_args  # noqa: E402
from paradit.cli.layout import layout_from_flags  # noqa: E402
from paradit.config import WanConfig  # noqa: E402

FITTED = ("overhead_gb", "activation_scale", "decode_scale", "lora_merge_gb")
TOLERANCE = 0.05     # within 5% of the measured peak
# bench/cli_probe.py's phases (their peaks, reset as each starts) -> the memory model's; the fit uses
# the denoise and the decode (the probe's start-up also holds the loader's staging buffers, which
# the model leaves out, and its text encode misses an I2V image's encode, which runs after it)
PROBE_PHASES = {"startup": "load", "text_encode": "encode", "denoise": "denoise", "decode": "decode"}
FIT_PHASES = ("denoise", "decode")
# Results files measured before the VAE decoded in bf16 and whole where it fits (bb91c42, 2026-12-02
# 18:01): their VAE held fp32 weights and decoded in diffusers' 256-pixel tiles, a decode the model does
# not describe (TI2V-5B 1280x704x121 measured 30.3 GB so: its tensors, counted on the meta device, were
# 2.8 GB of weights and a 6.1 GB working set, against 1.4 and 9.7 GB in bf16, whole). Their predicted
# peak is the fullest of the other phases.
FP32_TILED_DECODE = frozenset(f"2026-12-02_h200x1_e2e_{name}.json" for name in (
    "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "cap80_text-encoder_480p", "distill_lora_wan2.2-t2v-a14b",
    "reader_wan2.2-t2v-a14b", "cap80_experts_720p", "i2v_cap80_experts_720p"))


# ----------------------------------------------------------------------------- points
def gpu_kind(name: str | None) -> str:
    """The GPU preset of a results file's device name ("NVIDIA H100 80GB HBM3" -> h100)."""
    lower = (name or "").lower()
    return next((k for k in pl.GPUS if k in lower), "h100")


def layout_of(row: dict, flags, cfg: WanConfig) -> pl.ParallelConfig:
    """The run's layout: the sidecar's (bench/e2e.py keeps it), else the argv's layout flags."""
    saved = row.get("layout")
    if saved:
        keep = {f.name for f in dataclasses.fields(pl.ParallelConfig)}
        stages = saved.get("stages")
        return pl.ParallelConfig(**{k: v for k, v in saved.items() if k in keep and k != "stages"},
                                 stages=tuple(tuple(s) for s in stages) if stages else None)
    return layout_from_flags(flags, cfg.num_heads)


def point_of(row: dict, preset: str, gpu: str | None) -> tuple[dict | None, str]:
    """(the point of one e2e run, "") or (None, why it is left out)."""
    if row.get("returncode") != 0:
        return None, "failed"
    peaks = [m["allocated"] for m in (row.get("gpu_memory_gb") or {}).values() if m]
    if not peaks:
        return None, "no GPU memory recorded"
    argv = row["argv"]
    flags = parse_args(argv[argv.index("--model"):])
    if flags.compile or flags.quant != "none":
        return None, "--compile / --quant: not modelled"
    cfg = WanConfig.preset(preset)
    width, height = flags.size or cfg.size
    guidance = flags.guidance if isinstance(flags.guidance, tuple) else (flags.guidance,)
    loras = len(row.get("loras") or []) or sum(len(flags.values.get(f) or ())
                                                for f in ("lora", "lora_high", "lora_low"))
    phases = {PROBE_PHASES[k]: v["allocated_gb"] for k, v in (row.get("phases") or {}).items()
              if k in PROBE_PHASES and v and "allocated_gb" in v}
    return dict(run=row["run"], preset=preset, gpu=gpu_kind(gpu), width=width, height=height,
                frames=flags.frames or cfg.frames, steps=flags.steps or cfg.steps,
                guided=flags.guidance is None or any(g != 1.0 for g in guidance), loras=loras,
                offload=row.get("offload") or "none", layout=layout_of(row, flags, cfg),
                measured_gb=max(peaks + list(phases.values())), phases_gb=phases), ""


def load_points(paths: list[str]) -> tuple[list[dict], list[str]]:
    """The points of every results file, and what was left out (file, run: why)."""
    points, skipped = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data.get("runs", []):
            point, why = point_of(row, data["preset"], data.get("gpu"))
            if point is None:
                skipped.append(f"{Path(path).name} {row.get('run')}: {why}")
            else:
                points.append(point | {"file": Path(path).name, "decode": Path(path).name not in FP32_TILED_DECODE})
    return points, skipped


# ----------------------------------------------------------------------------- prediction and fit
def predict(point: dict, cal: pl.Calibration, constants: dict | None = None) -> pl.Candidate:
    """The planner's evaluation of the point's layout and offload mode, with `constants` in the calibration."""
    layout = point["layout"]
    p = pl.make_problem(point["preset"], layout.world_size, point["gpu"], point["width"], point["height"],
                        point["frames"], point["steps"], cal, offload=point["offload"], guidance=point["guided"],
                        cfg_mode=layout.cfg_mode, loras=point["loras"])
    p = dataclasses.replace(p, calibration=dataclasses.replace(p.calibration, **(constants or {})))
    return pl.evaluate(p, layout)


def peak(point: dict, c: pl.Candidate) -> tuple[float, str]:
    """(GB, phase) of the candidate's fullest phase on its fullest GPU; the decode left out where the run
    decoded in fp32 tiles (FP32_TILED_DECODE)."""
    phases = fullest(c).phases
    names = [f.name for f in dataclasses.fields(phases) if point.get("decode", True) or f.name != "decode"]
    phase = max(names, key=lambda name: getattr(phases, name))
    return getattr(phases, phase), phase


def errors(points: list[dict], cal: pl.Calibration, constants: dict | None = None) -> list[float]:
    """Relative error of each predicted peak (predicted / measured - 1)."""
    return [peak(pt, predict(pt, cal, constants))[0] / pt["measured_gb"] - 1 for pt in points]


def fullest(c: pl.Candidate) -> pl.MemoryCost:
    """The memory of the candidate's fullest GPU (a split layout's fuller stage)."""
    b = c.breakdown
    return b.mem_gb if isinstance(b, pl.ColocatedBreakdown) else max((b.mem_gb.high, b.mem_gb.low),
                                                                    key=lambda m: m.total)


def residuals(points: list[dict], cal: pl.Calibration, constants: dict | None = None) -> list[float]:
    """What the fit minimises: each run's peak error, and its denoise and decode phases' errors where
    bench/cli_probe.py measured them."""
    out = []
    for pt in points:
        c = predict(pt, cal, constants)
        out.append(peak(pt, c)[0] / pt["measured_gb"] - 1)
        out += [getattr(fullest(c).phases, k) / pt["phases_gb"][k] - 1 for k in FIT_PHASES if k in pt["phases_gb"]]
    return out


def fit(points: list[dict], cal: pl.Calibration, names: tuple[str, ...] = FITTED, iterations: int = 30) -> dict:
    """The constants `names` that minimise the squared relative error of the predicted peaks (each kept
    >= 1e-3), starting from the calibration's; Gauss-Newton, a finite-difference Jacobian."""
    import numpy as np

    x = np.array([float(getattr(cal, n)) for n in names])
    for _ in range(iterations):
        now = dict(zip(names, x))
        r = np.array(residuals(points, cal, now))
        jac = np.empty((len(r), len(names)))
        for j, n in enumerate(names):
            h = 1e-3 * max(1.0, abs(x[j]))
            jac[:, j] = (np.array(residuals(points, cal, now | {n: x[j] + h})) - r) / h
        step = np.linalg.lstsq(jac, -r, rcond=None)[0]
        x_new = np.maximum(x + step, 1e-3)
        if np.max(np.abs(x_new - x)) < 1e-6:
            x = x_new
            break
        x = x_new
    return {n: float(v) for n, v in zip(names, x)}


def summary(errs: list[float]) -> dict:
    return {"points": len(errs), "rms": math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else float("nan"),
            "max": max((abs(e) for e in errs), default=float("nan")),
            "within": sum(abs(e) <= TOLERANCE for e in errs)}


def table(points: list[dict], cal: pl.Calibration, constants: dict | None = None) -> str:
    lines = ["file | run | layout, offload | predicted GB (phase) | measured GB | error | phases predicted / "
             "measured GB", "--- | --- | --- | --- | --- | --- | ---"]
    for pt in points:
        c = predict(pt, cal, constants)
        mem, (gb, phase) = fullest(c), peak(pt, c)
        err = gb / pt["measured_gb"] - 1
        flag = "" if abs(err) <= TOLERANCE else " !"
        phases = ", ".join(f"{k} {getattr(mem.phases, k):.1f} / {v:.1f}" for k, v in pt["phases_gb"].items()) or "-"
        phase += "" if pt.get("decode", True) else "; decode in fp32 tiles, left out"
        lines.append(f"{pt['file']} | {pt['run']} | {c.layout.label()}, {pt['offload']} | {gb:.1f} "
                     f"({phase}) | {pt['measured_gb']:.1f} | {100 * err:+.1f}%{flag} | {phases}")
    return "\n".join(lines)


def write_calibration(path: str, base_path: str | None, constants: dict, note: str) -> None:
    """The calibration file (base_path, default the shipped one) with `constants` at the top level."""
    def edit(raw: dict) -> None:
        raw.update({k: float(f"{v:.4g}") for k, v in constants.items()}, memory_source=note)
    pl.rewrite_calibration(path, base_path, edit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench/e2e.py results files")
    ap.add_argument("--calibration", help="the calibration to start from (default: the shipped one)")
    ap.add_argument("--fit", action="store_true", help="fit the memory constants to the points")
    ap.add_argument("--fit-only", help=f"comma-separated constants to fit (default: {','.join(FITTED)})")
    ap.add_argument("--write-calibration", metavar="FILE", help="write the fitted constants into FILE")
    args = ap.parse_args(argv)
    cal = pl.load_calibration(args.calibration)
    points, skipped = load_points(args.results)
    if not points:
        raise SystemExit("no measured points in " + ", ".join(args.results))
    for s in skipped:
        print(f"left out: {s}")
    before = summary(errors(points, cal))
    print(table(points, cal))
    print(f"as calibrated: rms {100 * before['rms']:.1f}%, max {100 * before['max']:.1f}%, "
          f"{before['within']} of {before['points']} within {100 * TOLERANCE:.0f}%")
    if not args.fit:
        return 0
    names = tuple(args.fit_only.split(",")) if args.fit_only else FITTED
    unknown = set(names) - set(FITTED)
    if unknown:
        raise SystemExit(f"--fit-only: {sorted(unknown)} are not memory constants ({', '.join(FITTED)})")
    constants = fit(points, cal, names)
    after = summary(errors(points, cal, constants))
    print(table(points, cal, constants))
    print("fitted: " + ", ".join(f"{k} {v:.4g}" for k, v in constants.items()) +
          f"; rms {100 * after['rms']:.1f}%, max {100 * after['max']:.1f}%, {after['within']} of {after['points']} "
          f"within {100 * TOLERANCE:.0f}%")
    if args.write_calibration:
        note = (f"memory constants ({', '.join(constants)}) fitted by bench/memory_fit.py to the allocated peaks of "
                f"{after['points']} runs in {', '.join(sorted({p['file'] for p in points}))}: rms error "
                f"{100 * after['rms']:.1f}%, max {100 * after['max']:.1f}%")
        write_calibration(args.write_calibration, args.calibration, constants, note)
        print(f"wrote {args.write_calibration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

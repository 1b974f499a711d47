"""What one rank computes between collectives, for every stage the planner proposes, on one GPU.

    python bench/rank_local.py                                        # GPU: A14B, 720p and 480p x 81, 8 GPUs
    python bench/rank_local.py --write-calibration paradit/plan/calibration.json
    python bench/rank_local.py --preset tiny --sizes 64x48x9 --world 4 --modes eager   # CPU, seconds

Stages. Every layout paradit.plan considers for --world GPUs (paradit.plan.candidates: each dp,
each (ulysses, ring, cfg) of a group, each split of the experts into a high- and a low-noise stage
at that stage's best layout) is made of (ulysses u, ring r, cfg c) stages; a rank's work inside a
denoising step depends on its stage only: tokens ceil(L / (u r)), H / u heads of attention over
the L / r tokens of its Ulysses group in r ring steps (log-sum-exp merges in between), batch 2
(batched CFG) when c = 1. Stages the planner refuses (paradit.plan.step.stage_check) are left out.

One rank, alone. This process stands in for rank 0 of a world of u r c ranks: a process group of
torch's "fake" backend (torch.testing._internal.distributed.fake_pg: every collective returns at
once and moves nothing) lets the real runtime (paradit.parallel.runtime) run with its real shard
sizes, Ulysses packing and unpacking, ring loop and merges, and CFG exchange, every transfer left
out. Each receive buffer is filled with this rank's own sent data (fill_received: one on-GPU
copy), so the values after a collective have the model's magnitudes though not its meaning; the
kernels, their shapes and their launches are the rank's own. (The results of 2026-12-03 left the
buffers unwritten: their CUDA-graph points of Ulysses stages computed on a fresh pool, likely
zeros.) What a step costs beyond this is communication (bench/scaling.py measures it with
several GPUs).

Modes (--modes), per stage: one denoising step (the guided velocity, Euler update) of an expert
with --layers of its blocks, random bf16 weights on GPU (fp32 on CPU):
  eager           the engine's default
  graph           the same step captured once as a CUDA graph (torch.cuda.CUDAGraph) on static
                  input buffers and replayed: no per-kernel launch cost left (CUDA only)
  compiled        every block torch.compile'd (paradit.compile.compile_blocks, as --compile); the
                  first call, which builds the graphs for the shape, is timed apart (first_call_s)
  compiled+graph  the compiled step captured as a CUDA graph (CUDA only)
Time: --warmup untimed calls, then --steps timed ones (CUDA events on GPU), median reported.
Compiled modes stop (with a note) once --budget-s of wall time is spent, every mode once --stop-s
is, so that a sweep fits one 10-minute command; the results file is rewritten after every point,
so a sweep cut short still leaves what it measured.

Calibration. --write-calibration fits the planner's compute factors to the eager points (the mode
the CLI runs without --compile; --fit-mode picks another): matmul_efficiency, attention_efficiency,
gemm_half_rows and layer_overhead_us, with elementwise_efficiency kept (fit_rank_local), and writes
them under gpus.<this GPU> of the calibration file, the comm factors kept (bench/scaling.py fits
those). Across one model's stages linear and attention work grow nearly together, so their two
efficiencies trade off freely; --fix attention_efficiency=X pins it to the attention kernel's
measured rate (bench/attention_kernels.py --layouts) and fits the rest. --refit RESULTS redoes
the fit from a saved results file (no GPU needed); --check RESULTS reports the fitted factors'
error on another file's points (another model: a test of the fit, not part of it).
Results: bench/results/<date>_<machine>_rank_local.json, and a table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from launcher import environment, machine_description, machine_tag, rank_device, results_path, write_json  # noqa: E402
from rank_local_fit import FITTED, fit_results, predicted_parts, write_fit  # noqa: E402
from rank_local_measure import MODES, measure, planner_stages, stage_label  # noqa: E402
from scaling_fit import base_calibration, gpu_spec  # noqa: E402
from scaling_measure import build_model, make_inputs, probe_main  # noqa: E402

import paradit.plan as pl  # noqa: E402
from paradit.config import WanConfig  # noqa: E402

GPU_DEFAULTS = dict(preset="wan2.2-t2v-a14b", sizes="1280x720x81,832x480x81", layers=2, dtype="bfloat16")
CPU_DEFAULTS = dict(preset="tiny", sizes="64x48x9", layers=2, dtype="float32")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", help="model preset (GPU: wan2.2-t2v-a14b, CPU: tiny)")
    ap.add_argument("--sizes", help="comma-separated WIDTHxHEIGHTxFRAMES (GPU: 1280x720x81,832x480x81)")
    ap.add_argument("--world", type=int, default=8, help="GPUs whose layouts' stages are measured (8)")
    ap.add_argument("--layers", type=int, help="blocks built (2); the planner is asked about the same model")
    ap.add_argument("--modes", default=None, help=f"comma-separated of {', '.join(MODES)} (all on GPU, eager on CPU)")
    ap.add_argument("--attention", default="auto", help="attention backend (auto)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per point (5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per point (2)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall seconds after which compiled points stop")
    ap.add_argument("--stop-s", type=float, help="wall seconds after which no point starts (none)")
    ap.add_argument("--calibration", help="calibration JSON to start from (default: the shipped one)")
    ap.add_argument("--write-calibration", metavar="PATH", help="write the fitted compute factors here")
    ap.add_argument("--fit-mode", default="eager", choices=MODES, help="the mode the calibration is fitted to")
    ap.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE", type=parse_fix,
                    help="keep a compute factor at VALUE instead of fitting it (e.g. attention_efficiency=0.835)")
    ap.add_argument("--refit", metavar="RESULTS", help="measure nothing: fit the calibration to this results JSON")
    ap.add_argument("--check", action="append", default=[], metavar="RESULTS",
                    help="also report the fitted factors' error on another results JSON (e.g. another model)")
    ap.add_argument("--note", default="", help="appended to the calibration's source (e.g. where a --fix came from)")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    return ap.parse_args(argv)


def setup(args) -> dict:
    """The run's device, model, sizes and modes (flags, else this machine's defaults) and the planner's
    spec of this machine and calibration."""
    cuda = torch.cuda.is_available()
    device = rank_device("cuda" if cuda else "cpu")
    d = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    preset, layers, dtype = args.preset or d["preset"], args.layers or d["layers"], getattr(torch, d["dtype"])
    sizes = [parse_size(s) for s in (args.sizes or d["sizes"]).split(",")]
    modes = [m.strip() for m in (args.modes or (",".join(MODES) if cuda else "eager")).split(",")]
    bad = [m for m in modes if m not in MODES] + [m for m in modes if "graph" in m and not cuda]
    if bad:
        raise SystemExit(f"--modes: {bad} not available here: choose from {MODES} (graphs need CUDA)")
    tag = machine_tag(device.type)
    spec, spec_how = gpu_spec(device.type, tag, probe_main(device.type))
    base = base_calibration(device.type, args.calibration)
    cfg = WanConfig.preset(preset).replace(num_layers=layers)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4096)
    model = build_model(cfg, device, dtype)
    return dict(device=device, preset=preset, layers=layers, dtype=dtype, sizes=sizes, modes=modes, tag=tag,
                spec=spec, spec_how=spec_how, base=base, cfg=cfg, model=model)


def sweep(run: dict, args, began: float, points: list[dict], notes: list[str], save) -> None:
    """Every (size, stage, mode) point into `points`, save() after each: the eager modes, then the compiled
    ones (smallest size and widest stages first) until --budget-s; nothing starts after --stop-s."""
    model, cfg, spec, base = run["model"], run["cfg"], run["spec"], run["base"]
    for compiled in (False, True):
        wanted = [m for m in run["modes"] if ("compiled" in m) == compiled]
        if not wanted:
            continue
        if compiled:
            from paradit.compile import compile_blocks
            compile_blocks([model])
        for size in (sorted(run["sizes"], key=lambda s: s[0] * s[1] * s[2]) if compiled else run["sizes"]):
            inputs = make_inputs(cfg, dict(width=size[0], height=size[1], frames=size[2], sample_steps=cfg.steps),
                                 run["device"])
            # the stages of the whole model's layouts (memory decides some splits); the short one is timed
            problem = pl.make_problem(WanConfig.preset(run["preset"]), args.world, spec, *size, calibration=base)
            stages = planner_stages(problem)
            if compiled:   # widest stages of the smallest size first: the budget may end the sweep
                stages = sorted(stages, key=lambda s: -math.prod(s))
            for stage in stages:
                for mode in wanted:
                    pt = measure_point(run, args, inputs, stage, mode, size, time.perf_counter() - began, notes)
                    if pt is not None:
                        points.append(pt)
                        save()


def measure_point(run: dict, args, inputs: dict, stage, mode: str, size, spent: float, notes: list[str]) -> dict | None:
    """One point with the planner's parts beside it, printed; None (and a note) when out of time or failed."""
    if ("compiled" in mode and spent > args.budget_s) or (args.stop_s and spent > args.stop_s):
        which = f"--stop-s {args.stop_s}" if args.stop_s and spent > args.stop_s else f"--budget-s {args.budget_s}"
        notes.append(f"{mode} {stage_label(stage)} at {size}: skipped, {which} spent")
        return None
    try:
        pt = measure(run["model"], run["cfg"], inputs, stage, mode, vars(args), run["device"])
    except Exception as err:   # recorded and shown: a mode that cannot run a stage
        notes.append(f"{mode} {stage_label(stage)} at {size}: failed: {type(err).__name__}: {err}")
        print(f"  {notes[-1]}", flush=True)
        return None
    pt["size"] = list(size)
    pt["predicted"] = predicted_parts(run["cfg"], stage, size, run["spec"], run["base"])
    pt["tflops"] = pt["predicted"]["flops"] / pt["step_s"] / 1e12
    print(f"  {size[0]}x{size[1]}x{size[2]} {pt['label']:<10} {mode:<15} {pt['step_s'] * 1e3:9.2f} ms "
          f"({pt['tflops']:.0f} TFLOP/s; planner {pt['predicted']['busy_s'] * 1e3:.2f} ms; "
          f"first call {pt['first_call_s']:.1f} s)", flush=True)
    return pt


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.refit:
        return refit(args)
    began = time.perf_counter()
    run = setup(args)
    print(f"rank-local: {run['preset']} ({run['layers']} blocks), {run['dtype']}, the stages of {args.world} GPUs' "
          f"layouts, on {machine_description(run['device'].type)}", flush=True)
    points, notes = [], []
    path = results_path("rank_local", "json", args.out, run["tag"])
    env = environment()

    def result() -> dict:
        return dict(what="rank_local", date=time.strftime("%Y-%m-%d"), machine=run["tag"], environment=env,
                    settings=dict(preset=run["preset"], layers=run["layers"], dtype=str(run["dtype"]),
                                  world=args.world, sizes=run["sizes"], modes=run["modes"], attention=args.attention,
                                  steps=args.steps, warmup=args.warmup),
                    planner=dict(spec=dataclasses.asdict(run["spec"]), spec_how=run["spec_how"],
                                 calibration=run["base"].source),
                    method=__doc__, points=points, gains=gains(points), fit_mode=args.fit_mode, fit=None, notes=notes)

    sweep(run, args, began, points, notes, lambda: write_json(path, result()))
    data = result()
    fit = fit_results(data, run["base"], args)
    data["fit"] = fit
    print_table(data["gains"], fit, notes)
    write_json(path, data)
    print(f"wrote {path}")
    write_fit(data, fit, path.name, args)
    return 0


def refit(args) -> int:
    """--refit: the fit (and --check, --write-calibration) from a saved results file, no measurement."""
    path = Path(args.refit)
    data = json.loads(path.read_text())
    fit = fit_results(data, pl.load_calibration(args.calibration), args)
    if fit is None:
        raise SystemExit(f"--refit {path}: no {args.fit_mode} points in it (modes there: "
                         f"{sorted({p['mode'] for p in data['points']})})")
    print_table([], fit, [])
    write_fit(data, fit, path.name, args)
    return 0


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        w, h, f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not WIDTHxHEIGHTxFRAMES (e.g. 1280x720x81)") from None
    return w, h, f


def parse_fix(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in FITTED + ("gemm_half_rows",):
        raise argparse.ArgumentTypeError(f"{name!r} is not a fitted factor: one of {', '.join(FITTED)}, gemm_half_rows")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=NUMBER") from None


def gains(points: list[dict]) -> list[dict]:
    """Per (size, stage): every mode's step and its speedup over eager."""
    rows = {}
    for p in points:
        row = rows.setdefault((tuple(p["size"]), p["label"]),
                              dict(size=p["size"], stage=p["label"], local_tokens=p["local_tokens"],
                                   local_heads=p["local_heads"], batch=p["batch"], step_ms={}))
        row["step_ms"][p["mode"]] = p["step_s"] * 1e3
    for row in rows.values():
        eager = row["step_ms"].get("eager")
        row["speedup_vs_eager"] = {m: eager / t for m, t in row["step_ms"].items()} if eager else {}
        comp = row["step_ms"].get("compiled")
        if comp and "compiled+graph" in row["step_ms"]:
            row["graph_gain_over_compiled"] = comp / row["step_ms"]["compiled+graph"]
    return list(rows.values())


def print_table(table: list[dict], fit: dict | None, notes: list[str]) -> None:
    modes = [m for m in MODES if any(m in r["step_ms"] for r in table)]
    if table:
        print("\n" + f"{'size':<12} {'stage':<10} {'tokens':>7} {'B':>2} " + " ".join(f"{m:>15}" for m in modes)
              + "   (ms per step; x = speedup over eager)")
    for r in table:
        cells = [f"{r['step_ms'][m]:8.2f} x{r['speedup_vs_eager'].get(m, 0):4.2f}" if m in r["step_ms"] else " " * 15
                 for m in modes]
        print(f"{'x'.join(map(str, r['size'])):<12} {r['stage']:<10} {r['local_tokens']:>7} {r['batch']:>2} "
              + " ".join(f"{c:>15}" for c in cells))
    if fit:
        f = fit["factors"]
        fixed = f" ({', '.join(fit['fixed'])} fixed)" if fit["fixed"] else ""
        print(f"\nfit ({fit['points']} points){fixed}: matmul_efficiency {f['matmul_efficiency']:.3f}, "
              f"attention_efficiency {f['attention_efficiency']:.3f}, gemm_half_rows {f['gemm_half_rows']}, "
              f"layer_overhead_us {f['layer_overhead_us']:.1f}; rms relative error {fit['rms_relative_error']:.1%} "
              f"(max {fit['max_relative_error']:.1%})")
        for c in fit.get("checks", []):
            print(f"check on {c['file']} ({c['preset']}, {c['points']} points): rms relative error "
                  f"{c['rms_relative_error']:.1%}, max {c['max_relative_error']:.1%}, mean {c['mean_relative_error']:+.1%}")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())

"""Scaling curves: time of one denoising step per layout and world size, next to the planner's.

    python bench/scaling.py --preset tiny --worlds 1,2,4 --layouts SP,R,SPxCFG2,DP      # CPU, gloo
    python bench/scaling.py --worlds 1,2,4,8 --layouts SP,SPxCFG2 --layers 4            # GPU, NCCL

One command runs a whole sweep: it launches each world itself (bench/launcher.py), detects CUDA,
and writes bench/results/<date>_<machine>_scaling.{json,png}.

Layout syntax (--layouts, comma-separated). Terms, joined by "x" or nothing:
    U<n> Ulysses   R<n> Ring   SP<n> ulysses x ring = n by auto_sp   CFG2 CFG-parallel
    DP<n> data-parallel replicas   CH<n> CHORDS cores
One term may leave out its number ("SP", "U", "R", "DP", "CH"): it takes whatever the world
leaves, so the layout runs at every --worlds size it divides. Fully numbered layouts run only in
the world their degrees multiply to. Examples: U2, R4, U2R2, U2xCFG2, SPxCFG2, R2xDP, "1" (single).
The single-device point (world 1) always runs: it is the baseline of every speedup.

What is measured, per point (every rank runs it; the slowest rank of each step counts):
  step      the velocity call of paradit.parallel.runtime.Runtime on this rank's token shard, with
            CFG (batched at cfg=1, split over the cfg groups at cfg=2), plus its Euler update.
            CHORDS (CH<n>): whole requests to the first hit through the CHORDS runtime
            (Pipeline.denoise(chords=ChordsSettings(n, stop=1)), Euler); reported per round
            (request / rounds), so latency = rounds x round. Skipped if paradit.engine.chords
            does not import.
  forward   (--measure forward) one expert forward, no guidance; cfg=1 layouts only.
  compile   a backend named with "+compile" (sdpa+compile) runs after the eager points of its world,
            with every block torch.compile'd (paradit.compile.compile_blocks); the first call, which
            builds the graphs, is timed on its own (first_call_s, printed), never among the steps.
  time      --warmup untimed steps (the first is timed apart as first_call_s), then --steps timed
            ones, each after a barrier; CUDA events on GPU, perf_counter on CPU. Median, min and max over the timed steps; --stat picks
            the one every derived number uses (median; min on a shared machine, where other
            work only ever adds time).
  compute   the same steps again with every collective replaced by a local stand-in of the same
            output shape (zeros, no communication; paradit.parallel.attention's seq_to_heads,
            heads_to_seq, RingComm and the runtime's all_gather_equal are swapped in this process
            only). comm = step - compute: the communication compute does not hide, plus waiting
            for slower ranks. comm share = comm / step.
  weights   (--shard-weights none,sp,request runs each layout whole and sharded over each group it
            allows) the weight bytes a rank holds at the fullest moment of the timed steps,
            measured from the tensors themselves (paradit.parallel.sharding.PeakWeights: every
            parameter's storage, each FSDP unit's shard, its gathered blocks and an all-gather in
            flight): sharded over n ranks it falls as 1/n, to the embeddings and head plus a
            two-block window; the _weights.png figure draws it against the world size.
  memory    GPU: torch.cuda.max_memory_allocated, reset per point. CPU: getrusage ru_maxrss after
            resetting the high-water mark (/proc/self/clear_refs), i.e. the whole process's RSS.
  traffic   the runtime's Traffic counter (paradit.parallel.collectives) over the timed steps, divided
            by their number.
  drift     rank 0 times the probe's matmul (the others wait) before and after every point; a rate
            more than 25% off the run's median rate marks the point suspect (warning, notes, "?").
  speedup   dp x latency(world 1) / latency(point): a dp replica serves its own request, so for
            dp > 1 this is a throughput speedup. efficiency = speedup / world.
  planner   paradit.plan.evaluate for the same layout. GPU: the GPU's preset (h100,
            h200, b200) with the shipped calibration. CPU: a "cpu" GPUSpec measured on the spot
            (fp32 matmul rate and copy bandwidth of one single-threaded rank, gloo all_gather
            bandwidth between two ranks). --write-calibration fits two factors to the measurements
            (compute and communication, see fit_calibration) and writes them for load_calibration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from launcher import (cpu_cores, environment, has_cuda, machine_description, machine_tag,  # noqa: E402
                      results_path, run_world, write_json)
from scaling_fit import (attach_speedups, base_calibration, extrapolate, fit_calibration, gpu_spec,  # noqa: E402
                         predict, write_calibration)
from scaling_layouts import parse_layout, plan_points, split_backend  # noqa: E402
from scaling_measure import drift_notes, model_config, probe_main, world_main  # noqa: E402
from scaling_report import plot, plot_weights, table  # noqa: E402

import paradit.plan as pl  # noqa: E402
from paradit.config import WanConfig  # noqa: E402

DEFAULTS = {  # per device type: what fits a few minutes on this CPU / one 10-minute GPU command
    "cpu": dict(preset="tiny", size="256x256", frames=65, layouts="SP,R,SPxCFG2,DP,CH", steps=7, warmup=2,
                dtype="float32", layers=0),
    "cuda": dict(preset="wan2.2-t2v-a14b", size="1280x720", frames=81, layouts="SP,SPxCFG2", steps=3,
                 warmup=2, dtype="bfloat16", layers=4),      # 4 of 40 blocks: a 1-8 GPU sweep in ~3 min
}


# ============================================================================ the command line
def add_run_args(ap: argparse.ArgumentParser) -> None:
    """The knobs every model benchmark here shares (scaling.py, peers.py): model, video, worlds, timing."""
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--preset", help="model preset (default: tiny on CPU, wan2.2-t2v-a14b on GPU)")
    ap.add_argument("--size", help="WIDTHxHEIGHT of the video (default: 256x256 CPU, 1280x720 GPU)")
    ap.add_argument("--frames", type=int, help="video frames (default: 65 CPU, 81 GPU)")
    ap.add_argument("--layers", type=int, help="shrink the model to this many blocks, times extrapolated per "
                                               "layer; 0 = the preset's depth (default: 4 on GPU, 0 on CPU)")
    ap.add_argument("--worlds", default="1,2,4,8", help="world sizes; those above the device count are skipped")
    ap.add_argument("--steps", type=int, help="timed steps (calls) per point")
    ap.add_argument("--warmup", type=int, help="untimed steps per point (the first is timed apart)")
    ap.add_argument("--sample-steps", type=int, help="denoising steps of a request (default: the preset's)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic of the timed steps behind every derived number; min suits a shared machine")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per world launch")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap)
    ap.add_argument("--layouts", help="comma-separated layouts (see the module docstring)")
    ap.add_argument("--backends", default="auto",
                    help="attention backends, e.g. flash,sdpa (unavailable: skipped); a '+compile' suffix "
                         "(sdpa+compile) times the same with every block torch.compile'd (paradit.compile)")
    ap.add_argument("--measure", default="step", help="step (guided denoising step) and/or forward (one expert)")
    ap.add_argument("--shard-weights", default="none",
                    help="comma-separated: none, sp, request; each layout runs with its weights whole and/or "
                         "sharded over that group (where the group has two ranks or more)")
    ap.add_argument("--calibration", help="calibration JSON for the planner (default: the shipped one)")
    ap.add_argument("--write-calibration", metavar="PATH", help="write fitted factors for load_calibration")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a results JSON (e.g. a GPU run's)")
    return ap.parse_args(argv)


def options(args, device_type: str) -> dict:
    d = DEFAULTS[device_type]
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    w, h = (int(x) for x in pick(args.size, "size").lower().split("x"))
    preset = pick(args.preset, "preset")
    cfg = WanConfig.preset(preset)
    return dict(device=device_type, preset=preset, width=w, height=h, frames=pick(args.frames, "frames"),
                layers=pick(args.layers, "layers") or None, steps=pick(args.steps, "steps"),
                warmup=pick(args.warmup, "warmup"),
                sample_steps=args.sample_steps or cfg.steps, dtype=pick(args.dtype, "dtype"), stat=args.stat)


def available_backends(names: list[str], device_type: str) -> tuple[list[str], list[str]]:
    from paradit.models.attention import _flash_module, fa4_available
    ok, notes = [], []
    for b in names:
        name, mode = b.partition("+")[::2]
        if mode not in ("", "compile"):
            notes.append(f"backend {b!r}: unknown suffix {mode!r} (only +compile), skipped")
        elif name == "flash" and (device_type != "cuda" or _flash_module() is None):
            notes.append("backend flash skipped: needs CUDA and flash-attn")
        elif name == "fa4" and (device_type != "cuda" or not fa4_available()):
            notes.append("backend fa4 skipped: needs CUDA and flash-attn-4")
        elif name in ("auto", "fa4", "flash", "sdpa", "math"):
            ok.append(b)
        else:
            notes.append(f"backend {b!r} unknown, skipped")
    return ok, notes


def replot(path: str) -> Path:
    """Redraw the PNG of a results JSON; SystemExit with the reason for a file it cannot read."""
    try:
        data = json.loads(Path(path).read_text())
        data["points"], data["title"], data["settings"]["device"]
    except OSError as err:
        raise SystemExit(f"scaling.py: --replot {path}: cannot read it ({err.strerror})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"scaling.py: --replot {path}: not a results JSON of this script ({type(err).__name__}: "
                         f"{err})") from None
    png = Path(path).with_suffix(".png")
    cores = data["environment"]["cpu_cores"] if data["settings"]["device"] == "cpu" else None
    plot(data["points"], data["title"], png, data["settings"]["device"], cores)
    plot_weights(data["points"], data["title"], png)
    return png


def plan(args, device_type: str, cfg: WanConfig) -> tuple[list[dict], list[str]]:
    """The sweep's points, and notes on what it leaves out."""
    specs = [parse_layout(t) for t in (args.layouts or DEFAULTS[device_type]["layouts"]).split(",") if t.strip()]
    backends, notes = available_backends(args.backends.split(","), device_type)
    max_world = torch.cuda.device_count() if device_type == "cuda" else 64
    worlds = [int(w) for w in args.worlds.split(",")]
    points, skipped = plan_points(specs, worlds, cfg.num_heads, backends, args.measure.split(","), max_world,
                                  tuple(args.shard_weights.split(",")))
    return points, notes + skipped


# ============================================================================ the run
def run(points: list[dict], opts: dict, device_type: str, timeout_s: float) -> tuple[dict, list[dict]]:
    """The hardware probe, then every world's points: rank 0's merged records."""
    probe_world = 2 if max(p["world"] for p in points) >= 2 else 1
    probe = run_world(probe_main, probe_world, device_type, device_type=device_type, timeout_s=timeout_s)[0]
    print(f"probe: matmul {probe['matmul']['tflops'] * 1e3:.4g} GFLOP/s ({probe['matmul']['dtype']}), copy "
          f"{probe['copy_gbps']:.3g} GB/s" + (f", all_gather {probe['all_gather']['gbps']:.3g} GB/s per rank"
                                              if "all_gather" in probe else ""), flush=True)
    records = []
    for world in sorted({p["world"] for p in points}):
        mine = [p for p in points if p["world"] == world]
        what = [p["label"] + ("" if p["measure"] == "step" else " (forward)") for p in mine]
        print(f"world {world}: {', '.join(what)}", flush=True)
        records += run_world(world_main, world, mine, opts, device_type=device_type, timeout_s=timeout_s)[0]
    return probe, records


def analyse(records: list[dict], probe: dict, cfg: WanConfig, full_cfg: WanConfig, opts: dict, tag: str,
            calibration: str | None) -> dict:
    """The planner's predictions (shipped and fitted factors), speedups, the fit and the extrapolation,
    written into the records; returns the drift notes, the spec, the calibration, the fit and the
    extrapolation."""
    device_type = opts["device"]
    drift = drift_notes(records, probe)
    spec, spec_how = gpu_spec(device_type, tag, probe)
    base = base_calibration(device_type, calibration)
    for p in records:
        p["predicted"] = predict(p, cfg, opts, spec, base)
    attach_speedups(records, opts["sample_steps"])
    used = base.for_gpu(spec.name)      # the factors the predictions were made with (make_problem's)
    fit = fit_calibration(records, used, cpu_cores() if device_type == "cpu" else 10**6)
    fitted = dataclasses.replace(used, **fit["factors"])
    for p in records:
        p["predicted_fit"] = predict(p, cfg, opts, spec, fitted)
    extra = extrapolate(records, cfg, full_cfg, opts)
    for p in records:   # against the dense matmul timed in the probe, in the run's dtype on GPU
        p["achieved_vs_matmul"] = p["achieved_tflops_per_device"] / probe["matmul"]["tflops"]
    return dict(drift=drift, spec=spec, spec_how=spec_how, base=base, fit=fit, extra=extra)


def print_report(records: list[dict], probe: dict, cfg: WanConfig, full_cfg: WanConfig, a: dict) -> None:
    """The table, the extrapolation, the compiled points' graph builds, the fit, the drift warnings."""
    fit = a["fit"]
    print(table(records))
    if a["extra"]:
        print(f"extrapolated to {full_cfg.num_layers} layers (step x {full_cfg.num_layers}/{cfg.num_layers}):")
        for p in records:
            e = p["extrapolated"]
            print(f"  {p['label']:<28} {p['backend']:<6} {p['measure']:<8} {e['step_s']:.4g} s, "
                  f"~{e['peak_mem_mb'] / 1024:.1f} GiB peak, achieved {p['achieved_tflops_per_device']:.4g} TFLOP/s "
                  f"per device vs matmul {probe['matmul']['tflops']:.4g}")
    for p in records:
        if split_backend(p["backend"])[1]:
            print(f"compiled: {p['label']} {p['measure']}: first call {p['first_call_s']:.3g} s (graph build), "
                  f"then {p['step_s']['headline']:.3g} s per step")
    print(f"fit: compute x{fit['compute_scale']:.3g} ({fit['compute_points']} points), comm x{fit['comm_scale']:.3g} "
          f"({fit['comm_points']} points)" + (f"; capped at 1: {', '.join(fit['capped'])}" if fit["capped"] else ""))
    for n in a["drift"]:
        print("WARNING:", n)


def write(args, result: dict, settings: str, a: dict) -> None:
    """The JSON, the figures and, with --write-calibration, the fitted factors."""
    tag, device_type, fit, spec = result["machine"], result["settings"]["device"], a["fit"], a["spec"]
    json_path = write_json(results_path("scaling", "json", args.out, tag), result)
    png_path = results_path("scaling", "png", args.out, tag)
    plot(result["points"], result["title"], png_path, device_type, cpu_cores() if device_type == "cpu" else None)
    weights_png = plot_weights(result["points"], result["title"], png_path)
    print(f"wrote {json_path} and {png_path}" + (f" and {weights_png}" if weights_png else ""))
    if args.write_calibration:
        note = (f"measured by bench/scaling.py on {result['date']}, {result['machine_description']}, {settings}; "
                f"compute x{fit['compute_scale']:.3g}, comm x{fit['comm_scale']:.3g} relative to "
                f"{Path(args.calibration or pl.DEFAULT_CALIBRATION).name}; details in the scaling JSON of that date")
        write_calibration(args.write_calibration, spec.name, fit, args.calibration, note)
        print(f"wrote calibration {args.write_calibration} (gpus.{spec.name})")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        print(f"wrote {replot(args.replot)}")
        return 0
    device_type = "cuda" if (args.device == "cuda" or (args.device == "auto" and has_cuda())) else "cpu"
    opts = options(args, device_type)
    cfg, full_cfg = model_config(opts), WanConfig.preset(opts["preset"])
    points, notes = plan(args, device_type, cfg)
    tag = machine_tag(device_type)
    print(f"scaling: {cfg.name} ({cfg.num_layers} layers), {opts['width']}x{opts['height']}x{opts['frames']} "
          f"({cfg.num_tokens(opts['width'], opts['height'], opts['frames'])} tokens), {opts['dtype']}, "
          f"{len(points)} points on {machine_description(device_type)}", flush=True)
    for n in notes:
        print("  note:", n)

    t0 = time.time()
    probe, records = run(points, opts, device_type, args.timeout)
    a = analyse(records, probe, cfg, full_cfg, opts, tag, args.calibration)
    notes += a["drift"]
    settings = (f"{cfg.name}{f' ({cfg.num_layers} of {full_cfg.num_layers} layers)' if opts['layers'] else ''}, "
                f"{opts['width']}x{opts['height']}x{opts['frames']}, {opts['dtype']}, CFG on, "
                f"{opts['sample_steps']} steps/request, {opts['stat']} of {opts['steps']} timed steps")
    title = f"{machine_description(device_type)} [{tag}]\n{settings}"
    print_report(records, probe, cfg, full_cfg, a)
    result = dict(what="scaling", date=time.strftime("%Y-%m-%d"), machine=tag, title=title,
                  machine_description=machine_description(device_type), environment=environment(), settings=opts,
                  model=dataclasses.asdict(cfg),
                  tokens=cfg.num_tokens(opts["width"], opts["height"], opts["frames"]), probe=probe,
                  planner=dict(spec=dataclasses.asdict(a["spec"]), spec_how=a["spec_how"],
                               calibration=dataclasses.asdict(a["base"]), fit=a["fit"],
                               fit_method=fit_calibration.__doc__),
                  extrapolation=a["extra"], notes=notes, method=__doc__, points=records, wall_s=time.time() - t0)
    write(args, result, settings, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peers side by side: paradit, diffusers and xDiT (xfuser) on the same Wan weights, inputs and layouts.

    python bench/peers.py --worlds 1,2,4 --stat min          # CPU: tiny preset, gloo worlds
    python bench/peers.py --layers 4                         # one GPU: A14B shape at 1280x720x81, 4 of 40 blocks
    python bench/peers.py --worlds 1,2,4,8 --layers 4        # GPUs: xfuser's Ulysses / Ring layouts too

One command: it launches each world itself (bench/launcher.run_world, like scaling.py) and writes
bench/results/<date>_<machine>_peers.json. Knobs and defaults are scaling.py's (--preset, --size,
--frames, --layers, --dtype, --steps, --warmup, --stat, --worlds); --layouts takes its syntax,
sequence-parallel terms only (U, R, SP; default U,R,U2R: U2 and R2 at world 2; U4, R4 and U2R2 at 4).

Installing the peers: `pip install -e .[peers]` (xfuser and its needs; diffusers is paradit's own
dependency). Without touching an environment's pins, e.g. on a GPU image that already has torch:
    pip install --no-deps --target /tmp/peers_site diffusers xfuser yunchang distvae beautifulsoup4 soupsieve av
    PYTHONPATH=/tmp/peers_site python bench/peers.py
(xfuser also imports transformers, accelerate, peft, einops, sentencepiece and, through torch's CUDA
build, triton). xfuser does not run without a GPU: on CPU its row says why, in its own words.

Who runs (every library holds the same random weights: paradit's tensors, renamed by
paradit.checkpoint.to_diffusers_name and assigned, not copied; the modules diffusers'
from_pretrained keeps in fp32 (_keep_in_fp32_modules) are upcast as it would; the same latent,
timestep and text embeddings):
  paradit    WanTransformer: the single device and every layout.
  diffusers  WanTransformer3DModel at world 1: the one-device baseline. Needed: the script stops
             with the package named if it does not import.
  xfuser     xFuserWanTransformer3DWrapper, diffusers' model with xfuser's USP attention processors,
             set up as its runner does (init_distributed_environment, initialize_model_parallel with
             ulysses_degree / ring_degree, initialize_runtime_state with xFuserArgs' engine config):
             at world 1 (no sequence parallelism) and every layout, when it imports; otherwise a row
             per world says why it did not run (never a silent omission). xfuser's Wan T2V runners have
             no CFG parallelism, so CFG layouts are scaling.py's alone.

Measures (--measure, default both):
  forward  one expert forward, batch 1: the full latent in, the full output on every rank. paradit:
           parallelize(model, mesh), which shards the tokens and all-gathers the output; xfuser: its
           wrapper, which chunks the sequence (zero-padding it to a multiple of the sp degree; the
           padded keys then take part in attention, which the rel err column shows where the tokens do
           not divide) and all-gathers the output; diffusers: the model.
  step     one guided velocity (cond + uncond, then the CFG combine) as each library runs it in its
           pipeline. paradit: bench/scaling_measure.py's measure_point unchanged: Runtime.velocity on
           the rank's token shard, cond and uncond batched, plus the Euler update (so its comm share
           and bytes per collective come too). diffusers: one batch-2 forward (cond, uncond) and the
           combine.
           xfuser: two forwards, cond then uncond, and the combine, the way diffusers' WanPipeline
           (which xfuser's Wan T2V runner drives) calls the transformer.
  time     a first call timed apart (first_call_s), --warmup - 1 more untimed, then --steps timed calls,
           each after a barrier; CUDA events on GPU, perf_counter on CPU; the slowest rank of each call
           counts; --stat (median, or min on a shared machine) picks the headline.
  memory   GPU: torch.cuda.max_memory_allocated over the timed calls (the weights are shared, so every
           library's figure includes the same weights once). CPU: the process's peak RSS, high-water
           mark reset per row (scaling_measure.reset_memory).
  rel err  ||out - ref|| / ||ref|| in fp64 (paradit.demo.judge.rel_err); ref = paradit's single-device
           output of the same measure (step: the guided velocity, before any update), computed once
           outside the timing. It proves both sides computed the same function: ~1e-6 in fp32, ~1e-2
           in bf16 (different summation orders and where each library rounds to bf16).
  speedup  paradit's single-device time of the same measure / the row's time (latency, not per GPU).
  drift    rank 0 times a matmul before and after every row; > 25% off the run's median marks the row
           suspect ("?", a note), as scaling.py does.
  --layers N builds N blocks; times and memory are extrapolated per layer by scaling_fit.extrapolate.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from launcher import environment, has_cuda, machine_description, machine_tag, results_path, run_world, write_json  # noqa: E402
from peers_measure import world_main  # noqa: E402
from scaling import add_run_args, options  # noqa: E402
from scaling_fit import extrapolate  # noqa: E402
from scaling_layouts import parse_layout, plan_points  # noqa: E402
from scaling_measure import drift_notes, model_config  # noqa: E402

from paradit.config import WanConfig  # noqa: E402

LIBRARIES = ("paradit", "diffusers", "xfuser")   # the order of rows in a world: paradit's single ones first
DEFAULT_LAYOUTS = "U,R,U2R"


# ============================================================================ the sweep
def layout_name(config: dict) -> str:
    u, r = config["ulysses"], config["ring"]
    return "single" if u * r == 1 else (f"U{u}" if u > 1 else "") + (f"R{r}" if r > 1 else "")


def plan(args, cfg: WanConfig, device_type: str) -> tuple[list[dict], list[str]]:
    """Every row to run: paradit's points from scaling_layouts.plan_points, diffusers at world 1, xfuser wherever
    paradit runs a layout."""
    specs = [parse_layout(t) for t in (args.layouts or DEFAULT_LAYOUTS).split(",") if t.strip()]
    for s in specs:
        if {t for t, _ in s.terms} - {"U", "R", "SP"}:
            raise SystemExit(f"--layouts {s.text!r}: peers.py compares sequence-parallel layouts (U, R, SP terms); "
                             f"CFG, DP and CHORDS layouts are scaling.py's")
    max_world = torch.cuda.device_count() if device_type == "cuda" else 64
    worlds = [int(w) for w in args.worlds.split(",")]
    points, notes = plan_points(specs, worlds, cfg.num_heads, ["auto"], args.measure.split(","), max_world)
    rows = []
    for p in points:
        base = dict(world=p["world"], config=p["config"], measure=p["measure"], backend="auto",
                    layout=layout_name(p["config"]))
        rows.append(dict(base, library="paradit", label=f"paradit {base['layout']}"))
        if p["world"] == 1:
            rows.append(dict(base, library="diffusers", label="diffusers single"))
        rows.append(dict(base, library="xfuser", label=f"xfuser {base['layout']}"))
    rows.sort(key=lambda r: (r["world"], LIBRARIES.index(r["library"])))   # paradit's single rows: the reference
    return rows, notes


def run_sweep(rows: list[dict], opts: dict, device_type: str, timeout_s: float) -> list[dict]:
    records, xfuser_why = [], None
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        ref_path = str(Path(tmp) / "paradit_single.pt")
        for world in sorted({r["world"] for r in rows}):
            mine = [r for r in rows if r["world"] == world]
            if xfuser_why:   # it failed to import in world 1: the same here, say so once for the world
                skipped = [r for r in mine if r["library"] == "xfuser"]
                mine = [r for r in mine if r["library"] != "xfuser"]
                if skipped:
                    records.append(dict(skipped[0], layout=", ".join(dict.fromkeys(r["layout"] for r in skipped)),
                                        measure="-", status="did not run", reason=xfuser_why))
            print(f"world {world}: {', '.join(dict.fromkeys(r['label'] for r in mine))}", flush=True)
            out = run_world(world_main, world, mine, opts, ref_path, device_type=device_type, timeout_s=timeout_s)[0]
            xfuser_why = xfuser_why or next((r["reason"] for r in out if r.get("unavailable")), None)
            records += _collapse_xfuser_failures(out)
    return sorted(records, key=lambda r: (r["world"], LIBRARIES.index(r["library"])))


def _collapse_xfuser_failures(records: list[dict]) -> list[dict]:
    """One row per world for an xfuser that did not run for one reason at every layout and measure."""
    failed = [r for r in records if r["library"] == "xfuser" and r.get("status")]
    reasons = {r["reason"] for r in failed}
    if len(failed) < 2 or len(reasons) != 1:
        return records
    keep = [r for r in records if r not in failed]
    return keep + [dict(failed[0], layout=", ".join(dict.fromkeys(r["layout"] for r in failed)), measure="-")]


def attach_speedups(records: list[dict]) -> None:
    base = {r["measure"]: r["step_s"]["headline"] for r in records
            if r["library"] == "paradit" and r["world"] == 1 and "step_s" in r}
    for r in records:
        if "step_s" in r:
            ref = base.get(r["measure"])
            r["speedup_vs_paradit_single"] = ref / r["step_s"]["headline"] if ref else None


def table(records: list[dict], extrapolated: dict | None) -> str:
    head = ["library", "layout", "world", "measure", "time ms [min-max]", "speedup vs paradit single", "peak MB",
            "rel err vs paradit", "notes"]
    if extrapolated:   # the same time and memory scaled to the full depth (scaling_fit.extrapolate)
        head[5:5] = [f"s x{extrapolated['layers_full']}/{extrapolated['layers_run']} layers", "peak GiB (full)"]
    rows = [head]
    for r in records:
        if "step_s" not in r:
            cells = [r["library"], r["layout"], str(r["world"]), r["measure"], "did not run", "-", "-", "-",
                     "did not run: " + r["reason"]]
        else:
            st, err = r["step_s"], r.get("rel_err_vs_paradit")
            cells = [r["library"], r["layout"] + (" ?" if r.get("suspect") else ""), str(r["world"]), r["measure"],
                     f"{1e3 * st['headline']:.4g} [{1e3 * st['min']:.4g}-{1e3 * st['max']:.4g}]",
                     "-" if r["speedup_vs_paradit_single"] is None else f"{r['speedup_vs_paradit_single']:.2f}",
                     f"{r['peak_mem_mb']['max']:.0f}", _err(r, err), r["attention"]]
        if extrapolated:
            e = r.get("extrapolated")
            cells[5:5] = ["-", "-"] if not e else [f"{e['step_s']:.4g}", f"{e['peak_mem_mb'] / 1024:.1f}"]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]) for row in rows)


def _err(r: dict, err: float | None) -> str:
    if r["library"] == "paradit" and r["world"] == 1:
        return "ref"
    return "-" if err is None else f"{err:.1e}"


def versions() -> dict:
    out = {}
    for name in ("torch", "diffusers", "xfuser", "yunchang", "triton", "flash-attn"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap)
    ap.add_argument("--layouts", help=f"comma-separated U / R / SP layouts, scaling.py's syntax (default {DEFAULT_LAYOUTS})")
    ap.add_argument("--measure", default="forward,step", help="forward (one expert) and/or step (guided velocity)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device_type = "cuda" if (args.device == "cuda" or (args.device == "auto" and has_cuda())) else "cpu"
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit("peers.py: the one-device baseline needs the 'diffusers' package, which is not importable "
                         "here: pip install diffusers (or put its wheel on PYTHONPATH; see bench/README.md)")
    opts = options(args, device_type)
    cfg, full_cfg = model_config(opts), WanConfig.preset(opts["preset"])
    rows, notes = plan(args, cfg, device_type)
    tag = machine_tag(device_type)
    tokens = cfg.num_tokens(opts["width"], opts["height"], opts["frames"])
    depth = f" ({cfg.num_layers} of {full_cfg.num_layers} layers)" if cfg.num_layers != full_cfg.num_layers else ""
    settings = (f"{cfg.name}{depth}, {opts['width']}x{opts['height']}x{opts['frames']} ({tokens} tokens), "
                f"{opts['dtype']}, {opts['stat']} of {opts['steps']} timed calls")
    print(f"peers: {settings} on {machine_description(device_type)}", flush=True)
    for n in notes:
        print("  note:", n)

    t0 = time.time()
    records = run_sweep(rows, opts, device_type, args.timeout)
    ran = [r for r in records if "step_s" in r]
    rates = [v for r in ran for v in r["machine_speed"].values() if v is not None]
    drift = drift_notes(ran, {"matmul": {"tflops": statistics.median(rates)}}) if rates else []
    attach_speedups(records)
    extra = extrapolate(ran, cfg, full_cfg, opts)
    print(table(records, extra))
    if extra:
        print(f"extrapolated: {extra['how']}")
    for n in notes + drift:
        print("note:", n)

    title = f"{machine_description(device_type)} [{tag}]\n{settings}"
    result = dict(what="peers", date=time.strftime("%Y-%m-%d"), machine=tag, title=title,
                  machine_description=machine_description(device_type), environment=environment() | {"versions": versions()},
                  settings=opts, model=dataclasses.asdict(cfg), tokens=tokens, extrapolation=extra,
                  notes=notes + drift, method=__doc__, rows=records, wall_s=time.time() - t0)
    path = write_json(results_path("peers", "json", args.out, tag), result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

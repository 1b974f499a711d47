"""Every parallel layout against one device, in one command: the model output and the final latent.

    python bench/validate_layouts.py                          # CPU: gloo, worlds 2 and 4, fp32
    python bench/validate_layouts.py --dtype bf16 --worlds 1  # one GPU: the world-1 reference alone
    python bench/validate_layouts.py --dtype bf16 --worlds 2,4,8 --preset wan2.2-t2v-a14b --layers 2
                                                              # a multi-GPU node: NCCL, every layout
    python bench/validate_layouts.py --shard-weights sp,request   # each layout also with sharded weights

1. The reference runs in this process at world 1 on --device (cuda when there is one): seeded
   random weights of --preset (the tiny validation model by default: 8 heads, so that Ulysses 8
   fits; --layers cuts a preset's blocks), one model forward on a fixed random input, and the
   final latent of two prompts through the pipeline (the sequential sampler; CHORDS at world 1 for
   the CHORDS rows).
2. For every world in --worlds it launches `torchrun --standalone --nproc-per-node W` on this file;
   each rank builds the same weights, and for each layout of that world (LAYOUTS: Ulysses, Ring,
   both, CFG-parallel, data parallel, CHORDS cores, split expert stages, and products of them)
   computes the model output (parallelize, full output on every rank) and the final latent
   (Pipeline.__call__; split stages through Pipeline.stream, as the CLI does;
   data-parallel replicas each take one prompt), then compares them with the reference:
   relative error ||x - ref|| / ||ref|| on every rank that holds the result.
3. Prints one table (worst rank per row) and writes bench/results/<date>_<machine>_layouts.json.
   A row fails above the dtype's tolerance (fp32: 1e-5, only summation order differs; bf16: 3e-2,
   rounding at different points); the exit code is non-zero when any row fails.
With --shard-weights MODES every layout also runs with its experts' blocks sharded over each of
those groups that has two ranks or more (paradit.parallel.sharding; rows named "<layout> shard:<mode>").
The token count (80x48x9 -> 45 tokens) divides by none of the worlds: every split is uneven.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from paradit.config import WanConfig  # noqa: E402
from paradit.demo.judge import rel_err  # noqa: E402
from paradit.plan.layout import ParallelConfig  # noqa: E402

PROMPTS = ["a red circle moving left", "a blue square moving up"]
VIDEO = dict(width=80, height=48, frames=9, steps=4, seed=11, progress=False, negative_prompt="blurry")
TOL = {"fp32": 1e-5, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = {  # world -> (name, ParallelConfig fields)
    2: [("U2", dict(ulysses=2)), ("R2", dict(ring=2)), ("CFG2", dict(cfg=2)), ("DP2", dict(dp=2)),
        ("CH2", dict(chords=2)), ("split 1|1", dict(experts="split", stages=((1, 1, 1), (1, 1, 1))))],
    4: [("U4", dict(ulysses=4)), ("R4", dict(ring=4)), ("U2R2", dict(ulysses=2, ring=2)),
        ("U2xCFG2", dict(ulysses=2, cfg=2)), ("U2xDP2", dict(ulysses=2, dp=2)), ("U2xCH2", dict(ulysses=2, chords=2)),
        ("split U2|U2", dict(experts="split", stages=((2, 1, 1), (2, 1, 1))))],
    8: [("U8", dict(ulysses=8)), ("R8", dict(ring=8)), ("U4R2", dict(ulysses=4, ring=2)),
        ("U2R2xCFG2", dict(ulysses=2, ring=2, cfg=2)), ("U2xCFG2xDP2", dict(ulysses=2, cfg=2, dp=2)),
        ("U2xCFG2xCH2", dict(ulysses=2, cfg=2, chords=2)),
        ("split U4|U2xCFG2", dict(experts="split", stages=((4, 1, 1), (2, 1, 2))))],
}


def model_config(preset: str, layers: int | None) -> WanConfig:
    if preset == "validation":  # tiny, but with 8 heads so that every Ulysses degree up to 8 fits
        base = WanConfig.preset("tiny")
        return base.replace(name="validation", dim=64, num_heads=8, ffn_dim=96)
    cfg = WanConfig.preset(preset)
    return cfg.replace(num_layers=layers) if layers else cfg


def components(cfg: WanConfig, device, dtype, needed=None):
    from paradit.pipeline import tiny_components
    experts, text, _ = tiny_components(cfg, device, dtype, seed=5, needed=needed)
    return experts, text


def model_inputs(cfg: WanConfig, device, dtype):
    g = torch.Generator("cpu").manual_seed(3)
    x = torch.randn(1, cfg.in_channels, 3, 6, 10, generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    return x.to(device, dtype), torch.tensor([700.0], device=device), ctx.to(device, dtype)


def chords_settings():
    from paradit.settings import ChordsSettings
    return ChordsSettings(2, None, None)


# ----------------------------------------------------------------------------- world 1
def reference(cfg: WanConfig, device, dtype) -> dict:
    from paradit.pipeline import Pipeline
    experts, text = components(cfg, device, dtype)
    pipe = Pipeline(cfg, experts, text, None)
    with torch.no_grad():
        out = experts[0](*model_inputs(cfg, device, dtype)).float().cpu()
    latents = [pipe(p, output="latent", **VIDEO) for p in PROMPTS]
    chords = [pipe(p, output="latent", chords=chords_settings(), **VIDEO) for p in PROMPTS]
    return dict(model=out, latents=latents, chords=chords)


# ----------------------------------------------------------------------------- one rank of a world
def run_layout(cfg: WanConfig, fields: dict, ref: dict, device, dtype) -> dict:
    """This rank's errors for one layout: model output and latent, where this rank holds them."""
    import torch.distributed as dist

    from paradit.parallel import init_parallel, parallelize
    from paradit.pipeline import Pipeline
    pc = ParallelConfig(**fields)
    mesh = init_parallel(pc, device, num_heads=cfg.num_heads)
    row = {"rank": dist.get_rank()}
    if pc.experts == "split":
        from paradit.settings import VideoSettings
        stage = mesh.coords["stage"]
        experts, text = components(cfg, device, dtype, needed={stage})
        pipe = Pipeline(cfg, experts, text if stage == 0 else None, None, mesh=mesh)
        s = VideoSettings.resolve(cfg, VIDEO["width"], VIDEO["height"], VIDEO["frames"], VIDEO["steps"],
                                  None, None, VIDEO["seed"], "unipc")
        done = {}
        pipe.stream([(p, VIDEO["negative_prompt"], s) for p in PROMPTS],
                    on_done=lambda i, lat, _: done.__setitem__(i, lat), progress=False)
        if mesh.is_output_rank:
            row["latent"] = max(rel_err(done[i], ref["latents"][i]) for i in range(len(PROMPTS)))
        return row
    experts, text = components(cfg, device, dtype)
    if mesh.shard_mesh is not None:    # the model check runs the sharded expert too (the Pipeline keeps it)
        from paradit.parallel.sharding import apply_weight_sharding
        apply_weight_sharding(experts[0], mesh.shard_mesh)
    with torch.no_grad():
        out = parallelize(experts[0], mesh)(*model_inputs(cfg, device, dtype)).float().cpu()
    row["model"] = rel_err(out, ref["model"])
    pipe = Pipeline(cfg, experts, text, None, mesh=mesh)
    chords = chords_settings() if pc.chords > 1 else None
    mine = [i for i in range(len(PROMPTS)) if i % pc.dp == mesh.rank("dp")]
    for i in mine:
        latent = pipe(PROMPTS[i], output="latent", chords=chords, **VIDEO)
        if mesh.is_output_rank:
            want = ref["chords" if chords else "latents"][i]
            row["latent"] = max(row.get("latent", 0.0), rel_err(latent, want))
    return row


def with_sharding(layouts: list, modes: str) -> list:
    """Each (name, fields), then the same with each sharding mode it allows."""
    from paradit.plan.sharding import refusal
    out = []
    for name, fields in layouts:
        out.append((name, fields))
        for mode in filter(None, modes.split(",")):
            sharded = fields | {"shard_weights": mode}
            if not refusal(ParallelConfig(**sharded)):
                out.append((f"{name} shard:{mode}", sharded))
    return out


def worker(args) -> None:
    """Under torchrun: every layout of this world; rank 0 writes the rows."""
    import torch.distributed as dist

    from paradit.launch import init_distributed
    info = init_distributed(args.device)
    if info.device.type == "cpu":
        torch.set_num_threads(1)
    cfg = model_config(args.preset, args.layers)
    ref = torch.load(args.reference)
    rows = []
    for name, fields in with_sharding(LAYOUTS[info.world_size], args.shard_weights):
        t0 = time.perf_counter()
        mine = run_layout(cfg, fields, ref, info.device, DTYPES[args.dtype])
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
        model = [r["model"] for r in every if "model" in r]
        latent = [r["latent"] for r in every if "latent" in r]
        rows.append(dict(world=info.world_size, layout=name, fields=fields, model_err=max(model) if model else None,
                         latent_err=max(latent) if latent else None, ranks_with_result=len(latent),
                         seconds=time.perf_counter() - t0))
    if info.rank == 0:
        Path(args.rows).write_text(json.dumps(rows))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the command
def launch(world: int, args, ref_file: Path, rows_file: Path) -> list[dict]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
            str(Path(__file__).resolve()), "--worker", "--reference", str(ref_file), "--rows", str(rows_file),
            "--preset", args.preset, "--dtype", args.dtype, "--device", args.device,
            "--shard-weights", args.shard_weights]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0:
        return [dict(world=world, layout="(all)", error=(res.stderr or res.stdout)[-2000:])]
    return json.loads(rows_file.read_text())


def table(rows: list[dict], tol: float) -> str:
    lines = ["world | layout | model output rel err | final latent rel err | result", "---|---|---|---|---"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['world']} | {r['layout']} | - | - | FAILED: {r['error'].strip().splitlines()[-1]}")
            continue
        errs = [e for e in (r["model_err"], r["latent_err"]) if e is not None]
        ok = bool(errs) and max(errs) <= tol
        fmt = lambda e: "-" if e is None else f"{e:.2e}"  # noqa: E731
        lines.append(f"{r['world']} | {r['layout']} | {fmt(r['model_err'])} | {fmt(r['latent_err'])} | "
                     f"{'ok' if ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--worlds", default="2,4", help="comma-separated world sizes (1: the reference alone)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--preset", default="validation", help="'validation' (tiny, 8 heads) or a preset name")
    p.add_argument("--layers", type=int, help="blocks to build of a preset (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timeout", type=float, default=900, help="seconds for one world")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>_<machine>_layouts.json)")
    p.add_argument("--shard-weights", default="", help="comma-separated sp, request: every layout also with its "
                                                      "weights sharded over that group (where it has 2+ ranks)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    worlds = [int(w) for w in args.worlds.split(",")]
    unknown = [w for w in worlds if w != 1 and w not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--worlds {args.worlds}: layouts are defined for worlds 1, {', '.join(map(str, LAYOUTS))}")
    cfg, dtype = model_config(args.preset, args.layers), DTYPES[args.dtype]
    t0 = time.perf_counter()
    ref = reference(cfg, torch.device(args.device), dtype)
    rows = [dict(world=1, layout="single device (reference)", model_err=0.0, latent_err=0.0,
                 seconds=time.perf_counter() - t0, finite=bool(all(torch.isfinite(t).all() for t in
                                                                  [ref["model"], *ref["latents"], *ref["chords"]])))]
    with tempfile.TemporaryDirectory() as tmp:
        ref_file = Path(tmp) / "reference.pt"
        torch.save(ref, ref_file)
        for world in (w for w in worlds if w > 1):
            rows += launch(world, args, ref_file, Path(tmp) / f"rows{world}.json")
    tol = TOL[args.dtype]
    print(table(rows, tol))
    from launcher import environment, machine_tag
    out = args.out or HERE / "results" / f"{time.strftime('%Y-%m-%d')}_{machine_tag()}_layouts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(method=__doc__, preset=cfg.name, dtype=args.dtype, tolerance=tol, device=args.device,
                                   environment=environment(), rows=rows), indent=1, default=str))
    print(f"wrote {out}")
    failed = [r for r in rows if "error" in r or max(e for e in (r["model_err"], r["latent_err"], 0.0)
                                                      if e is not None) > tol]
    finite = rows[0]["finite"]
    return 0 if not failed and finite else 1


if __name__ == "__main__":
    sys.exit(main())

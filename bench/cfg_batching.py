"""Batched CFG (cond and uncond in one batch-2 forward) against two batch-1 forwards in turn.

    python bench/cfg_batching.py                       # GPU: A14B blocks at 1280x720x81, 4 of 40 layers
    python bench/cfg_batching.py --size 64x64 --frames 5 --preset tiny     # CPU, small

One guided velocity (paradit.parallel.runtime.Runtime.velocity at world 1) each way, on the same
random bf16 weights (fp32 on CPU) and inputs: median of --repeats after --warmup, device
synchronised; peak memory per way; the two velocities' relative difference (the same math in
another batch). Writes bench/results/<date>_<machine>_cfg_batching.json.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launcher import environment, results_path  # noqa: E402

from paradit.config import WanConfig  # noqa: E402
from paradit.models.transformer import WanTransformer, token_grid  # noqa: E402
from paradit.parallel.mesh import single_device_mesh  # noqa: E402
from paradit.parallel.runtime import Runtime  # noqa: E402


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.2-t2v-a14b" if gpu else "tiny")
    p.add_argument("--size", default="1280x720" if gpu else "64x64")
    p.add_argument("--frames", type=int, default=81 if gpu else 5)
    p.add_argument("--layers", type=int, default=4 if gpu else 2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    cfg = WanConfig.preset(args.preset).replace(num_layers=args.layers)
    torch.manual_seed(0)
    model = WanTransformer(cfg).to(device, dtype).eval().requires_grad_(False)
    runtime = Runtime(single_device_mesh(device), "auto", dtype)
    runtime.bind(model)
    w, h = map(int, args.size.split("x"))
    shape = cfg.latent_shape(w, h, args.frames)
    grid = token_grid(shape, cfg.patch)
    tokens = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, math.prod(cfg.patch) * cfg.in_channels, generator=g).to(device)   # (L, P*C)
    cond, uncond = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device, dtype) for _ in range(2))
    t = torch.tensor(700.0, device=device)
    rows, outs = {}, {}
    for name, batch in (("batched", True), ("in turn", False)):
        runtime.batch_cfg = batch
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        with torch.no_grad():
            for i in range(args.warmup + args.repeats):
                if gpu:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                v = runtime.velocity(model, x, t, cond, uncond, 4.0, grid)
                if gpu:
                    torch.cuda.synchronize(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        outs[name] = v.float().cpu()
        rows[name] = {"median_s": statistics.median(times), "min_s": min(times),
                      "per_layer_s": statistics.median(times) / args.layers,
                      "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if gpu else None}
        print(f"{name}: {rows[name]}", flush=True)
    a, b = outs["batched"].double(), outs["in turn"].double()
    result = {"method": __doc__, "environment": environment(), "preset": args.preset, "size": args.size,
              "frames": args.frames, "tokens": tokens, "layers": args.layers, "rows": rows,
              "in_turn_over_batched": rows["in turn"]["median_s"] / rows["batched"]["median_s"],
              "rel_diff": ((a - b).norm() / a.norm()).item()}
    out = args.out or results_path("cfg_batching", "json")
    out.write_text(json.dumps(result, indent=1))
    print(f"in turn / batched: {result['in_turn_over_batched']:.3f}; rel diff {result['rel_diff']:.2e}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The planner CLI: rank parallel layouts for one model, video size and machine.

    python -m paradit.plan --model wan2.2-t2v-a14b --gpus 8 --gpu h200 --size 1280x720 --frames 81

Prints a ranked table (predicted step time, latency, throughput, per-GPU memory, exposed
communication share), a summary of what was ruled out and why, and the planner's explanation.
`--json` prints the plan as JSON instead. The cost model is described in paradit/parallel/planner.py.
"""
from __future__ import annotations

import argparse
import math
import sys

from paradit.config import WanConfig
from paradit.parallel.planner import GPUS, Plan, load_calibration, plan
from paradit.residency import OFFLOAD_MODES


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1280x720; got {text!r}")
    return w, h


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m paradit.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="wan2.2-t2v-a14b", choices=WanConfig.names())
    ap.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    ap.add_argument("--gpu", default="h200", choices=sorted(GPUS), help="GPU preset")
    ap.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default: the model's)")
    ap.add_argument("--frames", type=int, default=None, help="frames (default: the model's)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    ap.add_argument("--calibration", default=None, help="calibration JSON (default: shipped one)")
    ap.add_argument("--max-chords", type=int, default=1,
                    help="consider CHORDS with up to this many cores (4, 6, 8); default off")
    ap.add_argument("--offload", default="auto", choices=OFFLOAD_MODES,
                    help="what lives in host memory: auto (the fastest mode that fits each layout), none, "
                         "text-encoder, experts, all")
    ap.add_argument("--no-ring", action="store_true", help="no Ring attention: uneven Ulysses allowed")
    ap.add_argument("--hbm-gb", type=float, help="override the GPU's memory, GB")
    ap.add_argument("--tflops", type=float, help="override the GPU's bf16 matmul rate, TFLOP/s")
    ap.add_argument("--nvlink-gbps", type=float, help="override NVLink GB/s (unidirectional)")
    ap.add_argument("--top", type=int, default=15, help="feasible layouts to list")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap.parse_args(argv)


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}g}"


def table(p: Plan, top: int) -> str:
    """The ranked feasible layouts as an aligned text table."""
    rows = [("#", "layout", "GPUs/req", "step s", "latency s", "videos/h", "mem GB", "comm %",
             "note")]
    for i, c in enumerate(p.feasible[:top], 1):
        rows.append((str(i), c.label(), str(c.layout.group_size), _fmt(c.step_s),
                     _fmt(c.latency_s), _fmt(c.throughput_per_h), f"{c.mem_gb:.1f}",
                     f"{100 * c.comm_share:.1f}", c.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    more = len(p.feasible) - top
    if more > 0:
        lines.append(f"... and {more} more feasible layouts (--top to list them)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = GPUS[args.gpu]
    overrides = {k: v for k, v in (("hbm_gb", args.hbm_gb), ("matmul_tflops", args.tflops),
                                   ("nvlink_gbps", args.nvlink_gbps)) if v is not None}
    if overrides:
        gpu = gpu.replace(**overrides)
    width, height = args.size or (None, None)
    try:
        result = plan(args.model, args.gpus, gpu, width, height, args.frames, args.steps,
                      args.objective, load_calibration(args.calibration), args.max_chords,
                      offload=args.offload, allow_ring=not args.no_ring)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(result.to_json())
    else:
        if result.feasible:
            print(table(result, args.top))
            print()
        print(result.explain())
    return 0 if result.choice else 1


if __name__ == "__main__":
    sys.exit(main())

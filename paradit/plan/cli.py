"""The planner CLI: rank parallel layouts for one model, video size and machine.

    python -m paradit.plan --model wan2.2-t2v-a14b --gpus 8 --gpu h200 --size 1280x720 --frames 81
    python -m paradit.plan --gpus 1 --gpu h100 --size 1280x720 --frames 81 --steps 4 --guidance 1 --loras 2
    python -m paradit.plan --gpus 8 --gpu h100 --host-gb 125 --ranks-per-host 8     # offload held to the host

Prints a ranked table (predicted step time, denoising latency, time to video, throughput, per-GPU
memory, exposed communication share), a summary of what was ruled out and why, and the planner's
explanation: the phases of the choice's time to video (start-up, encode, denoise, decode, write) and
of its memory (load, encode, denoise, decode).
`--json` prints the plan as JSON instead. The cost model is described in paradit/plan/costs.py.
"""
from __future__ import annotations

import math
import sys

from paradit.cli.flags import (FLOAT, INT, NUMBERS, SIZE, Flag, Flags, UsageError, build_parser, flag_terms,
                               raw_values)
from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.plan import GPUS, MAX_GPUS, Plan, load_calibration, plan
from paradit.plan.hardware import available_host_gb
from paradit.plan.layout import SHARD_MODES
from paradit.residency import OFFLOAD_MODES
from paradit.settings import check_guidance

FLAGS = (
    Flag("--model", str, "wan2.2-t2v-a14b", "the architecture", "wan2.2-t2v-a14b", choices=tuple(WanConfig.names())),
    Flag("--gpus", INT, None, f"number of GPUs, 1 to {MAX_GPUS} (required)", metavar="N"),
    Flag("--gpu", str, "h200", "GPU preset", "h200", choices=tuple(sorted(GPUS))),
    Flag("--size", SIZE, None, "WIDTHxHEIGHT", "the model's", metavar="WxH"),
    Flag("--frames", INT, None, "frames (4k+1)", "the model's", metavar="N"),
    Flag("--steps", INT, None, "denoising steps", "the model's", metavar="N"),
    Flag("--guidance", NUMBERS, None, "classifier-free guidance scale, one or high,low as paradit.generate takes it; "
         "1 (for both experts) has no uncond forward", "the model's (guided)", metavar="G[,G]"),
    Flag("--loras", INT, 0, "LoRA files merged at load (their merge adds start-up time and a workspace)", "0",
         metavar="N"),
    Flag("--cfg-mode", str, "auto", "CFG on a group with cfg=1: batched, in-turn, or auto (the fastest that fits "
         "each layout)", "auto", choices=("auto", "batched", "in-turn")),
    Flag("--objective", str, "latency", "what to minimise", "latency", choices=("latency", "throughput")),
    Flag("--calibration", str, None, "calibration JSON", "the shipped paradit/plan/calibration.json",
         metavar="FILE"),
    Flag("--max-chords", INT, 1, "consider CHORDS with up to this many cores (4, 6, 8)", "1: off", metavar="K"),
    Flag("--offload", str, "auto", "what lives in host memory: auto (the fastest mode that fits each layout), none, "
         "text-encoder, experts, all", "auto", choices=OFFLOAD_MODES),
    Flag("--shard-weights", str, "auto", "each expert's blocks sharded over the group: auto (the best per layout), "
         "none, sp (the sequence-parallel group), request (the request group)", "auto", choices=SHARD_MODES),
    Flag("--host-gb", FLOAT, None, "host memory available on each host, GB (> 0): offload modes whose pinned "
         "copies do not fit it are ruled out", "not checked (the plan prints this machine's)", metavar="GB"),
    Flag("--ranks-per-host", INT, None, "ranks sharing one host's memory", "one node's GPUs (at most --gpus)",
         metavar="N"),
    Flag("--no-ring", help="no Ring attention: uneven Ulysses allowed"),
    Flag("--hbm-gb", FLOAT, None, "override the GPU's memory, GB (> 0)", "the preset's", metavar="GB"),
    Flag("--tflops", FLOAT, None, "override the GPU's bf16 matmul rate, TFLOP/s (> 0)", "the preset's",
         metavar="TFLOPS"),
    Flag("--nvlink-gbps", FLOAT, None, "override NVLink GB/s, unidirectional (> 0)", "the preset's", metavar="GBPS"),
    Flag("--top", INT, 15, "feasible layouts to list (>= 1)", "15", metavar="N"),
    Flag("--json", help="print the plan as JSON"),
)
# the planner's parameters -> this CLI's flags
PARAM_FLAGS = {"gpus": "--gpus", "width": "--size", "height": "--size", "frames": "--frames", "steps": "--steps",
               "loras": "--loras", "cfg_mode": "--cfg-mode", "guidance": "--guidance",
               "calibration": "--calibration", "max_chords": "--max-chords", "hbm_gb": "--hbm-gb",
               "matmul_tflops": "--tflops", "nvlink_gbps": "--nvlink-gbps", "objective": "--objective",
               "shard_weights": "--shard-weights", "host_gb": "--host-gb", "ranks_per_host": "--ranks-per-host"}


def parse_args(argv: list[str] | None) -> Flags:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser("python -m paradit.plan", __doc__.split("\n")[0], FLAGS).parse_args(argv)
    flags = Flags(vars(ns), raw_values(argv))
    if flags.gpus is None:
        raise UsageError("--gpus N is required: the number of GPUs to plan for")
    if flags.top < 1:
        raise UsageError(f"--top {flags.top}: list at least 1 layout")
    return flags


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}g}"


def table(p: Plan, top: int) -> str:
    """The ranked feasible layouts as an aligned text table."""
    rows = [("#", "layout", "GPUs/req", "step s", "latency s", "to video s", "videos/h", "mem GB", "comm %",
             "note")]
    for i, c in enumerate(p.feasible[:top], 1):
        rows.append((str(i), c.label(), str(c.layout.group_size), _fmt(c.step_s),
                     _fmt(c.latency_s), _fmt(c.time_to_video_s), _fmt(c.throughput_per_h), f"{c.mem_gb:.1f}",
                     f"{100 * c.comm_share:.1f}", c.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    more = len(p.feasible) - top
    if more > 0:
        lines.append(f"... and {more} more feasible layouts (--top to list them)")
    return "\n".join(lines)


def make_plan(args: Flags) -> Plan:
    """The plan the flags ask for; a UsageError naming the flag otherwise."""
    with flag_terms(args, PARAM_FLAGS):
        gpu = GPUS[args.gpu]
        overrides = {k: v for k, v in (("hbm_gb", args.hbm_gb), ("matmul_tflops", args.tflops),
                                       ("nvlink_gbps", args.nvlink_gbps)) if v is not None}
        if overrides:
            gpu = gpu.replace(**overrides)
        width, height = args.size or (None, None)
        guided = args.guidance is None or any(g != 1.0 for g in check_guidance(args.guidance))
        return plan(args.model, args.gpus, gpu, width, height, args.frames, args.steps,
                    args.objective, load_calibration(args.calibration), args.max_chords,
                    offload=args.offload, allow_ring=not args.no_ring, shard_weights=args.shard_weights,
                    guidance=guided, cfg_mode=args.cfg_mode, loras=args.loras, host_gb=args.host_gb,
                    ranks_per_host=args.ranks_per_host)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = make_plan(args)
    except (UsageError, ParameterError) as e:
        print(f"paradit.plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(result.to_json())
    else:
        if result.feasible:
            print(table(result, args.top))
            print()
        print(result.explain())
        here = available_host_gb()
        if args.host_gb is None and here is not None:
            print(f"This machine has {here:.1f} GB of host memory available: --host-gb {here:.0f} holds the plan to it.")
    return 0 if result.choice else 1


if __name__ == "__main__":
    sys.exit(main())

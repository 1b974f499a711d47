"""Attention kernels side by side: the kernels paradit can call, at the shapes of a real model.

    python bench/attention_kernels.py                      # GPU: A14B 720p x 81 (75,600 tokens, 40 heads)
    python bench/attention_kernels.py --tokens 4096 --heads 4 --dtype float32      # CPU, small
    python bench/attention_kernels.py --layouts        # GPU: the per-rank shapes of U/R 1-8, B = 1 and 2

Ulysses runs plain attention over the whole sequence with H / u heads; Ring needs the log-sum-exp
(LSE) of every block to merge partial results, so it can only use kernels that return it. This
measures every candidate of both kinds on one device:

  plain   F.scaled_dot_product_attention as torch picks, and pinned to each of its GPU kernels
          (flash, cuDNN, efficient) with torch.nn.attention.sdpa_kernel; flash-attn if installed.
  lse     the aten ops with an LSE output (efficient, flash, cuDNN on GPU; the CPU flash kernel
          on CPU); flash-attn's with return_attn_probs if installed; flash-attn-4 (CuTe DSL) if
          installed; the fp32 math reference.

--layouts times the kernels paradit chooses between (SDPA as torch picks, cuDNN with LSE,
flash-attn-4, flash-attn) at the shape one rank computes in each sequence-parallel layout of
--tokens x --heads: Ulysses u runs the whole sequence on H/u heads (u = 1, 2, 4, 8), Ring r one
query block of S/r against one key block of S/r (r = 2, 4, 8), at batch 1 (CFG in turn or split)
and batch 2 (CFG batched); --tokens2 adds a second resolution (default 32,760: 832x480x81).

--fp8 times FP8 attention (paradit.models.quant.cudnn_fp8_attention: cuDNN's FP8 SDPA, q/k/v
quantised per tensor inside the timed call) at --tokens x --heads, B = 1 and 2, against the bf16
kernels, and its relative error against cuDNN bf16 on the same inputs, for unit-variance q and k
and for q x 4 (a peakier softmax, nearer a trained model's).

Correctness first, on a small odd shape (999 query x 1,003 key tokens, 3 heads): every kernel's
output and LSE against fp32 math, relative error printed. Then timing at the full shape: warm-up,
then CUDA events (perf_counter on CPU), median of --reps; TFLOP/s = 4 S_q S_k H D / time.
Results: bench/results/<date>_<machine>_attention.json and the printed table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from launcher import environment, machine_description, machine_tag, results_path, write_json  # noqa: E402

from paradit.models.attention import (_flash_module, cudnn_attention_lse, efficient_attention_lse,  # noqa: E402
                                      fa4_attention_lse, fa4_available, flash_attention_lse,
                                      math_attention_lse, sdpa_cpu_attention_lse)


def _bhsd(*ts):
    return (t.transpose(1, 2) for t in ts)        # (B, S, H, D) <-> (B, H, S, D)


def _sdpa_pinned(kernel):
    def fn(q, k, v):
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel([kernel]):
            return next(_bhsd(F.scaled_dot_product_attention(*_bhsd(q, k, v)))), None
    return fn


def _sdpa(q, k, v):
    return next(_bhsd(F.scaled_dot_product_attention(*_bhsd(q, k, v)))), None


def _lse_flash(q, k, v):
    """torch's own flash kernel (FA2) with LSE: not one paradit calls, measured for comparison."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(*_bhsd(q, k, v))[:2]
    return next(_bhsd(out)), lse


def candidates(device: torch.device) -> dict:
    """name -> (fn, what it is); fn(q, k, v) with (B, S, H, D) inputs returns (out, lse or None)."""
    out = {"sdpa (torch's choice)": (_sdpa, "plain")}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend
        out |= {"sdpa pinned flash": (_sdpa_pinned(SDPBackend.FLASH_ATTENTION), "plain"),
                "sdpa pinned cudnn": (_sdpa_pinned(SDPBackend.CUDNN_ATTENTION), "plain"),
                "sdpa pinned efficient": (_sdpa_pinned(SDPBackend.EFFICIENT_ATTENTION), "plain"),
                "lse efficient (aten)": (efficient_attention_lse, "lse"),
                "lse flash (aten)": (_lse_flash, "lse"),
                "lse cudnn (aten)": (cudnn_attention_lse, "lse")}
        if _flash_module() is not None:
            out["flash-attn package"] = (flash_attention_lse, "lse")
        if fa4_available():
            out["lse fa4 (flash-attn-4)"] = (fa4_attention_lse, "lse")
    else:
        out["lse cpu flash (aten)"] = (sdpa_cpu_attention_lse, "lse")
        out["math fp32 (reference)"] = (lambda q, k, v: math_attention_lse(q, k, v), "lse")
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def check(fns: dict, device, dtype) -> dict:
    """Every kernel against fp32 math on a small odd shape; errors reported, not raised."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 999, 3, 128, generator=g).to(device, dtype)
    k, v = (torch.randn(1, 1003, 3, 128, generator=g).to(device, dtype) for _ in range(2))
    ref_out, ref_lse = math_attention_lse(q.float(), k.float(), v.float())
    res = {}
    for name, (fn, _) in fns.items():
        try:
            out, lse = fn(q, k, v)
            res[name] = dict(out_rel_err=rel(out, ref_out),
                             lse_max_abs_err=None if lse is None else float((lse.float() - ref_lse).abs().max()))
        except Exception as err:     # a kernel that refuses this shape/dtype/device: recorded, not hidden
            res[name] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return res


def time_it(fn, args, device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn(*args)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn(*args)
            e1.record()
            e1.synchronize()
            out.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            out.append(time.perf_counter() - t0)
    return out


LAYOUT_KERNELS = ("sdpa (torch's choice)", "lse cudnn (aten)", "lse fa4 (flash-attn-4)", "flash-attn package")


def layout_shapes(tokens: int, heads: int) -> list[tuple[str, int, int]]:
    """(layout, query = key tokens, heads) one rank's local attention computes."""
    out = [(f"U{u}" if u > 1 else "1", tokens, -(-heads // u)) for u in (1, 2, 4, 8)]
    return out + [(f"R{r}", -(-tokens // r), heads) for r in (2, 4, 8)]


def layouts_table(fns: dict, device, dtype, args) -> list[dict]:
    """Every LAYOUT_KERNELS kernel at every layout's per-rank shape; each row says the fastest."""
    rows = []
    for tokens in [args.tokens] + ([args.tokens2] if args.tokens2 else []):
        for layout, s, h in layout_shapes(tokens, args.heads):
            for b in (1, 2):
                q, k, v = (torch.randn(b, s, h, args.head_dim, device=device, dtype=dtype) for _ in range(3))
                flops = 4 * b * s * s * h * args.head_dim
                row = dict(tokens=tokens, layout=layout, batch=b, seq=s, heads=h, flops=flops, kernels={})
                ref = None
                for name in (n for n in LAYOUT_KERNELS if n in fns):
                    fn = fns[name][0]
                    try:
                        out = fn(q, k, v)[0]
                        ref = out if ref is None else ref
                        ts = time_it(fn, (q, k, v), device, args.warmup, args.reps)
                        t = statistics.median(ts)
                        row["kernels"][name] = dict(median_s=t, tflops=flops / t / 1e12, times_s=ts,
                                                    rel_diff_vs_first=rel(out, ref))
                    except Exception as err:
                        row["kernels"][name] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
                timed = {n: r for n, r in row["kernels"].items() if "tflops" in r}
                row["fastest"] = max(timed, key=lambda n: timed[n]["tflops"]) if timed else None
                rows.append(row)
                print(f"  {tokens:>6} {layout:<3} B={b} S={s:<6} H={h:<3} " + "  ".join(
                    f"{n.split(' (')[0]} {r['tflops']:6.1f}" if "tflops" in r else f"{n.split(' (')[0]} err"
                    for n, r in row["kernels"].items()) + f"   fastest: {row['fastest']}", flush=True)
                del q, k, v
    return rows


def fp8_table(fns: dict, device, args) -> list[dict]:
    from paradit.models import quant
    missing = quant.cudnn_fp8_attention_missing(device)
    if missing:
        raise SystemExit("FP8 attention cannot run here: needs " + "; ".join(missing))
    rows = []
    s, h, d = args.tokens, args.heads, args.head_dim
    for b in (1, 2):
        flops = 4 * b * s * s * h * d
        for q_scale in (1.0, 4.0):
            q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16) for _ in range(3))
            q = q * q_scale
            ref = cudnn_attention_lse(q, k, v)[0]
            row = dict(batch=b, tokens=s, heads=h, q_scale=q_scale, flops=flops, kernels={})
            for name, fn in (("lse cudnn (aten)", lambda q, k, v: cudnn_attention_lse(q, k, v)[0]),
                             ("lse fa4 (flash-attn-4)", lambda q, k, v: fa4_attention_lse(q, k, v)[0]),
                             ("fp8 cudnn (cudnn-frontend)", quant.cudnn_fp8_attention)):
                if name.startswith("lse fa4") and name not in fns:
                    continue
                try:
                    out = fn(q, k, v)
                    ts = time_it(fn, (q, k, v), device, args.warmup, args.reps)
                    t = statistics.median(ts)
                    row["kernels"][name] = dict(median_s=t, tflops=flops / t / 1e12, times_s=ts,
                                                rel_err_vs_cudnn_bf16=rel(out, ref))
                except Exception as err:
                    row["kernels"][name] = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            rows.append(row)
            print(f"  B={b} q x{q_scale:g}: " + "  ".join(
                f"{n.split(' (')[0]} {r['median_s'] * 1e3:.1f} ms {r['tflops']:.0f} TFLOP/s err {r['rel_err_vs_cudnn_bf16']:.2e}"
                if "tflops" in r else f"{n}: {r['error']}" for n, r in row["kernels"].items()), flush=True)
            del q, k, v, ref
    return rows


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--tokens", type=int, default=75600, help="query = key tokens (A14B 1280x720x81: 75,600)")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", help="results folder (default: bench/results)")
    ap.add_argument("--layouts", action="store_true", help="the per-rank shapes of Ulysses / Ring 1-8, B = 1, 2")
    ap.add_argument("--fp8", action="store_true", help="FP8 attention (cuDNN) against bf16, time and error")
    ap.add_argument("--tokens2", type=int, default=32760, help="--layouts: a second resolution (0: none)")
    return ap.parse_args(argv)


def print_checks(checks: dict) -> None:
    for name, c in checks.items():
        print(f"  check {name:<24} " + (c.get("error") or f"out err {c['out_rel_err']:.2e}" + (
            f" lse {c['lse_max_abs_err']:.2e}" if c.get("lse_max_abs_err") is not None else "")), flush=True)


def kernel_rows(fns: dict, checks: dict, device, dtype, args) -> list[dict]:
    """Every kernel timed at the full shape (the math reference only up to 8,192 tokens), one line each."""
    s, h, d = args.tokens, args.heads, args.head_dim
    flops = 4 * s * s * h * d
    q, k, v = (torch.randn(1, s, h, d, device=device, dtype=dtype) for _ in range(3))
    rows = []
    for name, (fn, kind) in fns.items():
        row = dict(kernel=name, kind=kind, **checks[name])
        if "error" not in row and not (name.startswith("math") and s > 8192):
            try:
                ts = time_it(fn, (q, k, v), device, args.warmup, args.reps)
                row |= dict(times_s=ts, median_s=statistics.median(ts), tflops=flops / statistics.median(ts) / 1e12)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append(row)
        print(f"  {name:<24} {kind:<5} " + (f"{row['median_s'] * 1e3:9.2f} ms {row['tflops']:7.3g} TFLOP/s"
                                           if "median_s" in row else f"{'-':>28}")
              + (f"   err out {row['out_rel_err']:.2e}" if "out_rel_err" in row else "")
              + (f" lse {row['lse_max_abs_err']:.2e}" if row.get("lse_max_abs_err") is not None else "")
              + (f"   {row['error']}" if "error" in row else ""), flush=True)
    return rows


def print_fastest(rows: list[dict]) -> None:
    best = {kind: max((r for r in rows if r["kind"] == kind and "tflops" in r), key=lambda r: r["tflops"],
                      default=None) for kind in ("plain", "lse")}
    for kind, r in best.items():
        if r:
            print(f"fastest {kind}: {r['kernel']} ({r['tflops']:.3g} TFLOP/s)")


def write_result(what: str, device, out, **fields) -> None:
    """bench/results/<date>_<machine>_<what>.json (or under --out): the machine, then `fields`."""
    tag = machine_tag(device.type)
    result = dict(what=what, date=time.strftime("%Y-%m-%d"), machine=tag,
                  machine_description=machine_description(device.type), environment=environment(), **fields)
    print(f"wrote {write_json(results_path(what, 'json', out, tag), result)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    fns = candidates(device)
    print(f"attention kernels on {machine_description(device.type)}: {args.tokens} tokens, {args.heads} heads x "
          f"{args.head_dim}, {dtype}", flush=True)
    checks = check(fns, device, dtype)
    print_checks(checks)
    if args.fp8:
        rows = fp8_table(fns, device, args)
        write_result("attention_fp8", device, args.out, shape=dict(tokens=args.tokens, heads=args.heads,
                     head_dim=args.head_dim), method=__doc__, rows=rows)
    elif args.layouts:
        rows = layouts_table(fns, device, dtype, args)
        write_result("attention_layouts", device, args.out,
                     shape=dict(tokens=args.tokens, tokens2=args.tokens2, heads=args.heads, head_dim=args.head_dim,
                                dtype=str(dtype)), checks=checks, method=__doc__, rows=rows)
    else:
        rows = kernel_rows(fns, checks, device, dtype, args)
        print_fastest(rows)
        s, h, d = args.tokens, args.heads, args.head_dim
        write_result("attention", device, args.out,
                     shape=dict(tokens=s, heads=h, head_dim=d, dtype=str(dtype), flops_per_call=4 * s * s * h * d),
                     check_shape="q 999 x k 1003 tokens, 3 heads x 128, against fp32 math", method=__doc__, rows=rows)
    return 0

if __name__ == "__main__":
    sys.exit(main())

"""Memory traffic and kernel launches of one transformer block, paradit's next to diffusers', at a
real shape, without a GPU.

    python bench/block_traffic.py                      # A14B block, 1280x720x81 (75,600 tokens), batch 1
    python bench/block_traffic.py --batch 2 --bandwidth 3.35
    python bench/block_traffic.py --preset wan2.2-ti2v-5b --size 1280x704 --frames 121 --per-token

Both blocks run on the meta device (shapes and dtypes, no data, no memory) in bf16 under a dispatch
mode that records every aten op: the bytes it reads and writes (touched_bytes: each element once, a
broadcast dim costing nothing, a view strided in its innermost dim costing the 32-byte sectors it
spans), and one kernel per op that is neither a view nor an allocation. The ops are counted as CUDA
runs them: a mixed-dtype elementwise op reads and writes each tensor once (on CPU torch would make
promoted temporaries), and paradit's FFN takes linear_gelu's CUDA path (meta follows it). Attention
is one recorded op (q, k, v read, the output written): on meta, SDPA would decompose into its S x S
math path. GEMMs and attention are compute-bound and listed apart; the rest (norms, modulation,
gates, RoPE, casts) is memory-bound, and its bytes over --bandwidth (default 3.0 TB/s, what an
H100 SXM's elementwise kernels sustain of its 3.35) predict its time per block and per forward.
Results: bench/results/<date>_<machine>_block_traffic_b<batch>.json, with the revision measured (launcher.code_revision).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from launcher import code_revision, environment, machine_tag, results_path, write_json  # noqa: E402

from paradit.config import WanConfig  # noqa: E402
from paradit.models.transformer import WanBlock, rope_table  # noqa: E402

SECTOR = 32   # bytes: the least a GPU's memory access moves (an L2 sector)
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}
FREE = {"_unsafe_view", "empty", "empty_like", "empty_strided", "lift_fresh", "detach"}  # no data moved


def touched_bytes(t: torch.Tensor) -> int:
    """DRAM bytes a kernel moves to read or write view t: each distinct element once (a broadcast dim
    costs nothing), times the unused share of each 32-byte sector where the innermost dim is strided
    (a stride-2 bf16 view, one half of RoPE's interleaved pairs, moves every sector: twice its bytes)."""
    dims = [(n, s) for n, s in zip(t.shape, t.stride()) if n > 1 and s > 0]
    inner = min((s for _, s in dims), default=1)                      # elements between neighbours
    return math.prod(n for n, _ in dims) * t.element_size() * min(inner, max(1, SECTOR // t.element_size()))


class Counter(TorchDispatchMode):
    """Per op name: calls, bytes read, bytes written, and its kind (gemm / attention / other)."""

    def __init__(self):
        super().__init__()
        self.ops = defaultdict(lambda: dict(calls=0, read=0, written=0, kind="other"))

    def record(self, name: str, kind: str, read: int, written: int) -> None:
        op = self.ops[name]
        op["calls"] += 1
        op["read"] += read
        op["written"] += written
        op["kind"] = kind

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in FREE:
            return out
        outs = {a.name for a in func._schema.arguments if a.is_out}
        inputs = [v for v in (*args, *(v for k, v in kwargs.items() if k not in outs)) if isinstance(v, torch.Tensor)]
        results = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        read = sum(touched_bytes(t) for t in {id(t): t for t in inputs}.values())
        self.record(name, "gemm" if name in GEMMS else "other", read, sum(touched_bytes(t) for t in results))
        return out


def one_kernel(counter: Counter, name: str, kind: str):
    """A functional op as the one CUDA kernel it is there, reading its tensor arguments and writing
    a result like its first: SDPA (on meta it would decompose into the S x S math path) and
    rms_norm (one fused kernel on CUDA; on meta, six ops)."""
    def op(*args, **kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        out = torch.empty_like(tensors[0])
        counter.record(name, kind, sum(touched_bytes(t) for t in tensors), touched_bytes(out))
        return out
    return op


def block_inputs(cfg: WanConfig, tokens: int, batch: int, per_token: bool, grid) -> dict:
    """Meta bf16 inputs of one block: stream, modulation, text, and both libraries' RoPE tables."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(batch, tokens, cfg.dim, **meta)                                  # (B, L, D)
    e0 = torch.empty(batch, tokens if per_token else 1, 6, cfg.dim, **meta)          # (B, 1|L, 6, D)
    context = torch.empty(batch, cfg.text_len, cfg.dim, **meta)                      # (B, S_text, D)
    rope = rope_table(grid, cfg.head_dim, 0, tokens, "meta")
    table = torch.empty(1, tokens, 1, cfg.head_dim, device="meta")                   # diffusers' (1, L, 1, Dh)
    return dict(x=x, e0=e0, context=context, rope=rope, diffusers_rope=(table, table))


def paradit_call(cfg: WanConfig, inp: dict):
    with torch.device("meta"):
        block = WanBlock(cfg).to(torch.bfloat16)
    return lambda: block(inp["x"], inp["e0"], inp["context"], inp["rope"])


def diffusers_call(cfg: WanConfig, inp: dict):
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    with torch.device("meta"):
        block = WanTransformerBlock(cfg.dim, cfg.ffn_dim, cfg.num_heads, cross_attn_norm=cfg.cross_attn_norm,
                                    eps=cfg.eps).to(torch.bfloat16)
    for name in ("scale_shift_table", "norm1", "norm2", "norm3"):   # its _keep_in_fp32_modules
        getattr(block, name).float()
    e0 = inp["e0"] if inp["e0"].shape[1] > 1 else inp["e0"].squeeze(1)                # (B, 6, D) or (B, L, 6, D)
    return lambda: block(inp["x"], inp["context"], e0, inp["diffusers_rope"])


def count(call) -> dict:
    """The ops of one call of `call` without autograd, as the pipeline runs (the block is built
    before counting starts)."""
    counter = Counter()
    with mock.patch.object(F, "scaled_dot_product_attention", one_kernel(counter, "attention", "attention")), \
            mock.patch.object(F, "rms_norm", one_kernel(counter, "rms_norm", "other")), torch.no_grad(), counter:
        call()
    return {name: dict(op) for name, op in counter.ops.items()}


def summary(ops: dict, bandwidth: float, layers: int) -> dict:
    kinds = {}
    for kind in ("gemm", "attention", "other"):
        rows = [op for op in ops.values() if op["kind"] == kind]
        gb = sum(op["read"] + op["written"] for op in rows) / 1e9
        kinds[kind] = dict(kernels=sum(op["calls"] for op in rows), gb=gb)
    other = kinds["other"]
    other["ms_per_block"] = other["gb"] / bandwidth
    other["s_per_forward"] = other["ms_per_block"] * layers / 1e3
    return kinds


def print_table(name: str, ops: dict, kinds: dict) -> None:
    other = kinds["other"]
    print(f"\n{name}: {other['kernels']} memory-bound kernels, {other['gb']:.1f} GB "
          f"(~{other['ms_per_block']:.1f} ms a block, {other['s_per_forward']:.2f} s a forward); "
          f"GEMMs {kinds['gemm']['kernels']} kernels {kinds['gemm']['gb']:.1f} GB; "
          f"attention {kinds['attention']['kernels']} calls")
    for op_name, op in sorted(ops.items(), key=lambda kv: -(kv[1]["read"] + kv[1]["written"])):
        if op["kind"] == "other":
            print(f"  {op_name:28s} x{op['calls']:<3} read {op['read'] / 1e9:6.2f} GB  written {op['written'] / 1e9:6.2f} GB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.2-t2v-a14b")
    ap.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--batch", type=int, default=1, help="2: cond and uncond batched")
    ap.add_argument("--per-token", action="store_true", help="per-token timesteps (TI2V-5B's)")
    ap.add_argument("--bandwidth", type=float, default=3.0, help="TB/s the memory-bound kernels sustain")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    args = ap.parse_args(argv)
    cfg = WanConfig.preset(args.preset)
    w, h = (int(v) for v in args.size.split("x"))
    tokens = cfg.num_tokens(w, h, args.frames)
    latent = cfg.latent_shape(w, h, args.frames)                                      # (C, F, H, W)
    grid = tuple(n // p for n, p in zip(latent[1:], cfg.patch))
    inp = block_inputs(cfg, tokens, args.batch, args.per_token, grid)
    revision = code_revision()
    print(f"block traffic: {args.preset} ({cfg.num_layers} blocks), {w}x{h}x{args.frames} ({tokens} tokens), "
          f"batch {args.batch}, bf16, paradit at {revision['git']} (sources {revision['paradit_sha256']})")
    result = dict(what="block_traffic", date=time.strftime("%Y-%m-%d"), machine=machine_tag("cpu"),
                  environment=environment(), method=__doc__,
                  settings=dict(preset=args.preset, width=w, height=h, frames=args.frames, tokens=tokens,
                                batch=args.batch, per_token=args.per_token, bandwidth_tb_s=args.bandwidth),
                  blocks={})
    for name, make in (("paradit", paradit_call), ("diffusers", diffusers_call)):
        ops = count(make(cfg, inp))
        kinds = summary(ops, args.bandwidth, cfg.num_layers)
        result["blocks"][name] = dict(kinds=kinds, ops=ops)
        print_table(name, ops, kinds)
    p, d = (result["blocks"][n]["kinds"]["other"] for n in ("paradit", "diffusers"))
    saved = d["s_per_forward"] - p["s_per_forward"]
    result["saved_s_per_forward"] = saved
    print(f"\npredicted: paradit's memory-bound kernels move {p['gb']:.1f} GB a block in {p['kernels']} kernels, "
          f"diffusers' {d['gb']:.1f} GB in {d['kernels']}: {saved:.2f} s a forward less for paradit at {args.bandwidth} TB/s")
    what = f"block_traffic_b{args.batch}" + ("_per_token" if args.per_token else "")
    print(f"wrote {write_json(results_path(what, 'json', args.out, machine_tag('cpu')), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The planner beside scaling.py's measurements: this machine's spec, the planner's prediction of each
point, the fit of its compute and communication factors and their writing into a calibration file
(rank_local.py writes its compute factors the same way), speedups, and the extrapolation to the
full depth."""
from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from scaling_layouts import split_backend

import paradit.plan as pl
from paradit.config import WanConfig
from paradit.plan.layout import ParallelConfig
from paradit.schedulers.chords import init_sequence, rounds_to_first_hit


# ============================================================================ the planner
def gpu_spec(device_type: str, tag: str, probe: dict) -> tuple[pl.GPUSpec, str]:
    """The planner's spec of this machine, and how it was obtained."""
    if device_type == "cuda":
        kind = tag.split("x")[0]
        if kind in pl.GPUS:
            return pl.GPUS[kind], f"planner preset {kind!r} (measured rates are in 'probe')"
        mem = torch.cuda.get_device_properties(0).total_memory / 1e9
        link = probe.get("all_gather", {}).get("gbps", 100.0)
        return (pl.GPUSpec(kind, matmul_tflops=probe["matmul"]["tflops"], hbm_gb=mem,
                           hbm_tbps=probe["copy_gbps"] / 1e3, nvlink_gbps=link),
                "measured on the spot (no planner preset for this GPU)")
    mem_gb = _total_ram_gb()
    link = probe.get("all_gather", {}).get("gbps")
    spec = pl.GPUSpec("cpu", matmul_tflops=probe["matmul"]["tflops"], hbm_gb=mem_gb,
                      hbm_tbps=probe["copy_gbps"] / 1e3, nvlink_gbps=link or 1.0, gpus_per_node=pl.MAX_GPUS,  # one node
                      internode_gbps=link or 1.0)
    return spec, ("measured on the spot: fp32 1024^3 matmul and 128 MiB copy in one single-threaded rank"
                  + (", gloo all_gather of 8 MiB per rank between 2 ranks" if link else
                     "; no link measured (world 1 only), link bandwidth set to 1 GB/s"))


def _total_ram_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            return int(line.split()[1]) * 1024 / 1e9
    return 16.0


def base_calibration(device_type: str, path: str | None) -> pl.Calibration:
    cal = pl.load_calibration(path)
    if device_type == "cpu":   # the planner rules out shards below 256 tokens; tiny runs have fewer
        cal = dataclasses.replace(cal, min_tokens_per_rank=1, per_gpu=cal.per_gpu)
    return cal


def predict(point: dict, cfg: WanConfig, opts: dict, spec: pl.GPUSpec, cal: pl.Calibration) -> dict:
    """The planner's step (or CHORDS round) for a point: seconds, parts and comm share."""
    c = point["config"]
    p = pl.make_problem(cfg, point["world"], spec, opts["width"], opts["height"], opts["frames"],
                        opts["sample_steps"], cal, guidance=point["measure"] == "step")
    cand = pl.evaluate(p, ParallelConfig(c["ulysses"], c["ring"], c["cfg"], c["chords"], c["dp"],
                                         shard_weights=c.get("shard_weights", "none")))
    if not math.isfinite(cand.step_s):
        return dict(step_s=None, reason=cand.reason)
    s = cand.breakdown.step
    busy = s.compute_s + s.launch_s + s.ring_merge_s   # what the compute-only run also does
    return dict(step_s=cand.step_s, busy_s=busy, comm_s=cand.step_s - busy, compute_s=s.compute_s,
                launch_s=s.launch_s, ring_merge_s=s.ring_merge_s, comm_share=1 - busy / cand.step_s,
                mem_gb=cand.mem_gb, feasible=cand.feasible, reason=cand.reason)


def fit_calibration(points: list[dict], base: pl.Calibration, fit_world_max: int) -> dict:
    """Two factors, each the median over points of measured / predicted; `base` must be the
    calibration the predictions were made with, per-GPU entry applied (Calibration.for_gpu):

      compute  s = (predicted compute + LSE merges) / (measured compute-only - predicted launches);
               matmul, attention and elementwise efficiencies are multiplied by s.
      comm     r = measured comm / predicted comm (points that communicate); comm_efficiency is
               divided by r and collective_latency_us multiplied by r, which scales every
               predicted transfer time by r (latency and bandwidth cannot be told apart this way).
    Points with world > fit_world_max (oversubscribed CPU cores) are left out, and so are compiled
    points (+compile): the planner models eager runs, as the CLI makes them without --compile.
    An efficiency scaled above 1 (steps faster than the spec's rate allows: on a busy machine the
    probe may have run slower than the steps) is capped at 1, a fraction of the rate, and named in
    `capped`.
    """
    s_list, r_list = [], []
    for pt in points:
        pred = pt["predicted"]
        if pt["world"] > fit_world_max or pred.get("step_s") is None or split_backend(pt["backend"])[1]:
            continue
        busy = (pt["compute_only_s"] or pt["step_s"])["headline"]
        if busy > pred["launch_s"]:
            s_list.append((pred["compute_s"] + pred["ring_merge_s"]) / (busy - pred["launch_s"]))
        if pt["compute_only_s"] and pred["comm_s"] > 0 and pt["comm_s"] > 0:
            r_list.append(pt["comm_s"] / pred["comm_s"])
    s = statistics.median(s_list) if s_list else 1.0
    r = statistics.median(r_list) if r_list else 1.0
    factors = dict(matmul_efficiency=base.matmul_efficiency * s, attention_efficiency=base.attention_efficiency * s,
                   elementwise_efficiency=base.elementwise_efficiency * s,
                   comm_efficiency=base.comm_efficiency / r, collective_latency_us=base.collective_latency_us * r)
    capped = [k for k, v in factors.items() if k.endswith("_efficiency") and v > 1.0]
    factors |= dict.fromkeys(capped, 1.0)     # Calibration refuses a fraction above 1
    return dict(compute_scale=s, comm_scale=r, compute_points=len(s_list), comm_points=len(r_list),
                factors=factors, capped=capped)


def write_calibration(path: str, spec_name: str, fit: dict, base_path: str | None, note: str,
                      merge: bool = False) -> None:
    """The shipped calibration (or --calibration) with this machine's factors under gpus.<name>;
    merge=True keeps that entry's other factors (bench/rank_local.py fits the compute ones only)."""
    def edit(raw: dict) -> None:
        gpus = raw.setdefault("gpus", {})
        entry = dict(gpus.get(spec_name, {})) if merge else {}
        entry |= {k: int(v) if k == "gemm_half_rows" else float(f"{v:.4g}") for k, v in fit["factors"].items()}
        entry["source"] = note
        if spec_name == "cpu" and not merge:
            entry["min_tokens_per_rank"] = 1
        gpus[spec_name] = entry
    pl.rewrite_calibration(path, base_path, edit)


# ============================================================================ analysis
def attach_speedups(points: list[dict], sample_steps: int) -> None:
    base = {(p["backend"], p["measure"]): p for p in points if p["world"] == 1 and p["config"]["dp"] == 1}
    for p in points:
        k = p["config"]["chords"]
        rounds = rounds_to_first_hit(init_sequence(k, sample_steps), sample_steps) if k > 1 else sample_steps
        p["rounds"] = rounds
        p["latency_s"] = rounds * p["step_s"]["headline"]
        ref = base.get((p["backend"], p["measure"]))
        p["speedup"] = p["config"]["dp"] * ref["latency_s"] / p["latency_s"] if ref else None
        p["efficiency"] = p["speedup"] / p["world"] if ref else None


def extrapolate(points: list[dict], cfg_run: WanConfig, full: WanConfig, opts: dict) -> dict | None:
    """Achieved FLOP rates; with --layers N also time and memory scaled per layer to the full depth."""
    n, full_n = cfg_run.num_layers, full.num_layers
    tokens = cfg_run.num_tokens(opts["width"], opts["height"], opts["frames"])
    f = pl.forward_flops(cfg_run, tokens)
    weight_bytes = torch.finfo(getattr(torch, opts["dtype"])).bits // 8
    for p in points:
        forwards = 2 if p["measure"] == "step" else 1                     # CFG: cond and uncond
        flops = (f["linear"] + f["attention"]) * forwards * p["config"]["dp"]  # every replica's request
        med = p["step_s"]["headline"]
        p["achieved_tflops_per_device"] = flops / med / p["world"] / 1e12
        if n != full_n:   # every rank holds whole weights (no tensor or FSDP sharding)
            extra_mb = (pl.param_count(full) - pl.param_count(cfg_run)) * weight_bytes / 2**20
            p["extrapolated"] = dict(layers=full_n, step_s=med * full_n / n,
                                     peak_mem_mb=p["peak_mem_mb"]["max"] + extra_mb)
    if n == full_n:
        return None
    return dict(layers_run=n, layers_full=full_n,
                how=f"step time x {full_n}/{n}: the blocks carry all but ~0.1% of the FLOPs, so the "
                    f"embeddings and head are scaled too (slight overestimate); peak memory + the weights "
                    f"of the {full_n - n} blocks not built (activations of one block do not grow with depth)")

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
import importlib
import itertools
import json
import logging
import math
import re
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from launcher import (environment, has_cuda, machine_description, machine_tag, peak_rss_mb,  # noqa: E402
                      reset_peak_rss, results_path, run_world, sync, write_json, cpu_cores)

from paradit.config import WanConfig  # noqa: E402
from paradit.models.transformer import WanTransformer, patchify, token_grid  # noqa: E402
import paradit.plan as pl  # noqa: E402
from paradit.parallel.mesh import init_parallel  # noqa: E402
from paradit.parallel.runtime import Runtime  # noqa: E402
from paradit.parallel.sharding import PeakWeights, apply_weight_sharding, held_bytes  # noqa: E402
from paradit.plan.layout import ParallelConfig, auto_sp  # noqa: E402
from paradit.plan.sharding import refusal  # noqa: E402
from paradit.schedulers import wan_sigmas  # noqa: E402
from paradit.schedulers.chords import init_sequence, rounds_to_first_hit  # noqa: E402

AXES = ("ulysses", "ring", "cfg", "chords", "dp")
TERM = re.compile(r"(SP|CFG|CH|DP|U|R)(\d*)")
DEFAULTS = {  # per device type: what fits a few minutes on this CPU / one 10-minute GPU command
    "cpu": dict(preset="tiny", size="256x256", frames=65, layouts="SP,R,SPxCFG2,DP,CH", steps=7, warmup=2,
                dtype="float32", layers=0),
    "cuda": dict(preset="wan2.2-t2v-a14b", size="1280x720", frames=81, layouts="SP,SPxCFG2", steps=3,
                 warmup=2, dtype="bfloat16", layers=4),      # 4 of 40 blocks: a 1-8 GPU sweep in ~3 min
}


# ============================================================================ layout syntax
@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    text: str
    terms: tuple[tuple[str, int | None], ...]   # (term, degree or None for "the rest")

    @property
    def family(self) -> str:
        """Curve name: the layout with the free degree shown as n, fixed ones kept."""
        return "x".join(f"{t}{'<n>' if d is None else d}" for t, d in self.terms) or "1"


def parse_layout(text: str) -> LayoutSpec:
    s = text.strip().upper().replace("*", "X")
    if s in ("1", "SINGLE"):
        return LayoutSpec(text, ())
    s = s.replace("X", "")
    if not TERM.sub("", s) == "" or not s:
        raise ValueError(f"layout {text!r}: use terms U<n>, R<n>, SP<n>, CFG2, DP<n>, CH<n> joined by 'x' "
                         f"(e.g. U2xCFG2); one term may omit its number to take the rest of the world")
    terms = tuple((t, int(n) if n else None) for t, n in TERM.findall(s))
    terms = tuple((t, 2 if t == "CFG" and n is None else n) for t, n in terms)  # "CFG" means CFG2
    if sum(n is None for _, n in terms) > 1:
        raise ValueError(f"layout {text!r}: at most one term may leave out its degree")
    if len({t for t, _ in terms}) < len(terms) or {"SP", "U"} <= {t for t, _ in terms} or \
            {"SP", "R"} <= {t for t, _ in terms}:
        raise ValueError(f"layout {text!r}: each axis once (SP<n> already sets U and R)")
    return LayoutSpec(text, terms)


def resolve(spec: LayoutSpec, world: int, heads: int) -> ParallelConfig:
    """The ParallelConfig of a spec in a world; ValueError if it does not fit."""
    fixed = math.prod(n for _, n in spec.terms if n is not None)
    free = [t for t, n in spec.terms if n is None]
    if world % fixed or (not free and fixed != world):
        raise ValueError(f"{spec.text}: degrees multiply to {fixed}, not {world}")
    degrees = {t: (world // fixed if n is None else n) for t, n in spec.terms}
    deg = dict(ulysses=degrees.get("U", 1), ring=degrees.get("R", 1), cfg=degrees.get("CFG", 1),
               chords=degrees.get("CH", 1), dp=degrees.get("DP", 1))
    if "SP" in degrees:
        deg["ulysses"], deg["ring"] = auto_sp(heads, degrees["SP"])
    pc = ParallelConfig(**deg)
    pc.validate(world, heads)
    return pc


def config_dict(pc: ParallelConfig) -> dict:
    return {a: getattr(pc, a) for a in AXES} | ({"shard_weights": pc.shard_weights} if pc.shard_weights != "none"
                                                else {})


def plan_points(specs: list[LayoutSpec], worlds: list[int], heads: int, backends: list[str],
                measures: list[str], max_world: int, shards=("none",)) -> tuple[list[dict], list[str]]:
    """Every (world, layout, backend, measure) to run, deduplicated; and notes on what was skipped."""
    points, seen, notes, ran = [], {}, [], set()
    chords_ok, why = _chords_runtime()
    for world in sorted(set(worlds) | {1}):
        if world > max_world:
            notes.append(f"world {world}: skipped, this machine has {max_world} devices")
            continue
        for spec in [LayoutSpec("1", ())] + specs:
            try:
                pc = resolve(spec, world, heads)
            except ValueError as err:
                if "multiply to" not in str(err):      # it would fit this world, but cannot run
                    notes.append(f"world {world}: {spec.text} skipped: {err}")
                continue
            if pc.chords > 1 and not chords_ok:
                notes.append(f"world {world}: {spec.text} skipped: CHORDS runtime not importable ({why}); "
                             f"bench/chords.py measures the algorithm in one process")
                continue
            ran.add(spec.text)
            for backend, measure, shard in itertools.product(backends, measures, shards):
                if measure == "forward" and (pc.cfg > 1 or pc.chords > 1):
                    continue
                pcs = dataclasses.replace(pc, shard_weights=shard)
                if shard != "none" and (refusal(pcs) or split_backend(backend)[1]):   # a group of one; compiled
                    continue
                key = (world, tuple(config_dict(pcs).values()), backend, measure)
                family = spec.family + (f" shard:{shard}" if shard != "none" else "")
                if key in seen:
                    seen[key]["families"].append(family)
                    continue
                seen[key] = dict(world=world, layout=spec.text, families=[family], config=config_dict(pcs),
                                 label=pcs.describe(), backend=backend, measure=measure)
                points.append(seen[key])
    notes += [f"{s.text}: fits none of the worlds {sorted(set(worlds))}" for s in specs
              if s.text not in ran and not any(s.text in n for n in notes)]
    return points, notes


def _chords_runtime() -> tuple[bool, str]:
    try:
        importlib.import_module("paradit.engine.chords")
        return True, ""
    except ImportError as err:
        return False, str(err)


# ============================================================================ inside each rank
def model_config(opts: dict) -> WanConfig:
    cfg = WanConfig.preset(opts["preset"])
    return cfg.replace(num_layers=opts["layers"]) if opts.get("layers") else cfg


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: WanConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> WanTransformer:
    """Random weights built directly on the device in the target dtype (no fp32 copy on the host)."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = WanTransformer(cfg)
    return model.eval().requires_grad_(False)


def make_inputs(cfg: WanConfig, opts: dict, device: torch.device) -> dict:
    """Seeded noise tokens, text embeddings and the schedule; the same on every rank."""
    w, h = opts["width"], opts["height"]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(cfg.latent_shape(w, h, opts["frames"]), generator=g)         # (C, F, H, W)
    grid = token_grid(noise.shape, cfg.patch)
    tokens = patchify(noise[None], cfg.patch)[0]                                      # (L, P*C)
    text = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g).to(device)        # cond, uncond
    sigmas = wan_sigmas(opts["sample_steps"], cfg.shift)
    return dict(tokens=tokens, grid=grid, cond=text[:1], uncond=text[1:], sigmas=sigmas.tolist(),
                guidance=cfg.guidance[0])


def make_step(runtime: Runtime, model: WanTransformer, inputs: dict, measure: str, device):
    """A closure running one denoising step on this rank's shard; returns nothing."""
    tokens, grid = inputs["tokens"], inputs["grid"]
    start, end = runtime.token_range(tokens.shape[0])
    state = {"x": tokens[start:end].to(device), "i": 0}                            # (L_me, P*C)
    sig = inputs["sigmas"]
    guided = measure == "step"

    def step() -> None:
        i = state["i"] % (len(sig) - 1)
        t = torch.tensor(1000.0 * sig[i], device=device)
        v = runtime.velocity(model, state["x"], t, inputs["cond"], inputs["uncond"] if guided else None,
                             inputs["guidance"] if guided else 1.0, grid)
        state["x"] = state["x"] + (sig[i + 1] - sig[i]) * v
        state["i"] += 1
    return step


def timed(fn, n: int, device: torch.device, together: bool = True) -> list[float]:
    """Seconds of n calls; together: each call starts on all ranks at once (barrier, not timed)."""
    out = []
    for _ in range(n):
        if together and dist.is_initialized():
            dist.barrier()
        sync(device)
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            out.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


# Local stand-ins of the collectives: the real output shapes, zeros, no communication.
def _local_seq_to_heads(x, group, seq_sizes, head_sizes, traffic=None):
    p, b, _, _, d = x.shape                                        # (P, B, S_me, H, D)
    return x.new_zeros(p, b, sum(seq_sizes), head_sizes[dist.get_rank(group)], d)


def _local_heads_to_seq(x, group, seq_sizes, head_sizes, traffic=None):
    b, _, _, d = x.shape                                           # (B, S_block, H_me, D)
    return x.new_zeros(b, seq_sizes[dist.get_rank(group)], sum(head_sizes), d)


class _LocalRing:
    def __init__(self, group, traffic=None):
        self._buf = None

    def send_recv(self, t, recv_shape):
        self._buf = t.new_zeros(recv_shape)

    def wait(self):
        buf, self._buf = self._buf, None
        return buf


def _local_all_gather(x, group, traffic=None):
    return [x] * dist.get_world_size(group)


@contextmanager
def collectives_replaced():
    """Swap the collectives the step calls for local stand-ins, in this process, for the block."""
    import paradit.parallel.attention as pa
    import paradit.parallel.runtime as pr
    swaps = [(pa, "seq_to_heads", _local_seq_to_heads), (pa, "heads_to_seq", _local_heads_to_seq),
             (pa, "RingComm", _LocalRing), (pr, "all_gather_equal", _local_all_gather)]
    if "paradit.engine.chords" in sys.modules:        # the CHORDS driver's velocity exchange
        swaps.append((sys.modules["paradit.engine.chords"], "all_gather_equal", _local_all_gather))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in swaps]
    for mod, name, fn in swaps:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def reset_memory(device) -> str:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    return "ru_maxrss (whole process RSS), high-water mark reset per point" if reset_peak_rss() \
        else "ru_maxrss (whole process RSS), high-water mark of the process so far"


def peak_memory_mb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()


def make_chords_request(runtime: Runtime, model: WanTransformer, cfg: WanConfig, inputs: dict, opts: dict,
                        backend: str):
    """A closure running one CHORDS request to its first hit through paradit.engine.chords
    (the pipeline's denoise with chords=...), and the traffic counter it counts on; both expert
    slots hold the one random expert."""
    from paradit.pipeline import Pipeline
    from paradit.settings import ChordsSettings, VideoSettings

    pipe = Pipeline(cfg, [model] * cfg.num_experts, None, None, mesh=runtime.mesh, backend=backend)
    s = VideoSettings.resolve(cfg, opts["width"], opts["height"], opts["frames"], opts["sample_steps"],
                              sampler="euler")
    settings = ChordsSettings(cores=runtime.mesh.size("chords"), stop=1)

    def request() -> None:
        pipe.denoise(s, inputs["cond"], inputs["uncond"], progress=False, chords=settings)
    return request, pipe.runtime.traffic


def split_backend(backend: str) -> tuple[str, bool]:
    """'sdpa+compile' -> ('sdpa', True): the attention backend, and whether the blocks are compiled."""
    name, _, mode = backend.partition("+")
    return name, mode == "compile"


def measure_point(model, cfg, inputs, point: dict, opts: dict, device) -> dict:
    """Run one point on this rank; returns this rank's raw numbers (seconds per step or round)."""
    pc = ParallelConfig(**point["config"])
    mesh = init_parallel(pc, device, num_heads=cfg.num_heads)
    attention, compiled = split_backend(point["backend"])
    whole = held_bytes(model, 1)     # the weights' parts as predicted (paradit.parallel.sharding.held_bytes)
    parts = dict(whole, window=0, peak=whole["whole"] + whole["shards"])       # whole weights: no window
    if pc.shard_weights != "none":   # a fresh copy (same seed): the world's other points keep theirs whole
        model = build_model(cfg, device, next(model.parameters()).dtype)
        parts = held_bytes(model, mesh.shard_mesh.size())
        model = apply_weight_sharding(model, mesh.shard_mesh)
    runtime = Runtime(mesh, attention, next(model.parameters()).dtype)
    runtime.bind(model)
    if compiled and not getattr(model, "_bench_compiled", False):   # eager points of this world ran first
        from paradit.compile import compile_blocks
        compile_blocks([model])
        model._bench_compiled = True
    per = 1   # a CHORDS point times whole requests to the first hit; per-round = request / rounds
    if pc.chords > 1:
        per = rounds_to_first_hit(init_sequence(pc.chords, opts["sample_steps"]), opts["sample_steps"])
        step, traffic = make_chords_request(runtime, model, cfg, inputs, opts, attention)
        repeats, warmup = max(2, opts["steps"] // per), 1
    else:
        step, traffic = make_step(runtime, model, inputs, point["measure"], device), runtime.traffic
        repeats, warmup = opts["steps"], opts["warmup"]
    out = timed_calls(step, repeats, warmup, device, traffic, per, model)
    if pc.world_size > 1 and pc.world_size != pc.dp:      # something communicates
        with torch.no_grad(), collectives_replaced():
            step()                                        # warm the stand-ins' shapes
            out["compute"] = [t / per for t in timed(step, repeats, device)]
    return out | dict(attention=runtime.describe() + (", blocks torch.compile'd" if compiled else ""),
                      weights_parts_mb={k: v / 2**20 for k, v in parts.items()})


def timed_calls(fn, repeats: int, warmup: int, device, traffic, per: int = 1, model=None) -> dict:
    """One rank's raw numbers for fn, in the shape merge_ranks reads: the first call timed apart
    (with +compile it builds the graphs), warmup - 1 more, then `repeats` timed calls with peak
    memory and bytes moved; times and traffic divided by `per` (CHORDS: rounds per request)."""
    with torch.no_grad():
        first = timed(fn, 1, device)[0]
        for _ in range(warmup - 1):
            fn()
        mem_kind = reset_memory(device)
        traffic.clear()
        with PeakWeights(*([model] if model is not None else [])) as weights:
            times = [t / per for t in timed(fn, repeats, device)]
        moved = {op: [b / (repeats * per), c / (repeats * per)] for op, (b, c) in traffic.snapshot().items()}
        mem = peak_memory_mb(device)
    return dict(times=times, compute=None, traffic=moved, mem_mb=mem, mem_kind=mem_kind, repeats=repeats,
                rounds_per_repeat=per, first_call_s=first, weights_mb=weights.peak / 2**20)


def world_main(points: list[dict], opts: dict) -> list[dict] | None:
    """Every point of one world, in order, on this rank; rank 0 returns the merged records."""
    logging.getLogger("paradit").setLevel(logging.WARNING)   # no per-point layout lines
    device = torch.device("cuda", torch.cuda.current_device()) if opts["device"] == "cuda" else torch.device("cpu")
    cfg = model_config(opts)
    model = build_model(cfg, device, getattr(torch, opts["dtype"]))
    inputs = make_inputs(cfg, opts, device)
    records = []
    for point in sorted(points, key=lambda p: split_backend(p["backend"])[1]):   # eager first: compiling is for good
        before = _speed_check(device)             # the machine's speed now: drift check on shared machines
        mine = measure_point(model, cfg, inputs, point, opts, device)
        ranks = [mine]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        records.append(merge_ranks(point, ranks, opts["stat"]))
        records[-1]["machine_speed"] = dict(matmul_tflops_before=before, matmul_tflops_after=_speed_check(device))
    return records if not dist.is_initialized() or dist.get_rank() == 0 else None


def _speed_check(device) -> float | None:
    """Rank 0's matmul rate while the other ranks wait at a barrier (None on the other ranks)."""
    alone = not dist.is_initialized() or dist.get_rank() == 0
    if dist.is_initialized():
        dist.barrier()                            # the others may still be building their model
    rate = _matmul_rate(device, together=False)["tflops"] if alone else None
    if dist.is_initialized():
        dist.barrier()
    return rate


def drift_notes(records: list[dict], probe: dict, tolerance: float = 0.25) -> list[str]:
    """Points around which rank 0's matmul rate was more than `tolerance` off the run's typical rate
    (the median of the probe's and every check's): the machine was busier or idler than usual."""
    rates = [probe["matmul"]["tflops"]] + [v for r in records for v in r["machine_speed"].values()]
    ref, notes = statistics.median(rates), []
    if abs(probe["matmul"]["tflops"] / ref - 1) > tolerance:
        notes.append(f"probe matmul {probe['matmul']['tflops'] * 1e3:.3g} GFLOP/s vs {ref * 1e3:.3g} typical of "
                     f"this run: the planner's spec from the probe is suspect")
    for r in records:
        s = r["machine_speed"]
        r["suspect"] = max(abs(s[k] / ref - 1) for k in s) > tolerance
        if r["suspect"]:
            notes.append(f"world {r['world']} {r['label']} ({r['measure']}, {r['backend']}): matmul "
                         f"{s['matmul_tflops_before'] * 1e3:.3g} / {s['matmul_tflops_after'] * 1e3:.3g} GFLOP/s "
                         f"before / after vs {ref * 1e3:.3g} typical: the machine was busy, timing suspect")
    return notes


def _stats(xs: list[float], stat: str) -> dict:
    """median, min, max and the headline (the one --stat names) of a list of seconds."""
    out = dict(median=statistics.median(xs), min=min(xs), max=max(xs), all=xs)
    return out | {"headline": out[stat]}


def merge_ranks(point: dict, ranks: list[dict], stat: str) -> dict:
    """Per step, the slowest rank's time; memory and traffic per rank."""
    step = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]
    out = dict(point, step_s=_stats(step, stat), attention=ranks[0]["attention"],
               first_call_s=max(r["first_call_s"] for r in ranks),
               peak_mem_mb=dict(max=max(r["mem_mb"] for r in ranks), per_rank=[r["mem_mb"] for r in ranks],
                                kind=ranks[0]["mem_kind"]),
               weights_mb=dict(max=max(r["weights_mb"] for r in ranks), per_rank=[r["weights_mb"] for r in ranks],
                               predicted=ranks[0].get("weights_parts_mb")))   # peers.py rows: none
    ops = sorted({op for r in ranks for op in r["traffic"]})
    out["traffic_per_step"] = {op: dict(bytes_per_rank_max=max(r["traffic"].get(op, [0, 0])[0] for r in ranks),
                                        bytes_all_ranks=sum(r["traffic"].get(op, [0, 0])[0] for r in ranks),
                                        calls_per_rank=ranks[0]["traffic"].get(op, [0, 0])[1]) for op in ops}
    if ranks[0]["compute"] is not None:
        comp = [max(r["compute"][i] for r in ranks) for i in range(len(step))]
        out["compute_only_s"] = _stats(comp, stat)
        out["comm_s"] = max(0.0, out["step_s"]["headline"] - out["compute_only_s"]["headline"])
    else:
        out["compute_only_s"], out["comm_s"] = None, 0.0
    out["comm_share"] = out["comm_s"] / out["step_s"]["headline"]
    return out


# ============================================================================ hardware probe
def probe_main(device_type: str) -> dict:
    """Rates of this machine, measured where the benchmark runs (one thread per rank on CPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    if dist.is_initialized():
        dist.barrier()                            # every rank started: none is still importing
    out = {"matmul": _matmul_rate(device), "copy_gbps": _copy_rate(device)}
    if dist.is_initialized():
        out["all_gather"] = _all_gather_rate(device)
    return out


def _median_time(fn, device, reps: int, together: bool = True) -> float:
    fn()
    return statistics.median(timed(fn, reps, device, together))


def _matmul_rate(device, together: bool = True) -> dict:
    """Dense GEMM: bf16 8192^3 on GPU, fp32 1024^3 on CPU. FLOP/s of the median of the repeats."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = _median_time(lambda: a @ b, device, 10 if device.type == "cuda" else 5, together)
    return dict(n=n, dtype=str(dtype), tflops=2 * n**3 / t / 1e12, seconds=t)


def _copy_rate(device) -> float:
    """Memory bandwidth (read + write GB/s) of a large tensor copy."""
    numel = 2**29 if device.type == "cuda" else 2**25              # 2 GiB / 128 MiB of fp32
    src = torch.empty(numel, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), device, 5)
    return 2 * numel * 4 / t / 1e9


def _all_gather_rate(device) -> dict:
    """Bytes each rank sends per second in an all_gather of 64 MiB (GPU) / 8 MiB (CPU) per rank."""
    numel = 2**24 if device.type == "cuda" else 2**21
    world = dist.get_world_size()
    x = torch.ones(numel, device=device)
    bufs = [torch.empty_like(x) for _ in range(world)]
    t = _median_time(lambda: dist.all_gather(bufs, x), device, 5)
    return dict(bytes_per_rank=numel * 4, world=world, seconds=t, gbps=numel * 4 * (world - 1) / t / 1e9)


# ============================================================================ planner
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
    return dict(compute_scale=s, comm_scale=r, compute_points=len(s_list), comm_points=len(r_list),
                factors=factors)


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


# ============================================================================ analysis and report
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


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.4g}"


def table(points: list[dict]) -> str:
    head = ("world", "layout", "attn", "measure", "step ms [min-max]", "pred ms", "fit ms", "meas/pred",
            "speedup", "eff", "comm % (pred)", "peak MB", "weights MB/rank", "MB/step/rank", "TFLOP/s/dev")
    rows = [head]
    for p in points:
        pred, fit, st = p["predicted"], p.get("predicted_fit", {}), p["step_s"]
        ratio = st["headline"] / pred["step_s"] if pred.get("step_s") else None
        moved = sum(t["bytes_per_rank_max"] for t in p["traffic_per_step"].values()) / 2**20
        rows.append((str(p["world"]), p["label"] + (" ?" if p.get("suspect") else ""), p["backend"], p["measure"],
                     f"{_ms(st['headline'])} [{_ms(st['min'])}-{_ms(st['max'])}]", _ms(pred.get("step_s")),
                     _ms(fit.get("step_s")), "-" if ratio is None else f"{ratio:.3g}",
                     "-" if p["speedup"] is None else f"{p['speedup']:.2f}",
                     "-" if p["efficiency"] is None else f"{p['efficiency']:.2f}",
                     f"{100 * p['comm_share']:.0f} ({_pct(pred.get('comm_share'))})",
                     f"{p['peak_mem_mb']['max']:.0f}", f"{p.get('weights_mb', {}).get('max', float('nan')):.3g}",
                     f"{moved:.3g}", f"{p['achieved_tflops_per_device']:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def families(points: list[dict]) -> dict[str, list[dict]]:
    """Curve per (family, backend) over worlds; each includes the single-device baseline."""
    out: dict[str, list[dict]] = {}
    multi_backend = len({p["backend"] for p in points}) > 1
    for p in points:
        if p["measure"] != "step":
            continue
        for fam in p["families"]:
            if fam == "1":
                continue
            name = fam + (f" [{p['backend']}]" if multi_backend else "")
            out.setdefault(name, []).append(p)
    for name, pts in out.items():
        backend = pts[0]["backend"]
        base = next((p for p in points if p["world"] == 1 and p["config"]["dp"] == 1 and p["backend"] == backend
                     and p["measure"] == "step"), None)
        if base is not None and all(p["world"] > 1 for p in pts):
            pts.insert(0, base)
        pts.sort(key=lambda p: p["world"])
    return out


def plot(points: list[dict], title: str, path: Path, device_type: str, cores: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = families(points)
    worlds = sorted({p["world"] for p in points})
    if len(worlds) == 1:
        return plot_single_world(points, title, path)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_lat, ax_sp), (ax_eff, ax_comm) = axes
    unit = "GPUs" if device_type == "cuda" else "processes (1 thread each)"
    for i, (name, pts) in enumerate(sorted(curves.items())):
        color, xs = f"C{i % 10}", [p["world"] for p in pts]
        ax_lat.plot(xs, [p["latency_s"] for p in pts], "o-", color=color, label=name)
        pred = [(p["world"], p["rounds"] * p["predicted"]["step_s"]) for p in pts if p["predicted"].get("step_s")]
        if pred:
            ax_lat.plot(*zip(*pred), "x:", color=color, alpha=0.7)
        ax_sp.plot(xs, [p["speedup"] for p in pts], "o-", color=color, label=name)
        ax_eff.plot(xs, [p["efficiency"] for p in pts], "o-", color=color, label=name)
        ax_comm.plot(xs, [100 * p["comm_share"] for p in pts], "o-", color=color, label=f"{name} measured")
        pc = [(p["world"], 100 * p["predicted"]["comm_share"]) for p in pts
              if p["predicted"].get("comm_share") is not None]
        if pc:
            ax_comm.plot(*zip(*pc), "x:", color=color, alpha=0.7)
    base = next((p for p in points if p["world"] == 1 and p["measure"] == "step"), None)
    if base:
        ax_lat.plot(worlds, [base["latency_s"] / w for w in worlds], "k--", lw=1, label="ideal (1/n)")
    ax_sp.plot(worlds, worlds, "k--", lw=1, label="ideal")
    ax_eff.axhline(1.0, color="k", ls="--", lw=1, label="ideal")
    ax_lat.set(title="Latency of one request (solid: measured; dotted x: planner, shipped factors)",
               ylabel="seconds", yscale="log")
    ax_sp.set(title="Speedup over one device (dp counts requests served)", ylabel="speedup")
    top = max([1.0] + [p["efficiency"] for p in points if p["efficiency"] is not None])
    ax_eff.set(title="Efficiency = speedup / world", ylabel="efficiency", ylim=(0, 1.1 * top + 0.05))
    shares = [100 * p["comm_share"] for p in points] + \
        [100 * p["predicted"]["comm_share"] for p in points if p["predicted"].get("comm_share") is not None]
    ax_comm.set(title="Exposed communication share of a step (dotted x: planner)", ylabel="% of step",
                ylim=(0, min(100, max(10, 1.2 * max(shares)))))
    ax_lat.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel(unit)
        ax.grid(True, alpha=0.3)
        if cores and worlds[-1] > cores:   # more single-threaded ranks than cores: time-shared
            ax.axvspan(cores * 1.15, worlds[-1] * 1.1, color="0.85", alpha=0.5, lw=0)
        ax.legend(fontsize=8, loc="best")
    if cores and worlds[-1] > cores:
        title += f"\ngrey: more single-threaded processes than the machine's {cores} cores (time-shared)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(points: list[dict], title: str, path: Path) -> Path | None:
    """Weight bytes per rank against the world, one curve per layout family (sharded ones fall as
    1/n); next to `path` as <name>_weights.png. None when the run has one world."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = families(points)
    worlds = sorted({p["world"] for p in points})
    if len(worlds) == 1 or not all("weights_mb" in p for p in points):
        return None
    fig, (ax, ax_blocks) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (name, pts) in enumerate(sorted(curves.items())):
        xs, color = [p["world"] for p in pts], f"C{i % 10}"
        ax.plot(xs, [p["weights_mb"]["max"] for p in pts], "o-", color=color, label=name)
        fixed = [_fixed_mb(p) for p in pts]
        ax.plot(xs, [f + p["weights_mb"]["predicted"]["shards"] for p, f in zip(pts, fixed)], "x:", color=color,
                alpha=0.7)
        ax_blocks.plot(xs, [p["weights_mb"]["max"] - f for p, f in zip(pts, fixed)], "o-", color=color, label=name)
    base = next((p for p in points if p["world"] == 1 and p["measure"] == "step"), None)
    if base:
        blocks = base["weights_mb"]["max"] - base["weights_mb"]["predicted"]["whole"]
        ax_blocks.plot(worlds, [blocks / w for w in worlds], "k--", lw=1, label="1/n of one device's blocks")
    ax.set(title="Weights a rank holds at its fullest (measured; dotted x: predicted)", ylabel="MB per rank")
    ax_blocks.set(title="Of which its blocks' shards (measured - embeddings, head, window)", ylabel="MB per rank")
    for a in (ax, ax_blocks):
        a.set(xlabel="ranks", xscale="log", yscale="log")
        a.set_xticks(worlds, [str(w) for w in worlds])
        a.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        a.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    out = path.with_name(path.stem + "_weights.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fixed_mb(p: dict) -> float:
    """What a point's rank holds besides its blocks' shards: the embeddings and head, and with
    sharded weights the window of gathered blocks."""
    predicted = p["weights_mb"]["predicted"]
    return predicted["whole"] + (predicted["window"] if p["config"].get("shard_weights") else 0.0)


def plot_single_world(points: list[dict], title: str, path: Path) -> None:
    """One world (e.g. the one-GPU suite): measured and predicted time per point, with the rates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extrapolated = all("extrapolated" in p for p in points)
    scale = (lambda p: p["extrapolated"]["step_s"] / p["step_s"]["headline"]) if extrapolated else (lambda p: 1.0)
    names = [f"{p['label']}{' ?' if p.get('suspect') else ''}\n{p['measure']}, {p['backend']}" for p in points]
    measured = [p["step_s"]["headline"] * scale(p) for p in points]
    predicted = [(p["predicted"].get("step_s") or float("nan")) * scale(p) for p in points]
    fig, ax = plt.subplots(figsize=(max(9, 2.6 * len(points)), 5.5))
    xs = range(len(points))
    ax.bar([x - 0.2 for x in xs], measured, 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], predicted, 0.4, label="planner (shipped calibration)", alpha=0.6)
    for x, p, m in zip(xs, points, measured):
        peak = (p["extrapolated"] if extrapolated else p["peak_mem_mb"])["peak_mem_mb" if extrapolated else "max"]
        ratio = p.get("achieved_vs_matmul")
        rate = f"{p['achieved_tflops_per_device']:.3g} TFLOP/s" + (f" ({100 * ratio:.0f}% of matmul)" if ratio else "")
        ax.annotate(f"{rate}\n~{peak / 1024:.1f} GiB peak", (x - 0.2, m), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("seconds per call" + (" (extrapolated to all layers)" if extrapolated else ""))
    ax.set_ylim(0, 1.25 * max(measured + [v for v in predicted if v == v]))
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ the command
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        print(f"wrote {replot(args.replot)}")
        return 0
    device_type = "cuda" if (args.device == "cuda" or (args.device == "auto" and has_cuda())) else "cpu"
    opts = options(args, device_type)
    cfg = model_config(opts)
    full_cfg = WanConfig.preset(opts["preset"])
    specs = [parse_layout(t) for t in (args.layouts or DEFAULTS[device_type]["layouts"]).split(",") if t.strip()]
    backends, notes = available_backends(args.backends.split(","), device_type)
    max_world = torch.cuda.device_count() if device_type == "cuda" else 64
    worlds = [int(w) for w in args.worlds.split(",")]
    points, skipped = plan_points(specs, worlds, cfg.num_heads, backends, args.measure.split(","), max_world,
                                  tuple(args.shard_weights.split(",")))
    notes += skipped
    tag = machine_tag(device_type)
    print(f"scaling: {cfg.name} ({cfg.num_layers} layers), {opts['width']}x{opts['height']}x{opts['frames']} "
          f"({cfg.num_tokens(opts['width'], opts['height'], opts['frames'])} tokens), {opts['dtype']}, "
          f"{len(points)} points on {machine_description(device_type)}", flush=True)
    for n in notes:
        print("  note:", n)

    t0 = time.time()
    probe_world = 2 if max(p["world"] for p in points) >= 2 else 1
    probe = run_world(probe_main, probe_world, device_type, device_type=device_type, timeout_s=args.timeout)[0]
    print(f"probe: matmul {probe['matmul']['tflops'] * 1e3:.4g} GFLOP/s ({probe['matmul']['dtype']}), copy "
          f"{probe['copy_gbps']:.3g} GB/s" + (f", all_gather {probe['all_gather']['gbps']:.3g} GB/s per rank"
                                              if "all_gather" in probe else ""), flush=True)
    records = []
    for world in sorted({p["world"] for p in points}):
        mine = [p for p in points if p["world"] == world]
        what = [p["label"] + ("" if p["measure"] == "step" else " (forward)") for p in mine]
        print(f"world {world}: {', '.join(what)}", flush=True)
        records += run_world(world_main, world, mine, opts, device_type=device_type, timeout_s=args.timeout)[0]

    drift = drift_notes(records, probe)
    notes += drift
    spec, spec_how = gpu_spec(device_type, tag, probe)
    base = base_calibration(device_type, args.calibration)
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

    settings = (f"{cfg.name}{f' ({cfg.num_layers} of {full_cfg.num_layers} layers)' if opts['layers'] else ''}, "
                f"{opts['width']}x{opts['height']}x{opts['frames']}, {opts['dtype']}, CFG on, "
                f"{opts['sample_steps']} steps/request, {opts['stat']} of {opts['steps']} timed steps")
    title = f"{machine_description(device_type)} [{tag}]\n{settings}"
    print(table(records))
    if extra:
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
          f"({fit['comm_points']} points)")
    for n in drift:
        print("WARNING:", n)

    result = dict(what="scaling", date=time.strftime("%Y-%m-%d"), machine=tag, title=title,
                  machine_description=machine_description(device_type), environment=environment(), settings=opts,
                  model=dataclasses.asdict(cfg),
                  tokens=cfg.num_tokens(opts["width"], opts["height"], opts["frames"]), probe=probe,
                  planner=dict(spec=dataclasses.asdict(spec), spec_how=spec_how, calibration=dataclasses.asdict(base),
                               fit=fit, fit_method=fit_calibration.__doc__),
                  extrapolation=extra, notes=notes, method=__doc__, points=records, wall_s=time.time() - t0)
    json_path = write_json(results_path("scaling", "json", args.out, tag), result)
    png_path = results_path("scaling", "png", args.out, tag)
    plot(records, title, png_path, device_type, cpu_cores() if device_type == "cpu" else None)
    weights_png = plot_weights(records, title, png_path)
    print(f"wrote {json_path} and {png_path}" + (f" and {weights_png}" if weights_png else ""))
    if args.write_calibration:
        note = (f"measured by bench/scaling.py on {result['date']}, {result['machine_description']}, {settings}; "
                f"compute x{fit['compute_scale']:.3g}, comm x{fit['comm_scale']:.3g} relative to "
                f"{Path(args.calibration or pl.DEFAULT_CALIBRATION).name}; details in the scaling JSON of that date")
        write_calibration(args.write_calibration, spec.name, fit, args.calibration, note)
        print(f"wrote calibration {args.write_calibration} (gpus.{spec.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

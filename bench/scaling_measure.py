"""Inside each rank of scaling.py's worlds (peers.py's and rank_local.py's too): the random model and its
inputs, one denoising step, the timing, the collectives' local stand-ins behind the compute-only
times, one rank's numbers per point and their merge over the ranks, and the hardware probe.
scaling.py's docstring says how each number is measured."""
from __future__ import annotations

import logging
import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from launcher import peak_rss_mb, rank_device, reset_peak_rss, sync
from scaling_layouts import split_backend

from paradit.config import WanConfig
from paradit.models.transformer import WanTransformer, patchify, token_grid
from paradit.parallel.mesh import init_parallel
from paradit.parallel.runtime import Runtime
from paradit.parallel.sharding import PeakWeights, apply_weight_sharding, held_bytes
from paradit.plan.layout import ParallelConfig
from paradit.schedulers import wan_sigmas
from paradit.schedulers.chords import init_sequence, rounds_to_first_hit


# ============================================================================ the model, its inputs, one step
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


# ============================================================================ compute only
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


# ============================================================================ one point on this rank, all ranks merged
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
    device = rank_device(opts["device"])
    cfg = model_config(opts)
    model = build_model(cfg, device, getattr(torch, opts["dtype"]))
    inputs = make_inputs(cfg, opts, device)
    records = []
    for point in sorted(points, key=lambda p: split_backend(p["backend"])[1]):   # eager first: compiling is for good
        before = speed_check(device)              # the machine's speed now: drift check on shared machines
        mine = measure_point(model, cfg, inputs, point, opts, device)
        ranks = [mine]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        records.append(merge_ranks(point, ranks, opts["stat"]))
        records[-1]["machine_speed"] = dict(matmul_tflops_before=before, matmul_tflops_after=speed_check(device))
    return records if not dist.is_initialized() or dist.get_rank() == 0 else None


def speed_check(device) -> float | None:
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
    device = rank_device(device_type)
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

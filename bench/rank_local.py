"""What one rank computes between collectives, for every stage the planner proposes, on one GPU.

    python bench/rank_local.py                                        # GPU: A14B, 720p and 480p x 81, 8 GPUs
    python bench/rank_local.py --write-calibration paradit/plan/calibration.json
    python bench/rank_local.py --preset tiny --sizes 64x48x9 --world 4 --modes eager   # CPU, seconds

Stages. Every layout paradit.plan considers for --world GPUs (paradit.plan.candidates: each dp,
each (ulysses, ring, cfg) of a group, each split of the experts into a high- and a low-noise stage
at that stage's best layout) is made of (ulysses u, ring r, cfg c) stages; a rank's work inside a
denoising step depends on its stage only: tokens ceil(L / (u r)), H / u heads of attention over
the L / r tokens of its Ulysses group in r ring steps (log-sum-exp merges in between), batch 2
(batched CFG) when c = 1. Stages the planner refuses (paradit.plan.costs.stage_check) are left out.

One rank, alone. This process stands in for rank 0 of a world of u r c ranks: a process group of
torch's "fake" backend (torch.testing._internal.distributed.fake_pg: every collective returns at
once and moves nothing) lets the real runtime (paradit.parallel.runtime) run with its real shard
sizes, Ulysses packing and unpacking, ring loop and merges, and CFG exchange, every transfer left
out. Each receive buffer is filled with this rank's own sent data (fill_received: one on-GPU
copy), so the values after a collective have the model's magnitudes though not its meaning; the
kernels, their shapes and their launches are the rank's own. (The results of 2026-12-03 left the
buffers unwritten: their CUDA-graph points of Ulysses stages computed on a fresh pool, likely
zeros.) What a step costs beyond this is communication (bench/scaling.py measures it with
several GPUs).

Modes (--modes), per stage: one denoising step (the guided velocity, Euler update) of an expert
with --layers of its blocks, random bf16 weights on GPU (fp32 on CPU):
  eager           the engine's default
  graph           the same step captured once as a CUDA graph (torch.cuda.CUDAGraph) on static
                  input buffers and replayed: no per-kernel launch cost left (CUDA only)
  compiled        every block torch.compile'd (paradit.compile.compile_blocks, as --compile); the
                  first call, which builds the graphs for the shape, is timed apart (first_call_s)
  compiled+graph  the compiled step captured as a CUDA graph (CUDA only)
Time: --warmup untimed calls, then --steps timed ones (CUDA events on GPU), median reported.
Compiled modes stop (with a note) once --budget-s of wall time is spent, every mode once --stop-s
is, so that a sweep fits one 10-minute command; the results file is rewritten after every point,
so a sweep cut short still leaves what it measured.

Calibration. --write-calibration fits the planner's compute factors to the eager points (the mode
the CLI runs without --compile; --fit-mode picks another): matmul_efficiency, attention_efficiency,
gemm_half_rows and layer_overhead_us, with elementwise_efficiency kept (fit_rank_local), and writes
them under gpus.<this GPU> of the calibration file, the comm factors kept (bench/scaling.py fits
those). Across one model's stages linear and attention work grow nearly together, so their two
efficiencies trade off freely; --fix attention_efficiency=X pins it to the attention kernel's
measured rate (bench/attention_kernels.py --layouts) and fits the rest. --refit RESULTS redoes
the fit from a saved results file (no GPU needed); --check RESULTS reports the fitted factors'
error on another file's points (another model: a test of the fit, not part of it).
Results: bench/results/<date>_<machine>_rank_local.json, and a table on stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from launcher import environment, machine_description, machine_tag, results_path, sync, write_json  # noqa: E402
from scaling_fit import gpu_spec, write_calibration  # noqa: E402
from scaling_measure import build_model, make_inputs, probe_main, timed  # noqa: E402

import paradit.plan as pl  # noqa: E402
from paradit.config import WanConfig  # noqa: E402
from paradit.parallel.attention import local_heads  # noqa: E402
from paradit.parallel.mesh import init_parallel  # noqa: E402
from paradit.parallel.runtime import Runtime  # noqa: E402
from paradit.plan.costs import stage_check, stage_step  # noqa: E402
from paradit.plan.layout import ParallelConfig  # noqa: E402

MODES = ("eager", "graph", "compiled", "compiled+graph")
GPU_DEFAULTS = dict(preset="wan2.2-t2v-a14b", sizes="1280x720x81,832x480x81", layers=2, dtype="bfloat16")
CPU_DEFAULTS = dict(preset="tiny", sizes="64x48x9", layers=2, dtype="float32")
HALF_ROWS = (0, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)   # gemm_half_rows tried


def stage_label(stage) -> str:
    u, r, c = stage
    parts = [f"U{u}" if u > 1 else "", f"R{r}" if r > 1 else "", "CFG2" if c == 2 else ""]
    return "x".join(p for p in parts if p) or "1"


def planner_stages(problem: pl.Problem) -> list[tuple[int, int, int]]:
    """The distinct (ulysses, ring, cfg) stages of every layout the planner considers, runnable ones."""
    seen = set()
    for lay in pl.candidates(problem):
        for st in (lay.stages if lay.stages is not None else [(lay.ulysses, lay.ring, lay.cfg)]):
            seen.add(tuple(st))
    return sorted((s for s in seen if stage_check(problem, s) is None), key=lambda s: (math.prod(s), s))


@contextmanager
def fake_world(world: int):
    """This process as rank 0 of a `world`-rank group whose collectives move nothing between
    processes; each receive buffer is filled with this rank's own sent data (fill_received)."""
    if world == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    real = dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv

    def all_to_all_single(output, input, *args, **kwargs):
        work = real[0](output, input, *args, **kwargs)
        fill_received(output, input)
        return work

    def all_gather(tensor_list, tensor, *args, **kwargs):
        work = real[1](tensor_list, tensor, *args, **kwargs)
        for t in tensor_list:
            fill_received(t, tensor)
        return work

    def batch_isend_irecv(ops):
        works = real[2](ops)
        sent = [op.tensor for op in ops if op.op is dist.isend]
        for op in ops:
            if op.op is dist.irecv and sent:
                fill_received(op.tensor, sent[0])
        return works

    dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv = all_to_all_single, all_gather, batch_isend_irecv
    try:
        yield
    finally:
        dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv = real
        dist.destroy_process_group()


def fill_received(out: torch.Tensor, sent: torch.Tensor) -> None:
    """Write `sent`'s elements into `out`, repeated or cut to its size: the kernels after a
    collective then see values of the model's real magnitudes, as after a real transfer (an
    unwritten buffer holds stale memory in eager mode and, inside a CUDA graph's fresh pool,
    likely zeros, which GPUs multiply at lower power and so faster). It costs one on-GPU copy of
    the received bytes, about what a real receive writes."""
    dst, src = out.view(-1), sent.reshape(-1)
    if src.numel() == 0 or dst.numel() == 0:
        return
    done = 0
    while done < dst.numel():
        n = min(src.numel(), dst.numel() - done)
        dst[done:done + n].copy_(src[:n])
        done += n


class Step:
    """One guided denoising step on this rank's shard; graph=True replays it as a CUDA graph."""

    def __init__(self, runtime: Runtime, model, inputs: dict, device, graph: bool, warmup: int):
        self.runtime, self.model, self.inputs, self.device = runtime, model, inputs, device
        start, end = runtime.token_range(inputs["tokens"].shape[0])
        self.x = inputs["tokens"][start:end].to(device)                       # (L_me, P*C) fp32
        self.t = torch.zeros((), device=device)
        self.sig, self.i = inputs["sigmas"], 0
        self.graph = None
        if graph:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):                                    # warm-up on a side stream
                for _ in range(max(1, warmup)):
                    self._velocity()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.v = self._velocity()

    def _velocity(self):
        i = self.inputs
        return self.runtime.velocity(self.model, self.x, self.t, i["cond"], i["uncond"], i["guidance"], i["grid"])

    def __call__(self) -> None:
        k = self.i % (len(self.sig) - 1)
        self.t.fill_(1000.0 * self.sig[k])
        if self.graph is not None:
            self.graph.replay()
            v = self.v
        else:
            v = self._velocity()
        self.x.add_(v, alpha=self.sig[k + 1] - self.sig[k])    # in place: the graph's input buffer
        self.i += 1


def measure(model, cfg: WanConfig, inputs: dict, stage, mode: str, opts: dict, device) -> dict:
    """One (stage, mode) point: this rank's step times and what the runtime ran."""
    u, r, c = stage
    with fake_world(u * r * c):
        mesh = init_parallel(ParallelConfig(ulysses=u, ring=r, cfg=c), device, num_heads=cfg.num_heads)
        runtime = Runtime(mesh, opts["attention"], next(model.parameters()).dtype)
        runtime.bind(model)
        tokens = inputs["tokens"].shape[0]
        out = dict(stage=list(stage), label=stage_label(stage), mode=mode,
                   local_tokens=runtime.shard_sizes(tokens)[runtime.mesh.rank("sp")],
                   local_heads=local_heads(mesh, cfg.num_heads), batch=1 if c == 2 else 2)
        with torch.no_grad():
            t0 = time.perf_counter()
            step = Step(runtime, model, inputs, device, graph="graph" in mode, warmup=opts["warmup"])
            step()
            sync(device)
            out["first_call_s"] = time.perf_counter() - t0                 # compile / capture included
            for _ in range(opts["warmup"] - 1):
                step()
            times = timed(step, opts["steps"], device, together=False)
        out |= dict(step_s=statistics.median(times), step_all_s=times, kernels=runtime.kernels_ran())
        del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def predicted_parts(cfg: WanConfig, stage, size: tuple[int, int, int], spec: pl.GPUSpec,
                    cal: pl.Calibration) -> dict:
    """The planner's compute parts of this stage's step (one rank, no communication), in seconds."""
    p = pl.make_problem(cfg, math.prod(stage), spec, *size, calibration=cal)        # the per-GPU entry applied there
    s = stage_step(p, stage, [0])
    return dict(linear_s=s.linear_s, attention_s=s.attention_s, elementwise_s=s.elementwise_s,
                launch_s=s.launch_s, ring_merge_s=s.ring_merge_s, local_tokens=s.local_tokens,
                busy_s=s.compute_s + s.launch_s + s.ring_merge_s,
                flops=s.flops_linear + s.flops_attention)


FITTED = ("matmul_efficiency", "attention_efficiency", "layer_overhead_us")


def fit_rank_local(points: list[dict], cfg: WanConfig, spec: pl.GPUSpec, base: pl.Calibration,
                   fixed: dict | None = None) -> dict:
    """matmul_efficiency, attention_efficiency, gemm_half_rows and layer_overhead_us that make the
    planner's rank-local step (linear + attention + elementwise + merges + launches) match the
    measured one; elementwise_efficiency stays `base`'s, and any factor in `fixed` keeps the value
    given there (across one model's stages linear and attention work grow nearly together, so
    their two efficiencies are hard to tell apart from step times alone: fix attention_efficiency
    to the attention kernel's measured rate, bench/attention_kernels.py --layouts). For each
    gemm_half_rows of HALF_ROWS, a non-negative least-squares fit of the relative error over the
    points (each point's time divided by its measurement, so small shapes count as much as large
    ones) of 1 / matmul_efficiency, 1 / attention_efficiency and the per-block overhead; the
    gemm_half_rows with the smallest error wins. points: {"stage", "size" (w, h, f), "step_s"};
    cfg: the model as built (its layers)."""
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(FITTED) - {"gemm_half_rows"}
    if unknown:
        raise ValueError(f"cannot fix {sorted(unknown)}: the fitted factors are {FITTED + ('gemm_half_rows',)}")
    rows = []
    for h in ([int(fixed["gemm_half_rows"])] if "gemm_half_rows" in fixed else HALF_ROWS):
        unit = dataclasses.replace(base, matmul_efficiency=1.0, attention_efficiency=1.0, gemm_half_rows=h,
                                   layer_overhead_us=0.0, per_gpu={})
        a, y = [], []
        for pt in points:
            parts = predicted_parts(cfg, tuple(pt["stage"]), tuple(pt["size"]), spec, unit)
            cols = dict(matmul_efficiency=parts["linear_s"], attention_efficiency=parts["attention_s"],
                        layer_overhead_us=cfg.num_layers * 1e-6)         # seconds per unit of each unknown
            known = parts["elementwise_s"] + parts["ring_merge_s"]
            known += sum(cols[k] / fixed[k] if k.endswith("efficiency") else cols[k] * fixed[k]
                         for k in FITTED if k in fixed)
            a.append([cols[k] / pt["step_s"] for k in FITTED if k not in fixed])
            y.append(1.0 - known / pt["step_s"])
        a_t, y_t = torch.tensor(a, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        sol = _nonneg_lstsq(a_t, y_t) if a_t.numel() else torch.zeros(0, dtype=torch.float64)
        resid = (a_t @ sol - y_t) if a_t.numel() else -y_t
        rows.append((float(resid.square().mean().sqrt()), float(resid.abs().max()), h, sol.tolist()))
    rms, worst, h, sol = min(rows)
    values = dict(zip([k for k in FITTED if k not in fixed], sol))
    factors = {}
    for k in FITTED:
        if k in fixed:
            factors[k] = float(fixed[k])
        elif k.endswith("efficiency"):
            factors[k] = min(1.0, 1 / values[k]) if values[k] > 0 else 1.0
        else:
            factors[k] = values[k]
    factors["gemm_half_rows"] = h
    return dict(factors=factors, fixed=sorted(fixed), rms_relative_error=rms, max_relative_error=worst,
                points=len(points), tried=[dict(gemm_half_rows=r[2], rms_relative_error=r[0]) for r in rows])


def prediction_errors(points: list[dict], cfg: WanConfig, spec: pl.GPUSpec, cal: pl.Calibration) -> dict:
    """The planner's rank-local step under `cal` against each measured point: relative errors."""
    errs = [predicted_parts(cfg, tuple(p["stage"]), tuple(p["size"]), spec, cal)["busy_s"] / p["step_s"] - 1
            for p in points]
    return dict(points=len(errs), rms_relative_error=math.sqrt(sum(e * e for e in errs) / len(errs)),
                max_relative_error=max(abs(e) for e in errs), mean_relative_error=sum(errs) / len(errs))


def _nonneg_lstsq(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Least squares with every coefficient >= 0 (drop the most negative one and refit, until none is)."""
    free = list(range(a.shape[1]))
    while True:
        sol = torch.zeros(a.shape[1], dtype=a.dtype)
        if free:
            sol[free] = torch.linalg.lstsq(a[:, free], y[:, None]).solution[:, 0]
        if (sol >= 0).all():
            return sol
        free.remove(int(sol.argmin()))


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        w, h, f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not WIDTHxHEIGHTxFRAMES (e.g. 1280x720x81)") from None
    return w, h, f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", help="model preset (GPU: wan2.2-t2v-a14b, CPU: tiny)")
    ap.add_argument("--sizes", help="comma-separated WIDTHxHEIGHTxFRAMES (GPU: 1280x720x81,832x480x81)")
    ap.add_argument("--world", type=int, default=8, help="GPUs whose layouts' stages are measured (8)")
    ap.add_argument("--layers", type=int, help="blocks built (2); the planner is asked about the same model")
    ap.add_argument("--modes", default=None, help=f"comma-separated of {', '.join(MODES)} (all on GPU, eager on CPU)")
    ap.add_argument("--attention", default="auto", help="attention backend (auto)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per point (5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per point (2)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall seconds after which compiled points stop")
    ap.add_argument("--stop-s", type=float, help="wall seconds after which no point starts (none)")
    ap.add_argument("--calibration", help="calibration JSON to start from (default: the shipped one)")
    ap.add_argument("--write-calibration", metavar="PATH", help="write the fitted compute factors here")
    ap.add_argument("--fit-mode", default="eager", choices=MODES, help="the mode the calibration is fitted to")
    ap.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE", type=parse_fix,
                    help="keep a compute factor at VALUE instead of fitting it (e.g. attention_efficiency=0.835)")
    ap.add_argument("--refit", metavar="RESULTS", help="measure nothing: fit the calibration to this results JSON")
    ap.add_argument("--check", action="append", default=[], metavar="RESULTS",
                    help="also report the fitted factors' error on another results JSON (e.g. another model)")
    ap.add_argument("--note", default="", help="appended to the calibration's source (e.g. where a --fix came from)")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    args = ap.parse_args(argv)
    if args.refit:
        return refit(args)
    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    d = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    preset, layers, dtype = args.preset or d["preset"], args.layers or d["layers"], getattr(torch, d["dtype"])
    sizes = [parse_size(s) for s in (args.sizes or d["sizes"]).split(",")]
    modes = [m.strip() for m in (args.modes or (",".join(MODES) if cuda else "eager")).split(",")]
    bad = [m for m in modes if m not in MODES] + [m for m in modes if "graph" in m and not cuda]
    if bad:
        raise SystemExit(f"--modes: {bad} not available here: choose from {MODES} (graphs need CUDA)")
    tag = machine_tag(device.type)
    spec, spec_how = gpu_spec(device.type, tag, probe_main(device.type))
    base = pl.load_calibration(args.calibration)
    if device.type == "cpu":
        base = dataclasses.replace(base, min_tokens_per_rank=1)
    cfg = WanConfig.preset(preset).replace(num_layers=layers)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4096)
    model = build_model(cfg, device, dtype)
    print(f"rank-local: {preset} ({layers} blocks), {dtype}, the stages of {args.world} GPUs' layouts, "
          f"on {machine_description(device.type)}", flush=True)
    points, notes = [], []
    path = results_path("rank_local", "json", args.out, tag)
    env = environment()

    def result() -> dict:
        return dict(what="rank_local", date=time.strftime("%Y-%m-%d"), machine=tag, environment=env,
                    settings=dict(preset=preset, layers=layers, dtype=str(dtype), world=args.world, sizes=sizes,
                                  modes=modes, attention=args.attention, steps=args.steps, warmup=args.warmup),
                    planner=dict(spec=dataclasses.asdict(spec), spec_how=spec_how, calibration=base.source),
                    method=__doc__, points=points, gains=gains(points), fit_mode=args.fit_mode, fit=None, notes=notes)

    for compiled in (False, True):
        wanted = [m for m in modes if ("compiled" in m) == compiled]
        if not wanted:
            continue
        if compiled:
            from paradit.compile import compile_blocks
            compile_blocks([model])
        for size in (sorted(sizes, key=lambda s: s[0] * s[1] * s[2]) if compiled else sizes):
            inputs = make_inputs(cfg, dict(width=size[0], height=size[1], frames=size[2], sample_steps=cfg.steps),
                                 device)
            # the stages of the whole model's layouts (memory decides some splits); the short one is timed
            problem = pl.make_problem(WanConfig.preset(preset), args.world, spec, *size, calibration=base)
            stages = planner_stages(problem)
            if compiled:   # widest stages of the smallest size first: the budget may end the sweep
                stages = sorted(stages, key=lambda s: -math.prod(s))
            for stage in stages:
                for mode in wanted:
                    spent = time.perf_counter() - began
                    if (compiled and spent > args.budget_s) or (args.stop_s and spent > args.stop_s):
                        which = f"--stop-s {args.stop_s}" if args.stop_s and spent > args.stop_s else \
                            f"--budget-s {args.budget_s}"
                        notes.append(f"{mode} {stage_label(stage)} at {size}: skipped, {which} spent")
                        continue
                    try:
                        pt = measure(model, cfg, inputs, stage, mode, vars(args), device)
                    except Exception as err:   # recorded and shown: a mode that cannot run a stage
                        notes.append(f"{mode} {stage_label(stage)} at {size}: failed: {type(err).__name__}: {err}")
                        print(f"  {notes[-1]}", flush=True)
                        continue
                    pt["size"] = list(size)
                    pt["predicted"] = predicted_parts(cfg, stage, size, spec, base)
                    pt["tflops"] = pt["predicted"]["flops"] / pt["step_s"] / 1e12
                    points.append(pt)
                    write_json(path, result())
                    print(f"  {size[0]}x{size[1]}x{size[2]} {pt['label']:<10} {mode:<15} {pt['step_s'] * 1e3:9.2f} ms "
                          f"({pt['tflops']:.0f} TFLOP/s; planner {pt['predicted']['busy_s'] * 1e3:.2f} ms; "
                          f"first call {pt['first_call_s']:.1f} s)", flush=True)
    data = result()
    fit = fit_results(data, base, args)
    data["fit"] = fit
    print_table(data["gains"], fit, notes)
    write_json(path, data)
    print(f"wrote {path}")
    write_fit(data, fit, path.name, args)
    return 0


def refit(args) -> int:
    """--refit: the fit (and --check, --write-calibration) from a saved results file, no measurement."""
    path = Path(args.refit)
    data = json.loads(path.read_text())
    fit = fit_results(data, pl.load_calibration(args.calibration), args)
    if fit is None:
        raise SystemExit(f"--refit {path}: no {args.fit_mode} points in it (modes there: "
                         f"{sorted({p['mode'] for p in data['points']})})")
    print_table([], fit, [])
    write_fit(data, fit, path.name, args)
    return 0


def built_config(data: dict) -> WanConfig:
    """The model a results file measured: its preset with the blocks it built."""
    return WanConfig.preset(data["settings"]["preset"]).replace(num_layers=data["settings"]["layers"])


def fit_results(data: dict, base: pl.Calibration, args) -> dict | None:
    """fit_rank_local on a results file's --fit-mode points (None without any), with --fix and --check."""
    spec = pl.GPUSpec(**data["planner"]["spec"])
    points = [p for p in data["points"] if p["mode"] == args.fit_mode]
    if not points:
        return None
    fit = fit_rank_local(points, built_config(data), spec, base.for_gpu(spec.name), dict(args.fix))
    fit["checks"] = check_fit(fit, spec, base, args.check, args.fit_mode)
    return fit


def write_fit(data: dict, fit: dict | None, name: str, args) -> None:
    """--write-calibration: the fitted compute factors under gpus.<this GPU>, the entry's others kept."""
    if args.write_calibration and fit:
        gpu = data["planner"]["spec"]["name"]
        write_calibration(args.write_calibration, gpu, fit, args.calibration,
                          calibration_note(data, fit, name, args.note), merge=True)
        print(f"wrote calibration {args.write_calibration} (gpus.{gpu})")


def check_fit(fit: dict, spec: pl.GPUSpec, base: pl.Calibration, files: list[str], mode: str) -> list[dict]:
    """The fitted factors' prediction error on the `mode` points of other results files."""
    cal = dataclasses.replace(base.for_gpu(spec.name), **fit["factors"])
    out = []
    for f in files:
        data = json.loads(Path(f).read_text())
        pts = [p for p in data["points"] if p["mode"] == mode]
        if pts:
            out.append(dict(file=Path(f).name, preset=data["settings"]["preset"],
                            **prediction_errors(pts, built_config(data), spec, cal)))
    return out


def calibration_note(data: dict, fit: dict, name: str, extra: str = "") -> str:
    st = data["settings"]
    f = fit["factors"]
    fixed = "".join(f", {k} fixed at {f[k]:g}" for k in fit["fixed"])
    checks = "".join(f"; on {c['preset']}'s stages ({c['file']}) rms error {c['rms_relative_error']:.1%}"
                     for c in fit.get("checks", []))
    return (f"compute factors fitted by bench/rank_local.py to measurements of {data['date']}, "
            f"{data['environment'].get('gpu', data['machine'])}, torch {data['environment']['torch']}; {st['preset']} "
            f"({st['layers']} blocks), {', '.join('x'.join(map(str, s)) for s in st['sizes'])}, {st['dtype']}, "
            f"{data['fit_mode']} mode, attention {st['attention']}, {fit['points']} rank-local stages of "
            f"{st['world']}-GPU layouts{fixed} (rms error {fit['rms_relative_error']:.1%}{checks}); "
            f"comm factors from bench/scaling.py; details in {name}" + (f"; {extra}" if extra else ""))


def parse_fix(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in FITTED + ("gemm_half_rows",):
        raise argparse.ArgumentTypeError(f"{name!r} is not a fitted factor: one of {', '.join(FITTED)}, gemm_half_rows")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=NUMBER") from None


def gains(points: list[dict]) -> list[dict]:
    """Per (size, stage): every mode's step and its speedup over eager."""
    rows = {}
    for p in points:
        row = rows.setdefault((tuple(p["size"]), p["label"]),
                              dict(size=p["size"], stage=p["label"], local_tokens=p["local_tokens"],
                                   local_heads=p["local_heads"], batch=p["batch"], step_ms={}))
        row["step_ms"][p["mode"]] = p["step_s"] * 1e3
    for row in rows.values():
        eager = row["step_ms"].get("eager")
        row["speedup_vs_eager"] = {m: eager / t for m, t in row["step_ms"].items()} if eager else {}
        comp = row["step_ms"].get("compiled")
        if comp and "compiled+graph" in row["step_ms"]:
            row["graph_gain_over_compiled"] = comp / row["step_ms"]["compiled+graph"]
    return list(rows.values())


def print_table(table: list[dict], fit: dict | None, notes: list[str]) -> None:
    modes = [m for m in MODES if any(m in r["step_ms"] for r in table)]
    if table:
        print("\n" + f"{'size':<12} {'stage':<10} {'tokens':>7} {'B':>2} " + " ".join(f"{m:>15}" for m in modes)
              + "   (ms per step; x = speedup over eager)")
    for r in table:
        cells = [f"{r['step_ms'][m]:8.2f} x{r['speedup_vs_eager'].get(m, 0):4.2f}" if m in r["step_ms"] else " " * 15
                 for m in modes]
        print(f"{'x'.join(map(str, r['size'])):<12} {r['stage']:<10} {r['local_tokens']:>7} {r['batch']:>2} "
              + " ".join(f"{c:>15}" for c in cells))
    if fit:
        f = fit["factors"]
        fixed = f" ({', '.join(fit['fixed'])} fixed)" if fit["fixed"] else ""
        print(f"\nfit ({fit['points']} points){fixed}: matmul_efficiency {f['matmul_efficiency']:.3f}, "
              f"attention_efficiency {f['attention_efficiency']:.3f}, gemm_half_rows {f['gemm_half_rows']}, "
              f"layer_overhead_us {f['layer_overhead_us']:.1f}; rms relative error {fit['rms_relative_error']:.1%} "
              f"(max {fit['max_relative_error']:.1%})")
        for c in fit.get("checks", []):
            print(f"check on {c['file']} ({c['preset']}, {c['points']} points): rms relative error "
                  f"{c['rms_relative_error']:.1%}, max {c['max_relative_error']:.1%}, mean {c['mean_relative_error']:+.1%}")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())

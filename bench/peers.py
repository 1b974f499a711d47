"""Peers side by side: paradit, diffusers and xDiT (xfuser) on the same Wan weights, inputs and layouts.

    python bench/peers.py --worlds 1,2,4 --stat min          # CPU: tiny preset, gloo worlds
    python bench/peers.py --layers 4                         # one GPU: A14B shape at 1280x720x81, 4 of 40 blocks
    python bench/peers.py --worlds 1,2,4,8 --layers 4        # GPUs: xfuser's Ulysses / Ring layouts too

One command: it launches each world itself (bench/launcher.run_world, like scaling.py) and writes
bench/results/<date>_<machine>_peers.json. Knobs and defaults are scaling.py's (--preset, --size,
--frames, --layers, --dtype, --steps, --warmup, --stat, --worlds); --layouts takes its syntax,
sequence-parallel terms only (U, R, SP; default U,R,U2R: U2 and R2 at world 2; U4, R4 and U2R2 at 4).

Installing the peers: `pip install -e .[peers]` (xfuser and its needs; diffusers is paradit's own
dependency). Without touching an environment's pins, e.g. on a GPU image that already has torch:
    pip install --no-deps --target /tmp/peers_site diffusers xfuser yunchang distvae beautifulsoup4 soupsieve av
    PYTHONPATH=/tmp/peers_site python bench/peers.py
(xfuser also imports transformers, accelerate, peft, einops, sentencepiece and, through torch's CUDA
build, triton). xfuser does not run without a GPU: on CPU its row says why, in its own words.

Who runs (every library holds the same random weights: paradit's tensors, renamed by
paradit.checkpoint.to_diffusers_name and assigned, not copied; the modules diffusers'
from_pretrained keeps in fp32 (_keep_in_fp32_modules) are upcast as it would; the same latent,
timestep and text embeddings):
  paradit    WanTransformer: the single device and every layout.
  diffusers  WanTransformer3DModel at world 1: the one-device baseline. Needed: the script stops
             with the package named if it does not import.
  xfuser     xFuserWanTransformer3DWrapper, diffusers' model with xfuser's USP attention processors,
             set up as its runner does (init_distributed_environment, initialize_model_parallel with
             ulysses_degree / ring_degree, initialize_runtime_state with xFuserArgs' engine config):
             at world 1 (no sequence parallelism) and every layout, when it imports; otherwise a row
             per world says why it did not run (never a silent omission). xfuser's Wan T2V runners have
             no CFG parallelism, so CFG layouts are scaling.py's alone.

Measures (--measure, default both):
  forward  one expert forward, batch 1: the full latent in, the full output on every rank. paradit:
           parallelize(model, mesh), which shards the tokens and all-gathers the output; xfuser: its
           wrapper, which chunks the sequence (zero-padding it to a multiple of the sp degree; the
           padded keys then take part in attention, which the rel err column shows where the tokens do
           not divide) and all-gathers the output; diffusers: the model.
  step     one guided velocity (cond + uncond, then the CFG combine) as each library runs it in its
           pipeline. paradit: bench/scaling_measure.py's measure_point unchanged: Runtime.velocity on
           the rank's token shard, cond and uncond batched, plus the Euler update (so its comm share
           and bytes per collective come too). diffusers: one batch-2 forward (cond, uncond) and the
           combine.
           xfuser: two forwards, cond then uncond, and the combine, the way diffusers' WanPipeline
           (which xfuser's Wan T2V runner drives) calls the transformer.
  time     a first call timed apart (first_call_s), --warmup - 1 more untimed, then --steps timed calls,
           each after a barrier; CUDA events on GPU, perf_counter on CPU; the slowest rank of each call
           counts; --stat (median, or min on a shared machine) picks the headline.
  memory   GPU: torch.cuda.max_memory_allocated over the timed calls (the weights are shared, so every
           library's figure includes the same weights once). CPU: the process's peak RSS, high-water
           mark reset per row (scaling_measure.reset_memory).
  rel err  ||out - ref|| / ||ref|| in fp32; ref = paradit's single-device output of the same measure
           (step: the guided velocity, before any update), computed once outside the timing. It proves
           both sides computed the same function: ~1e-6 in fp32, ~1e-2 in bf16 (different summation
           orders and where each library rounds to bf16).
  speedup  paradit's single-device time of the same measure / the row's time (latency, not per GPU).
  drift    rank 0 times a matmul before and after every row; > 25% off the run's median marks the row
           suspect ("?", a note), as scaling.py does.
  --layers N builds N blocks; times and memory are extrapolated per layer by scaling_fit.extrapolate.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from launcher import environment, has_cuda, machine_description, machine_tag, results_path, run_world, write_json  # noqa: E402
from scaling import add_run_args, options  # noqa: E402
from scaling_fit import extrapolate  # noqa: E402
from scaling_layouts import parse_layout, plan_points  # noqa: E402
from scaling_measure import (build_model, drift_notes, make_inputs, measure_point, merge_ranks, model_config,  # noqa: E402
                             speed_check, timed_calls)

from paradit.checkpoint import to_diffusers_name  # noqa: E402
from paradit.config import WanConfig  # noqa: E402
from paradit.models.transformer import patchify, unpatchify  # noqa: E402
from paradit.parallel import Runtime, init_parallel, parallelize  # noqa: E402
from paradit.parallel.collectives import Traffic  # noqa: E402
from paradit.plan import ParallelConfig  # noqa: E402

LIBRARIES = ("paradit", "diffusers", "xfuser")   # the order of rows in a world: paradit's single ones first
DEFAULT_LAYOUTS = "U,R,U2R"


# ============================================================================ the peers, inside a rank
def diffusers_twin(model, cls):
    """A diffusers-layout Wan model of class `cls` (WanTransformer3DModel or xfuser's subclass) holding
    paradit `model`'s own tensors; the modules from_pretrained keeps in fp32 are upcast as it would."""
    c = model.cfg
    weight = next(model.parameters())
    with torch.device(weight.device):   # built in fp32 (its RoPE tables too), then given paradit's tensors
        twin = cls(patch_size=tuple(c.patch), num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
                   in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim,
                   freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
                   cross_attn_norm=c.cross_attn_norm, eps=c.eps)
    twin.load_state_dict({to_diffusers_name(k): v for k, v in model.state_dict().items()}, strict=True, assign=True)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    for name, p in twin.named_parameters():   # diffusers' own rule (model_loading_utils): a name part matches
        if p.dtype != torch.float32 and any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return twin.eval().requires_grad_(False)


def diffusers_class():
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as err:
        raise ImportError(f"the one-device baseline needs the 'diffusers' package ({err})") from err
    return WanTransformer3DModel


def diffusers_attention() -> str:
    try:   # the backend dispatch_attention_fn uses when a processor names none (DIFFUSERS_ATTN_BACKEND)
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        name = _AttentionBackendRegistry.get_active_backend()[0]
        name = getattr(name, "value", name)
    except (ImportError, AttributeError):
        name = "unknown"
    return f"diffusers dispatch_attention_fn backend {name!r}" + (" (torch SDPA)" if name == "native" else "")


def xfuser_unavailable() -> str | None:
    """None if xfuser's Wan transformer imports here; else why not, with the exception's own words."""
    try:
        import xfuser  # noqa: F401
        from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper  # noqa: F401
    except Exception as err:   # ImportError when absent; xfuser raises NotImplementedError on import without a GPU
        why = f"{type(err).__name__}: {err}"
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] == "xfuser":
            return f"not installed ({why}); pip install xfuser, see bench/peers.py's docstring"
        if "No Accelerators" in str(err):
            return (f"needs CUDA (or ROCm / MUSA / NPU): importing xfuser raised {why} "
                    f"(xfuser.envs.get_device_version, read at import by xfuser.config.config as CUDA_VERSION). "
                    f"Past that, its default process-group backend raises the same, and its sequence "
                    f"parallelism needs yunchang's groups, which xfuser sets up only when "
                    f"torch.cuda.is_available() (envs.check_long_ctx_attn): SequenceParallelConfig "
                    f"refuses sp_degree > 1 on CPU even with yunchang installed")
        if isinstance(err, ModuleNotFoundError) and err.name == "triton":
            return f"cannot import ({why}): xfuser imports triton unconditionally; torch's CPU builds do not ship it"
        return f"cannot import ({why})"
    return None


def xfuser_setup(ulysses: int, ring: int, model):
    """xfuser's groups and runtime state for one layout, as its runner sets them up; the backend is the
    one this world already runs on (NCCL on GPU)."""
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel, initialize_runtime_state

    device = next(model.parameters()).device
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    init_distributed_environment(rank=rank, world_size=world, backend=backend)   # world 1: its own group
    xfuser_teardown()                                                            # the previous layout's groups
    initialize_model_parallel(ulysses_degree=ulysses, ring_degree=ring, sequence_parallel_degree=ulysses * ring,
                              backend=backend)
    engine_config, _ = xFuserArgs(model="paradit-peers", ulysses_degree=ulysses, ring_degree=ring).create_config()
    initialize_runtime_state(_Holder(model), engine_config)


def xfuser_teardown() -> None:
    from xfuser.core.distributed import model_parallel_is_initialized
    from xfuser.core.distributed.parallel_state import destroy_model_parallel
    if model_parallel_is_initialized():
        destroy_model_parallel()


def xfuser_attention(ulysses: int, ring: int, tokens: int) -> str:
    from xfuser.core.distributed import get_runtime_state
    backend = get_runtime_state().attention_backend
    pad = (-tokens) % (ulysses * ring)
    return (f"xfuser USP, attention backend {backend.name} ({backend.value})"
            + (f"; sequence zero-padded by {pad} tokens" if pad else ""))


class _Holder:
    """What initialize_runtime_state reads from a pipeline: its transformer (heads, patch, channels)."""

    def __init__(self, transformer):
        self.transformer = transformer


# ============================================================================ one world
def latent_call(cfg: WanConfig, inputs: dict, device, dtype) -> dict:
    """scaling_measure.make_inputs' tokens as the latent a diffusers-style model takes, in the model dtype,
    the first timestep of the schedule, and the text in the model dtype (as WanPipeline passes them)."""
    x = unpatchify(inputs["tokens"][None], inputs["grid"], cfg.patch).to(device, dtype)   # (1, C, F, H, W)
    t = torch.full((1,), 1000.0 * inputs["sigmas"][0], device=device)
    cond, uncond = inputs["cond"].to(dtype), inputs["uncond"].to(dtype)                  # (1, S, text_dim)
    return dict(x=x, t=t, cond=cond, uncond=uncond, x2=x.repeat(2, 1, 1, 1, 1), t2=t.expand(2),
                text2=torch.cat([cond, uncond]), g=inputs["guidance"])


def measure_calls(fn, opts: dict, device, attention: str, traffic: Traffic | None = None) -> dict:
    """One rank's numbers for a callable, in the shape scaling_measure.merge_ranks reads; traffic: the
    counter paradit's collectives count into (the other libraries' traffic is not counted)."""
    return timed_calls(fn, opts["steps"], opts["warmup"], device, traffic or Traffic()) | dict(attention=attention)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.to(out.device).float()
    return ((out - ref).norm() / ref.norm()).item()


def run_paradit(model, cfg, inputs, call, point, opts, device) -> tuple[dict, torch.Tensor]:
    pc = ParallelConfig(**point["config"])
    dtype = next(model.parameters()).dtype
    if point["measure"] == "forward":
        pmodel = parallelize(model, init_parallel(pc, device, num_heads=cfg.num_heads))
        fn = lambda: pmodel(call["x"], call["t"], call["cond"])  # noqa: E731
        with torch.no_grad():
            out = fn()
        return measure_calls(fn, opts, device, pmodel.runtime.describe(), pmodel.runtime.traffic), out
    runtime = Runtime(init_parallel(pc, device, num_heads=cfg.num_heads), "auto", dtype)
    runtime.bind(model)
    n = inputs["tokens"].shape[0]
    start, end = runtime.token_range(n)
    with torch.no_grad():
        v = runtime.velocity(model, inputs["tokens"][start:end].to(device), call["t"][0], inputs["cond"],
                             inputs["uncond"], call["g"], inputs["grid"])
        out = runtime.gather_tokens(v, n)                                              # (L, P*C)
    return measure_point(model, cfg, inputs, point, opts, device), out


def run_diffusers_like(twin, call, point, opts, device, attention: str) -> tuple[dict, torch.Tensor]:
    """diffusers' model, or xfuser's wrapper of it: the forward, or the guided step as each runs it.
    Returns the forward's (1, C, F, H, W) output, or the step's velocity as paradit's (L, P*C) tokens."""
    c = call
    fwd = lambda text: twin(hidden_states=c["x"], timestep=c["t"], encoder_hidden_states=text,  # noqa: E731
                            return_dict=False)[0]
    if point["measure"] == "forward":
        fn = lambda: fwd(c["cond"])  # noqa: E731
    elif point["library"] == "diffusers":   # cond and uncond as one batch of 2
        def fn():
            both = twin(hidden_states=c["x2"], timestep=c["t2"], encoder_hidden_states=c["text2"], return_dict=False)[0]
            return both[1] + c["g"] * (both[0] - both[1])                      # (C, F, H, W)
    else:                                   # WanPipeline: cond, then uncond, then the combine
        def fn():
            v_cond, v_uncond = fwd(c["cond"])[0], fwd(c["uncond"])[0]
            return v_uncond + c["g"] * (v_cond - v_uncond)
    with torch.no_grad():
        out = fn()
    if point["measure"] == "step":
        out = patchify(out[None].float(), tuple(twin.config.patch_size))[0]   # (L, P*C)
    return measure_calls(fn, opts, device, attention), out


def run_xfuser(model, inputs, call, point, opts, device, xf: dict) -> tuple[dict, object]:
    """xfuser's row, or {"error": why} (with "unavailable" when it does not import: the same in every
    later world). xf carries its model and current layout between the rows of a world."""
    if xf.get("why") is None:
        xf["why"] = xfuser_unavailable() or ""
    if xf["why"]:
        return {"error": xf["why"], "unavailable": True}, None
    u, r = point["config"]["ulysses"], point["config"]["ring"]
    try:
        if xf.get("model") is None:
            from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper
            xf["model"] = diffusers_twin(model, xFuserWanTransformer3DWrapper)
        if xf.get("layout") != point["config"]:
            xf["layout"] = None
            xfuser_setup(u, r, xf["model"])
            xf["layout"] = point["config"]
        attention = xfuser_attention(u, r, inputs["tokens"].shape[0])
        return run_diffusers_like(xf["model"], call, point, opts, device, attention)
    except Exception as err:   # reported in the table; the other ranks meet it at the next all_gather
        return {"error": f"{type(err).__name__}: {err}"[:600]}, None


def world_main(points: list[dict], opts: dict, ref_path: str) -> list[dict] | None:
    """Every row of one world on this rank; rank 0 returns the merged records."""
    logging.getLogger("paradit").setLevel(logging.WARNING)
    device = torch.device("cuda", torch.cuda.current_device()) if opts["device"] == "cuda" else torch.device("cpu")
    cfg = model_config(opts)
    model = build_model(cfg, device, getattr(torch, opts["dtype"]))
    inputs = make_inputs(cfg, opts, device)
    call = latent_call(cfg, inputs, device, next(model.parameters()).dtype)
    ref = torch.load(ref_path) if Path(ref_path).exists() else {}   # paradit's single-device outputs
    lead = not dist.is_initialized() or dist.get_rank() == 0
    diffusers_model, xf, records = None, {}, []
    for point in points:
        before = speed_check(device)
        if point["library"] == "paradit":
            mine, out = run_paradit(model, cfg, inputs, call, point, opts, device)
        elif point["library"] == "diffusers":
            if diffusers_model is None:
                diffusers_model = diffusers_twin(model, diffusers_class())
            mine, out = run_diffusers_like(diffusers_model, call, point, opts, device, diffusers_attention())
        else:
            mine, out = run_xfuser(model, inputs, call, point, opts, device, xf)
        ranks = [mine]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        failed = [r for r in ranks if "error" in r]
        if failed:
            records.append(dict(point, status="did not run", reason=failed[0]["error"],
                                unavailable=failed[0].get("unavailable", False)))
            continue
        rec = merge_ranks(point, ranks, opts["stat"])
        rec["rel_err_vs_paradit"] = rel_err(out, ref[point["measure"]]) if point["measure"] in ref else None
        rec["machine_speed"] = dict(matmul_tflops_before=before, matmul_tflops_after=speed_check(device))
        records.append(rec)
        if point["library"] == "paradit" and point["world"] == 1 and lead:
            ref[point["measure"]] = out.float().cpu()
            torch.save(ref, ref_path)
    if xf.get("layout"):
        xfuser_teardown()
    return records if lead else None


# ============================================================================ the sweep
def layout_name(config: dict) -> str:
    u, r = config["ulysses"], config["ring"]
    return "single" if u * r == 1 else (f"U{u}" if u > 1 else "") + (f"R{r}" if r > 1 else "")


def plan(args, cfg: WanConfig, device_type: str) -> tuple[list[dict], list[str]]:
    """Every row to run: paradit's points from scaling_layouts.plan_points, diffusers at world 1, xfuser wherever
    paradit runs a layout."""
    specs = [parse_layout(t) for t in (args.layouts or DEFAULT_LAYOUTS).split(",") if t.strip()]
    for s in specs:
        if {t for t, _ in s.terms} - {"U", "R", "SP"}:
            raise SystemExit(f"--layouts {s.text!r}: peers.py compares sequence-parallel layouts (U, R, SP terms); "
                             f"CFG, DP and CHORDS layouts are scaling.py's")
    max_world = torch.cuda.device_count() if device_type == "cuda" else 64
    worlds = [int(w) for w in args.worlds.split(",")]
    points, notes = plan_points(specs, worlds, cfg.num_heads, ["auto"], args.measure.split(","), max_world)
    rows = []
    for p in points:
        base = dict(world=p["world"], config=p["config"], measure=p["measure"], backend="auto",
                    layout=layout_name(p["config"]))
        rows.append(dict(base, library="paradit", label=f"paradit {base['layout']}"))
        if p["world"] == 1:
            rows.append(dict(base, library="diffusers", label="diffusers single"))
        rows.append(dict(base, library="xfuser", label=f"xfuser {base['layout']}"))
    rows.sort(key=lambda r: (r["world"], LIBRARIES.index(r["library"])))   # paradit's single rows: the reference
    return rows, notes


def run_sweep(rows: list[dict], opts: dict, device_type: str, timeout_s: float) -> list[dict]:
    records, xfuser_why = [], None
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        ref_path = str(Path(tmp) / "paradit_single.pt")
        for world in sorted({r["world"] for r in rows}):
            mine = [r for r in rows if r["world"] == world]
            if xfuser_why:   # it failed to import in world 1: the same here, say so once for the world
                skipped = [r for r in mine if r["library"] == "xfuser"]
                mine = [r for r in mine if r["library"] != "xfuser"]
                if skipped:
                    records.append(dict(skipped[0], layout=", ".join(dict.fromkeys(r["layout"] for r in skipped)),
                                        measure="-", status="did not run", reason=xfuser_why))
            print(f"world {world}: {', '.join(dict.fromkeys(r['label'] for r in mine))}", flush=True)
            out = run_world(world_main, world, mine, opts, ref_path, device_type=device_type, timeout_s=timeout_s)[0]
            xfuser_why = xfuser_why or next((r["reason"] for r in out if r.get("unavailable")), None)
            records += _collapse_xfuser_failures(out)
    return sorted(records, key=lambda r: (r["world"], LIBRARIES.index(r["library"])))


def _collapse_xfuser_failures(records: list[dict]) -> list[dict]:
    """One row per world for an xfuser that did not run for one reason at every layout and measure."""
    failed = [r for r in records if r["library"] == "xfuser" and r.get("status")]
    reasons = {r["reason"] for r in failed}
    if len(failed) < 2 or len(reasons) != 1:
        return records
    keep = [r for r in records if r not in failed]
    return keep + [dict(failed[0], layout=", ".join(dict.fromkeys(r["layout"] for r in failed)), measure="-")]


def attach_speedups(records: list[dict]) -> None:
    base = {r["measure"]: r["step_s"]["headline"] for r in records
            if r["library"] == "paradit" and r["world"] == 1 and "step_s" in r}
    for r in records:
        if "step_s" in r:
            ref = base.get(r["measure"])
            r["speedup_vs_paradit_single"] = ref / r["step_s"]["headline"] if ref else None


def table(records: list[dict], extrapolated: dict | None) -> str:
    head = ["library", "layout", "world", "measure", "time ms [min-max]", "speedup vs paradit single", "peak MB",
            "rel err vs paradit", "notes"]
    if extrapolated:   # the same time and memory scaled to the full depth (scaling_fit.extrapolate)
        head[5:5] = [f"s x{extrapolated['layers_full']}/{extrapolated['layers_run']} layers", "peak GiB (full)"]
    rows = [head]
    for r in records:
        if "step_s" not in r:
            cells = [r["library"], r["layout"], str(r["world"]), r["measure"], "did not run", "-", "-", "-",
                     "did not run: " + r["reason"]]
        else:
            st, err = r["step_s"], r.get("rel_err_vs_paradit")
            cells = [r["library"], r["layout"] + (" ?" if r.get("suspect") else ""), str(r["world"]), r["measure"],
                     f"{1e3 * st['headline']:.4g} [{1e3 * st['min']:.4g}-{1e3 * st['max']:.4g}]",
                     "-" if r["speedup_vs_paradit_single"] is None else f"{r['speedup_vs_paradit_single']:.2f}",
                     f"{r['peak_mem_mb']['max']:.0f}", _err(r, err), r["attention"]]
        if extrapolated:
            e = r.get("extrapolated")
            cells[5:5] = ["-", "-"] if not e else [f"{e['step_s']:.4g}", f"{e['peak_mem_mb'] / 1024:.1f}"]
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]) for row in rows)


def _err(r: dict, err: float | None) -> str:
    if r["library"] == "paradit" and r["world"] == 1:
        return "ref"
    return "-" if err is None else f"{err:.1e}"


def versions() -> dict:
    out = {}
    for name in ("torch", "diffusers", "xfuser", "yunchang", "triton", "flash-attn"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap)
    ap.add_argument("--layouts", help=f"comma-separated U / R / SP layouts, scaling.py's syntax (default {DEFAULT_LAYOUTS})")
    ap.add_argument("--measure", default="forward,step", help="forward (one expert) and/or step (guided velocity)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device_type = "cuda" if (args.device == "cuda" or (args.device == "auto" and has_cuda())) else "cpu"
    if importlib.util.find_spec("diffusers") is None:
        raise SystemExit("peers.py: the one-device baseline needs the 'diffusers' package, which is not importable "
                         "here: pip install diffusers (or put its wheel on PYTHONPATH; see bench/README.md)")
    opts = options(args, device_type)
    cfg, full_cfg = model_config(opts), WanConfig.preset(opts["preset"])
    rows, notes = plan(args, cfg, device_type)
    tag = machine_tag(device_type)
    tokens = cfg.num_tokens(opts["width"], opts["height"], opts["frames"])
    depth = f" ({cfg.num_layers} of {full_cfg.num_layers} layers)" if cfg.num_layers != full_cfg.num_layers else ""
    settings = (f"{cfg.name}{depth}, {opts['width']}x{opts['height']}x{opts['frames']} ({tokens} tokens), "
                f"{opts['dtype']}, {opts['stat']} of {opts['steps']} timed calls")
    print(f"peers: {settings} on {machine_description(device_type)}", flush=True)
    for n in notes:
        print("  note:", n)

    t0 = time.time()
    records = run_sweep(rows, opts, device_type, args.timeout)
    ran = [r for r in records if "step_s" in r]
    rates = [v for r in ran for v in r["machine_speed"].values() if v is not None]
    drift = drift_notes(ran, {"matmul": {"tflops": statistics.median(rates)}}) if rates else []
    attach_speedups(records)
    extra = extrapolate(ran, cfg, full_cfg, opts)
    print(table(records, extra))
    if extra:
        print(f"extrapolated: {extra['how']}")
    for n in notes + drift:
        print("note:", n)

    title = f"{machine_description(device_type)} [{tag}]\n{settings}"
    result = dict(what="peers", date=time.strftime("%Y-%m-%d"), machine=tag, title=title,
                  machine_description=machine_description(device_type), environment=environment() | {"versions": versions()},
                  settings=opts, model=dataclasses.asdict(cfg), tokens=tokens, extrapolation=extra,
                  notes=notes + drift, method=__doc__, rows=records, wall_s=time.time() - t0)
    path = write_json(results_path("peers", "json", args.out, tag), result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

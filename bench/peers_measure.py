"""Inside each rank of peers.py's worlds: paradit, diffusers and xfuser (xDiT) on the same weights and
inputs, each library's row timed the same way (scaling_measure.timed_calls) with its error against
paradit's single-device output. peers.py's docstring says what each library runs and how."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from launcher import rank_device
from scaling_measure import (build_model, make_inputs, measure_point, merge_ranks, model_config, speed_check,
                             timed_calls)

from paradit.checkpoint import to_diffusers_name
from paradit.config import WanConfig
from paradit.demo.judge import rel_err
from paradit.models.transformer import patchify, unpatchify
from paradit.parallel import Runtime, init_parallel, parallelize
from paradit.parallel.collectives import Traffic
from paradit.plan import ParallelConfig


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
    device = rank_device(opts["device"])
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
        rec["rel_err_vs_paradit"] = (rel_err(out, ref[point["measure"]].to(out.device))
                                     if point["measure"] in ref else None)
        rec["machine_speed"] = dict(matmul_tflops_before=before, matmul_tflops_after=speed_check(device))
        records.append(rec)
        if point["library"] == "paradit" and point["world"] == 1 and lead:
            ref[point["measure"]] = out.float().cpu()
            torch.save(ref, ref_path)
    if xf.get("layout"):
        xfuser_teardown()
    return records if lead else None


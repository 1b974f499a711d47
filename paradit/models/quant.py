"""Opt-in FP8 for the transformer: torchao's float8 linear layers, FP8 attention where a kernel exists.

Modes (paradit.settings.QUANT_MODES; `quant=` in the library, `--quant` on the command line):
  none           every weight and activation as loaded
  fp8            the linear layers of every block (fp8_linear_names): self- and cross-attention's q, k,
                 v, o and the FFN's two. Weights become float8 e4m3 with one scale per output row,
                 activations are quantised on the fly with one scale per token, and the products are
                 accumulated in fp32 and returned in bf16: torchao's
                 Float8DynamicActivationFloat8WeightConfig with PerRow granularity (torch._scaled_mm
                 with row-wise scales), on GPUs of compute capability 8.9 or higher.
  fp8-attention  self-attention's kernel in FP8 on Hopper: torchao's FP8 FlashAttention-3 path (torch
                 2.11+, the flash_attn_interface module; per-(batch, head) scales on q, k and v), else
                 cuDNN's FP8 SDPA through cudnn-frontend (per-tensor scales; on Hopper its output O is
                 FP8 too). flash-attn-4's FP8 forward runs on Blackwell (SM100) only.
  fp8-all        both
What stays as loaded: the patch, text and time embeddings, the time projection, the modulation, the
norms (fp32), the gates, the residual stream (fp32 adds), the head and cross-attention's kernel.

Order: after loading and the LoRA merge (the merged weights are what is quantised), before
torch.compile (the compiled graphs see the float8 weights). check_quant runs before any weight is
read; a machine without FP8 is refused there, never quietly run in bf16. quantize_experts returns
what it did, which the pipeline logs and the CLI's sidecar records.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
import re

import torch
from torch import nn

from paradit.errors import ParameterError
from paradit.models.attention import AttentionFn
from paradit.residency import runs_with_quant
from paradit.settings import quant_parts

log = logging.getLogger("paradit")
Tensor = torch.Tensor

TORCHAO_HINT = "pip install 'paradit[quant]' (torchao 0.18, built for torch 2.11+)"
FP8_LINEARS = re.compile(r"blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])")
KEPT = ("patch, text and time embeddings, time projection, modulation, norms, gates, residual stream, head, "
        "cross-attention kernel")
LINEAR_RECIPE = ("torchao Float8DynamicActivationFloat8WeightConfig(PerRow): float8 e4m3 weights with one "
                 "scale per output row, activations with one scale per token, fp32 accumulation, bf16 out")
ATTENTION_RECIPE = "torchao FP8 FlashAttention-3 (e4m3 q, k, v; one scale per batch and head)"
CUDNN_ATTENTION_RECIPE = ("cuDNN FP8 SDPA through cudnn-frontend (e4m3 q, k, v, softmax P and output O, one scale "
                          "per tensor: q, k, v by their amax, P by 448, O by v's amax; fp32 softmax and "
                          "accumulation; O returned in bf16)")
E4M3_MAX = 448.0


# ----------------------------------------------------------------------------- what is quantised
def fp8_linear_names(model: nn.Module) -> list[str]:
    """The linear layers `fp8` quantises, in module order: each block's attention projections (q, k,
    v, o of self- and cross-attention) and its FFN's two linears. Pure: reads names and types only."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and FP8_LINEARS.fullmatch(name)]


def check_shapes(model: nn.Module, names: list[str], mode: str) -> None:
    """torch._scaled_mm takes float8 operands whose dimensions are multiples of 16, in bf16 models."""
    for name in names:
        lin = model.get_submodule(name)
        if lin.in_features % 16 or lin.out_features % 16:
            raise ParameterError("quant", mode, f"{name} is {lin.in_features} -> {lin.out_features}; FP8 "
                                 f"matmuls need both dimensions multiples of 16", "run this model without FP8")
        if lin.weight.dtype != torch.bfloat16:
            raise ParameterError("quant", mode, f"the model is in {lin.weight.dtype}; FP8 linear layers take "
                                 f"bf16 activations", "load the model in bf16 (dtype=torch.bfloat16; the Wan "
                                 "checkpoints are), or run it without FP8")


# ----------------------------------------------------------------------------- can it run here
def fp8_linears_missing(device) -> list[str]:
    """What this machine lacks for FP8 linear layers; empty when they run."""
    device = torch.device(device)
    missing = []
    if device.type != "cuda":
        missing.append(f"an NVIDIA GPU of compute capability 8.9 or higher (Ada, Hopper, Blackwell): the run is "
                       f"on {device.type}, where torchao refuses its float8 recipe")
    elif torch.cuda.get_device_capability(device) < (8, 9):
        cc = torch.cuda.get_device_capability(device)
        missing.append(f"a GPU of compute capability 8.9 or higher: {torch.cuda.get_device_name(device)} is "
                       f"{cc[0]}.{cc[1]}, without FP8 tensor cores")
    if importlib.util.find_spec("torchao") is None:
        missing.append(f"torchao ({TORCHAO_HINT})")
    return missing


def fa3_fp8_attention_missing(device) -> list[str]:
    """What this machine lacks for torchao's FP8 FlashAttention-3 path."""
    device = torch.device(device)
    missing = []
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        what = device.type if device.type != "cuda" else torch.cuda.get_device_name(device)
        missing.append(f"a Hopper GPU (compute capability 9.x; FP8 FlashAttention-3 runs there only): the run is "
                       f"on {what}")
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
        missing.append(f"torch 2.11 or newer (its quantized SDPA entry point); this is {torch.__version__}")
    if importlib.util.find_spec("flash_attn_interface") is None:
        missing.append("FlashAttention-3 (the flash_attn_interface module, built from flash-attention's hopper/ "
                       "folder)")
    if importlib.util.find_spec("torchao") is None:
        missing.append(f"torchao ({TORCHAO_HINT})")
    return missing


def fp8_attention_missing(device) -> list[str]:
    """What this machine lacks for FP8 attention (either kernel); empty when one runs."""
    fa3, cudnn = fa3_fp8_attention_missing(device), cudnn_fp8_attention_missing(device)
    if not fa3 or not cudnn:
        return []
    return ["for FP8 attention either " + "; ".join(fa3) + " (FlashAttention-3), or " + "; ".join(cudnn) +
            " (cuDNN)"]


def cudnn_fp8_attention_missing(device) -> list[str]:
    """What this machine lacks for cuDNN's FP8 attention (Hopper, cuDNN 9.1+, cudnn-frontend)."""
    device = torch.device(device)
    missing = []
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        what = device.type if device.type != "cuda" else torch.cuda.get_device_name(device)
        missing.append(f"a Hopper GPU (compute capability 9.x) for cuDNN's FP8 attention: the run is on {what}")
    elif (torch.backends.cudnn.version() or 0) < 90100:
        missing.append(f"cuDNN 9.1 or newer (this is {torch.backends.cudnn.version()})")
    if importlib.util.find_spec("cudnn") is None:
        missing.append("cudnn-frontend's Python package (pip install nvidia-cudnn-frontend)")
    return missing


@functools.lru_cache(maxsize=None)   # one built cuDNN plan per shape and device: a memo, not state
def _cudnn_fp8_plan(b: int, s_q: int, s_k: int, h: int, d: int, device_index: int):
    import cudnn
    handle = cudnn.create_handle()
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)

    def bshd(name, s):   # (B, S, H, D) storage described as cuDNN's (B, H, S, D)
        return graph.tensor(name=name, dim=(b, h, s, d), stride=(s * h * d, d, h * d, 1), data_type=e4m3)
    q, k, v = bshd("q", s_q), bshd("k", s_k), bshd("v", s_k)
    scalars = [graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    o, _, amax_s, amax_o = graph.sdpa_fp8(q, k, v, *scalars, generate_stats=False, attn_scale=1.0 / math.sqrt(d),
                                          use_causal_mask=False, name="paradit_fp8_sdpa")
    o.set_output(True).set_dim((b, h, s_q, d)).set_stride((s_q * h * d, d, h * d, 1)).set_data_type(e4m3)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=f"cuda:{device_index}")
    return cudnn, handle, graph, (q, k, v, *scalars, o, amax_s, amax_o), workspace


def _e4m3(t: Tensor) -> tuple[Tensor, Tensor]:
    """t in float8 e4m3 with one scale for the whole tensor; (fp8 tensor, descale (1,1,1,1) fp32)."""
    amax = t.abs().amax().float().clamp(min=1e-12)
    return (t * (E4M3_MAX / amax)).to(torch.float8_e4m3fn), (amax / E4M3_MAX).reshape(1, 1, 1, 1)


@torch.library.custom_op("paradit::cudnn_fp8_attention", mutates_args=())
def _cudnn_fp8_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, S, H, D) bf16 q, k, v -> bf16 out, through cuDNN's FP8 SDPA (one opaque op for torch.compile)."""
    b, s_q, h, d = q.shape
    cudnn, handle, graph, t, workspace = _cudnn_fp8_plan(b, s_q, k.shape[1], h, d, q.device.index or 0)
    (q8, dq), (k8, dk), (v8, dv) = _e4m3(q.contiguous()), _e4m3(k.contiguous()), _e4m3(v.contiguous())
    one = dq.new_ones(1, 1, 1, 1)
    scale_s, descale_s = one * E4M3_MAX, one / E4M3_MAX   # P = exp(s - rowmax) lies in [0, 1]
    out8 = torch.empty(b, s_q, h, d, dtype=torch.float8_e4m3fn, device=q.device)
    amax_s, amax_o = one.clone(), one.clone()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
    graph.execute(dict(zip(t, (q8, k8, v8, dq, dk, dv, descale_s, scale_s, 1.0 / dv, out8, amax_s, amax_o))),
                  workspace, handle=handle)
    return out8.to(torch.bfloat16) * dv.to(torch.bfloat16)    # O <= max|v|: scaled by v's amax


@_cudnn_fp8_op.register_fake
def _cudnn_fp8_shapes(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.empty_like(q)


def cudnn_fp8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Self-attention in FP8 on Hopper through cuDNN (CUDNN_ATTENTION_RECIPE)."""
    return _cudnn_fp8_op(q, k, v)


def _ring_degree(parallel) -> int:
    if parallel is None:
        return 1
    return max([parallel.ring, *(st[1] for st in parallel.stages or ())])


def _cannot_run(mode: str, missing: list[str]) -> ParameterError:
    return ParameterError("quant", mode, "FP8 cannot run on this machine; it needs " + "; and ".join(missing),
                          "run it on such a machine, or without FP8 (mode none, the default)")


def check_quant(mode: str, device, offload: str = "none", parallel=None) -> tuple[str, ...]:
    """The parts `mode` quantises, if they can run on `device` with this offload and layout; else a
    ParameterError saying what is missing. Cheap: runs on every rank before any weight is read."""
    parts = quant_parts(mode)
    missing = []
    if "linears" in parts:
        missing += fp8_linears_missing(device)
    if "attention" in parts:
        missing += [m for m in fp8_attention_missing(device) if m not in missing]
    if missing:
        raise _cannot_run(mode, missing)
    if not runs_with_quant(offload, mode):
        raise ParameterError("quant", mode, f"the expert offload (offload {offload}) does not move FP8 weights",
                             "offload none or text-encoder with FP8")
    if "attention" in parts and _ring_degree(parallel) > 1:
        raise ParameterError("quant", mode, "Ring attention merges partial results by their log-sum-exp, which "
                             "the FP8 attention kernel does not return", "use Ulysses (ring 1) or quant fp8")
    return parts


# ----------------------------------------------------------------------------- applying it
def quantize_experts(experts: list, mode: str) -> dict:
    """Quantise the linear layers of every loaded expert in place (None entries are skipped), per
    `mode`; returns what was done (logged here, recorded by the CLI's sidecar). The attention part is
    bound by the caller (Runtime.use_attention with fp8_attention())."""
    parts = quant_parts(mode)
    report = {"mode": mode, "linears": None, "attention": None, "kept": KEPT if parts else None}
    loaded = [m for m in experts if m is not None]
    if "linears" in parts and loaded:
        report["linears"] = _quantize_linears(loaded, mode)
        log.info("quant %s: FP8 linear layers, %s per expert (attention q/k/v/o and FFN of every block; %s, "
                 "%s); kept as loaded: %s", mode, "/".join(map(str, report["linears"]["layers_per_expert"])),
                 LINEAR_RECIPE, report["linears"]["kernel"], KEPT)
    if "attention" in parts:
        report["attention"] = fp8_attention_recipe(next(loaded[0].parameters()).device if loaded else "cuda")
        log.info("quant %s: self-attention in FP8 (%s)", mode, report["attention"])
    return report


def _quantize_linears(models: list[nn.Module], mode: str) -> dict:
    device = next(models[0].parameters()).device
    if fp8_linears_missing(device):
        raise _cannot_run(mode, fp8_linears_missing(device))
    chosen = [fp8_linear_names(m) for m in models]
    for model, names in zip(models, chosen):   # every expert checked before any is changed
        check_shapes(model, names, mode)
    import torchao
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    from torchao.utils import _is_mslk_available
    # set_inductor_config=False: torchao would otherwise change inductor's global options for the
    # whole process (bf16 graphs compiled later included).
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    for model, names in zip(models, chosen):
        quantize_(model, config, filter_fn=lambda m, fqn, names=frozenset(names): fqn in names)
    kernel = "mslk" if _is_mslk_available() and device.type == "cuda" else "torch._scaled_mm"  # torchao's AUTO rule
    return {"recipe": LINEAR_RECIPE, "torchao": torchao.__version__, "kernel": kernel,
            "layers_per_expert": [len(n) for n in chosen],
            "which": "blocks.*.self_attn.{q,k,v,o}, blocks.*.cross_attn.{q,k,v,o}, blocks.*.ffn.{0,2}"}


def fp8_attention_recipe(device) -> str:
    """The FP8 attention kernel that runs here: FlashAttention-3's (per-head scales, bf16 out) where it
    is installed, else cuDNN's (per-tensor scales, FP8 out on Hopper)."""
    return ATTENTION_RECIPE if not fa3_fp8_attention_missing(device) else CUDNN_ATTENTION_RECIPE


def fp8_attention() -> AttentionFn:
    """Self-attention in FP8: q, k, v (B, S, H, D) bf16 -> out (B, S, H, D) bf16, the kernel
    fp8_attention_recipe names. FlashAttention-3's goes through torchao's custom op (opaque to
    torch.compile) and switches torch's flash SDPA implementation to FA3 for the process
    (torch.nn.attention.activate_flash_attention_impl), as torchao's own wrapper does around each
    forward; cuDNN's is paradit's own custom op (cudnn_fp8_attention)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    missing = fp8_attention_missing(device)
    if missing:
        raise _cannot_run("fp8-attention", missing)
    if fa3_fp8_attention_missing(device):
        return cudnn_fp8_attention
    from torch.nn.attention import activate_flash_attention_impl
    from torchao.prototype.attention.fp8_fa3.attention import _ops
    activate_flash_attention_impl("FA3")

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = _ops.fp8_sdpa_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, D)
        return out.transpose(1, 2)                                                         # (B, S, H, D)
    return attention

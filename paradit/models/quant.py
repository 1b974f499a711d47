"""Opt-in FP8 for the transformer: torchao's float8 linear layers, FP8 attention where a kernel exists.

Modes (paradit.settings.QUANT_MODES; `quant=` in the library, `--quant` on the command line):
  none           every weight and activation as loaded
  fp8            the linear layers of every block (fp8_linear_names): self- and cross-attention's q, k,
                 v, o and the FFN's two. Weights become float8 e4m3 with one scale per output row,
                 activations are quantised on the fly with one scale per token, and the products are
                 accumulated in fp32 and returned in bf16: torchao's
                 Float8DynamicActivationFloat8WeightConfig with PerRow granularity (torch._scaled_mm
                 with row-wise scales), on GPUs of compute capability 8.9 or higher.
  fp8-attention  self-attention's kernel in FP8: torchao's FP8 FlashAttention-3 path (Hopper, torch
                 2.11+, the flash_attn_interface module); per-(batch, head) scales on q, k and v
  fp8-all        both
What stays as loaded: the patch, text and time embeddings, the time projection, the modulation, the
norms (fp32), the gates, the residual stream (fp32 adds), the head and cross-attention's kernel.

Order: after loading and the LoRA merge (the merged weights are what is quantised), before
torch.compile (the compiled graphs see the float8 weights). check_quant runs before any weight is
read; a machine without FP8 is refused there, never quietly run in bf16. quantize_experts returns
what it did, which the pipeline logs and the CLI's sidecar records.
"""
from __future__ import annotations

import importlib.util
import logging
import re

import torch
from torch import nn

from paradit.errors import ParameterError
from paradit.models.attention import AttentionFn
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


def fp8_attention_missing(device) -> list[str]:
    """What this machine lacks for FP8 attention; empty when it runs."""
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
    if parts and offload in ("experts", "all"):
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
        report["attention"] = ATTENTION_RECIPE
        log.info("quant %s: self-attention in FP8 (%s)", mode, ATTENTION_RECIPE)
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


def fp8_attention() -> AttentionFn:
    """Self-attention in FP8: q, k, v (B, S, H, D) bf16 -> out (B, S, H, D) bf16, through torchao's
    FP8 FlashAttention-3 custom op (opaque to torch.compile). It switches torch's flash SDPA
    implementation to FA3 for the process (torch.nn.attention.activate_flash_attention_impl), as
    torchao's own wrapper does around each forward."""
    missing = fp8_attention_missing(torch.device("cuda") if torch.cuda.is_available() else "cpu")
    if missing:
        raise _cannot_run("fp8-attention", missing)
    from torch.nn.attention import activate_flash_attention_impl
    from torchao.prototype.attention.fp8_fa3.attention import _ops
    activate_flash_attention_impl("FA3")

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = _ops.fp8_sdpa_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, D)
        return out.transpose(1, 2)                                                         # (B, S, H, D)
    return attention

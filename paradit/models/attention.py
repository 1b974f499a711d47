"""Local (single-device) attention kernels behind one interface.

Every kernel takes q, k, v as (B, S, H, D) and returns the output (B, S, H, D); the `*_lse`
variant also returns the log-sum-exp of the scores, (B, H, S) in fp32, which Ring attention needs
to merge partial results. Backends:

    fa4               flash-attn-4 (CuTe DSL; GPU, fp16/bf16; Hopper and Blackwell forward)
    flash             flash-attn 3 or 2 (GPU, fp16/bf16)
    sdpa              torch scaled_dot_product_attention (cuDNN / flash / efficient on GPU)
    math              plain matmul + logsumexp (any device, any dtype; the reference)

`auto` on a Hopper or Blackwell GPU with flash-attn-4 installed chooses per call shape between
flash-attn-4 and cuDNN (`PerShape`, from measurements); elsewhere flash if installed, else sdpa.

No torch.distributed here: this module is the model's default seam and the parallel code's kernel.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def math_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Reference attention with LSE; fp32 accumulation whatever the input dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, S, D)
    scores = (qf @ kf.transpose(-1, -2)) * scale                   # (B, H, Sq, Sk)
    lse = torch.logsumexp(scores, dim=-1)                          # (B, H, Sq)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ vf               # (B, H, Sq, D)
    return out.transpose(1, 2).to(q.dtype), lse


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, S, H, D)


def cudnn_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """CUDA, bf16/fp16: cuDNN's attention kernel with LSE."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True)[:2]
    return out.transpose(1, 2), lse.reshape(q.shape[0], q.shape[2], q.shape[1]).float()


def efficient_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """CUDA, any float dtype: the efficient-attention kernel with LSE (exact, head_dim <= 256)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        qt, kt, vt, None, compute_log_sumexp=True)[:2]
    return out.transpose(1, 2), lse[..., : q.shape[1]].float()  # lse may be padded to 32


def sdpa_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """CUDA SDPA with LSE: cuDNN's kernel in bf16/fp16, the efficient-attention kernel in fp32.

    On an H100 at the A14B 720p shape (75,600 tokens, 40 heads) cuDNN ran at 565 TFLOP/s and the
    efficient kernel at 179 (bench/attention_kernels.py), so Ring attention uses cuDNN where it can.
    """
    if q.dtype in (torch.bfloat16, torch.float16):
        return cudnn_attention_lse(q, k, v)
    return efficient_attention_lse(q, k, v)


def sdpa_cpu_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """CPU SDPA with LSE through torch's CPU flash kernel (exact; ~20x the math kernel's speed)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    return out.transpose(1, 2), lse.float()


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:      # a parent package is missing
        return False


def _flash_module():
    """FA3's module, else FA2's, else None. flash-attn-4 shares the `flash_attn` top folder (as a
    namespace package), so FA2 is recognised by its own interface module, not by the folder."""
    if _has_module("flash_attn_interface"):
        return "flash_attn_interface"
    if _has_module("flash_attn.flash_attn_interface"):
        return "flash_attn"
    return None


def fa4_available() -> bool:
    return _has_module("flash_attn.cute")


# flash-attn-4's own on-disk cache of compiled kernels, read when flash_attn.cute is first imported
FA4_CACHE_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


def _fa4_func():
    """flash_attn.cute's flash_attn_func, imported with flash-attn-4's persistent kernel cache on
    unless the environment says otherwise: its CuTe DSL compile of a kernel (6-9 s on an H100,
    holding the GIL beside the start-up's weight reads: reads 3.3 s alone, start-up 11.1 s beside
    it) then writes the kernel to disk (under /tmp/$USER/flash_attention_cute_dsl_cache, or
    FLASH_ATTENTION_CUTE_DSL_CACHE_DIR) for later processes. It spares them little: on an H100 a fresh
    process took 8.3 s, the next 6.2 s with the kernel on disk (2026-12-06)."""
    os.environ.setdefault(FA4_CACHE_ENV, "1")
    from flash_attn.cute import flash_attn_func
    return flash_attn_func


@torch.library.custom_op("paradit::fa4_attention", mutates_args=())
def _fa4_op(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """flash-attn-4's forward as one opaque op, so that torch.compile does not trace the CuTe DSL."""
    out, lse = _fa4_func()(q, k, v, return_lse=True)
    return out, lse


@_fa4_op.register_fake
def _fa4_shapes(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


def fa4_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """CUDA, bf16/fp16: flash-attn-4's forward with LSE, (B, S, H, D) in, (B, H, S) fp32 LSE out."""
    return _fa4_op(q, k, v)


def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _fa4_op(q, k, v)[0]


def build_kernels_ahead(backend: str, device: torch.device | str, heads: int, head_dim: int,
                        dtype: torch.dtype) -> float:
    """Build flash-attn-4's kernel for this rank's heads, head dim and dtype now, on a 256-token
    call, when `backend` (as pick_backend resolved it) may run it; returns the seconds taken (0.0
    when nothing is built). Its CuTe DSL compiles a kernel at the first call of each (heads, head
    dim, dtype): 6.8 s on the H200, which the first denoising step paid. The kernel does not depend
    on the sequence length, so start-up builds it beside the weight reads (checkpoint.py). On an H100
    this took 8.3 s in a fresh process and 6.2 s in the next, the kernel then in flash-attn-4's disk
    cache (_fa4_func): the CuTe DSL's import and the kernel's load are most of it."""
    if backend not in ("auto", "fa4") or torch.device(device).type != "cuda":
        return 0.0
    t0 = time.perf_counter()
    with torch.cuda.device(torch.device(device)):
        q = torch.zeros(1, 256, heads, head_dim, device=device, dtype=dtype)
        fa4_attention_lse(q, q, q)
        torch.cuda.current_stream().synchronize()
    return time.perf_counter() - t0


def flash_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    name = _flash_module()
    if name == "flash_attn_interface":
        from flash_attn_interface import flash_attn_func
        out, lse = flash_attn_func(q, k, v)[:2]
    else:
        from flash_attn import flash_attn_func
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    return out, lse.float()  # (B, S, H, D), (B, H, S)


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return flash_attention_lse(q, k, v)[0]


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return math_attention_lse(q, k, v)[0]


# flash-attn-4 against cuDNN on one H200 (bench/results/2026-12-02_h200x1_attention_layouts.json,
# bf16, head dim 128, the per-rank shapes of U1-8 and R2-8 at 720p and 480p x 81, B = 1 and 2):
# flash-attn-4 ran at 627-688 TFLOP/s and cuDNN at 552-619 in every shape but the smallest, a
# Ring-8 block at 480p (4,095 x 4,095 tokens, 40 heads, B = 1: 544 against 567). The crossover lies
# between that call's B*H*Sq*Sk (6.7e8) and the next one measured (1.3e9, where fa4 won by 2%).
FA4_MIN_WORK = 1e9


class PerShape:
    """`auto` on Hopper/Blackwell with flash-attn-4: for every call, the faster exact kernel for its
    shape (FA4_MIN_WORK), both with log-sum-exp for Ring. `ran` records each shape's kernel
    (shapes are static per plan, so this is filled once, also under torch.compile)."""

    def __init__(self):
        self.ran: dict[str, str] = {}

    def _fa4(self, q: Tensor, k: Tensor) -> bool:
        use = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] >= FA4_MIN_WORK
        self.ran[f"B{q.shape[0]} H{q.shape[2]} q{q.shape[1]} k{k.shape[1]} d{q.shape[3]}"] = \
            "flash-attn-4" if use else "cuDNN"
        return use

    def plain(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return fa4_attention(q, k, v) if self._fa4(q, k) else sdpa_attention(q, k, v)

    def lse(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return fa4_attention_lse(q, k, v) if self._fa4(q, k) else cudnn_attention_lse(q, k, v)


BACKENDS: dict[str, tuple[AttentionFn, Callable]] = {
    "fa4": (fa4_attention, fa4_attention_lse),
    "flash": (flash_attention, flash_attention_lse),
    "sdpa": (sdpa_attention, sdpa_attention_lse),
    "math": (math_attention, math_attention_lse),
}


def pick_backend(device: torch.device | str, dtype: torch.dtype, requested: str = "auto") -> str:
    """Choose a backend once; a requested one that cannot run here is an error, not a fallback."""
    device = torch.device(device)
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown attention backend {requested!r}; choose from "
                             f"auto, {', '.join(BACKENDS)}")
        if requested == "flash" and (device.type != "cuda" or _flash_module() is None):
            raise ValueError("attention backend 'flash' needs CUDA and the flash-attn package (FA3 or FA2, "
                             "built from source); use 'fa4' (pip install 'paradit[gpu]') or 'sdpa' instead")
        if requested == "fa4" and (device.type != "cuda" or not fa4_available()):
            raise ValueError("attention backend 'fa4' needs CUDA and the flash-attn-4 package "
                             "(pip install 'paradit[gpu]', i.e. flash-attn-4[cu13]==4.0.0b36); use 'sdpa' instead")
        if requested in ("fa4", "flash") and dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"attention backend {requested!r} runs in bf16/fp16 only, not {dtype}; "
                             "use 'sdpa' for this dtype")
        return requested
    if device.type == "cuda":
        half = dtype in (torch.float16, torch.bfloat16)
        if half and fa4_available() and torch.cuda.get_device_capability(device)[0] in (9, 10):
            return "auto"   # per shape: flash-attn-4 or cuDNN (PerShape)
        if half and _flash_module() is not None:
            return "flash"
        return "sdpa"
    # On CPU SDPA has no LSE output; plain SDPA is used where no LSE is needed.
    return "sdpa" if device.type == "cpu" else "math"


def describe_backend(name: str, device: torch.device | str) -> str:
    device = torch.device(device)
    if name == "auto":
        return (f"per shape: flash-attn-4 (CuTe DSL) where batch x heads x queries x keys >= {FA4_MIN_WORK:.0e}, "
                "else cuDNN; both with log-sum-exp for Ring")
    if name == "fa4":
        return "flash-attn-4 (CuTe DSL)"
    if name == "flash":
        return f"flash-attn ({'FA3' if _flash_module() == 'flash_attn_interface' else 'FA2'})"
    if name == "sdpa" and device.type != "cuda":
        return "torch SDPA (CPU flash kernel, with log-sum-exp for Ring)"
    if name == "sdpa":
        return ("torch SDPA (torch picks the kernel); log-sum-exp for Ring from cuDNN (bf16/fp16) or "
                "the efficient kernel (fp32)")
    return "math (matmul + logsumexp)"


def kernels(name: str, device: torch.device | str) -> tuple[AttentionFn, Callable]:
    """(attention, attention_with_lse) for a backend name on a device; `auto` (what pick_backend
    resolves to on Hopper/Blackwell with flash-attn-4) is one PerShape's pair."""
    if name == "auto":
        per_shape = PerShape()
        return per_shape.plain, per_shape.lse
    plain, with_lse = BACKENDS[name]
    if name == "sdpa" and torch.device(device).type == "cpu":
        with_lse = sdpa_cpu_attention_lse  # the efficient-attention LSE op is CUDA-only
    return plain, with_lse

"""The Wan 2.x diffusion transformer, single-device, written as the math (the original Wan code's
wan/modules/model.py, and diffusers' transformer_wan.py).

Parallelism is applied from outside (paradit.parallel.parallelize):
  * every self-attention calls `self.attn_fn(q, k, v)`, the seam a parallel layout rebinds;
  * `forward_tokens` runs on patch tokens, so a caller may pass a contiguous slice of the token
    sequence (its shard) together with the slice's offset; everything except self-attention is
    per-token, and the RoPE table is sliced to the shard here.
Parameter names follow the original Wan layout; paradit.models.loading maps diffusers' names.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from paradit.config import WanConfig
from paradit.models.attention import AttentionFn, sdpa_attention
from paradit.models.elementwise import FP32LayerNorm, addcmul_into, linear_gelu

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- patches
def patchify(x: Tensor, patch: tuple[int, int, int]) -> Tensor:
    """(B, C, F, H, W) -> (B, L, pt*ph*pw*C), tokens in (f, h, w) row-major order, channel fastest."""
    b, c, f, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)          # (B, F', H', W', pt, ph, pw, C)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(tokens: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """Inverse of patchify: (B, L, pt*ph*pw*C) -> (B, C, F, H, W)."""
    b = tokens.shape[0]
    (gf, gh, gw), (pt, ph, pw) = grid, patch
    x = tokens.reshape(b, gf, gh, gw, pt, ph, pw, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)          # (B, C, F', pt, H', ph, W', pw)
    return x.reshape(b, -1, gf * pt, gh * ph, gw * pw)


def token_grid(shape: tuple[int, ...], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Patch grid (F', H', W') of a latent whose last three dims are (F, H, W)."""
    f, h, w = shape[-3:]
    if f % patch[0] or h % patch[1] or w % patch[2]:
        raise ValueError(f"latent grid {(f, h, w)} is not divisible by the patch size {patch}")
    return f // patch[0], h // patch[1], w // patch[2]


# ----------------------------------------------------------------------------- embeddings
def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[cos | sin] of t * 10000^(-j/(dim/2)), computed in fp32 as diffusers does. t: any shape."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs                      # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)
    return emb.reshape(*t.shape, dim)


@lru_cache(maxsize=32)
def _rope_table_cpu(grid: tuple[int, int, int], head_dim: int) -> tuple[Tensor, Tensor]:
    """cos and sin, each (L, head_dim // 2), for the 3D RoPE of a patch grid, computed in fp64."""
    d_hw = 2 * (head_dim // 6)
    parts = (head_dim - 2 * d_hw, d_hw, d_hw)                  # frame / height / width dims
    angles = []
    for axis, (n, d) in enumerate(zip(grid, parts)):
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
        a = torch.arange(n, dtype=torch.float64)[:, None] * inv                     # (n, d/2)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        angles.append(a.reshape(shape).expand(*grid, d // 2))
    ang = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # (L, head_dim/2)
    return ang.cos().float(), ang.sin().float()


@lru_cache(maxsize=32)
def _rope_slice(grid: tuple[int, int, int], head_dim: int, start: int, end: int, device: str):
    """Rows [start, end) as apply_rope reads them, each (end - start, head_dim): dims 2i and 2i+1
    hold angle i's cos, cos and -sin, +sin."""
    cos, sin = (t[start:end] for t in _rope_table_cpu(grid, head_dim))   # (L, D/2) each
    cos2 = cos.repeat_interleave(2, dim=-1)                                 # (L, D)
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)                    # (L, D)
    return cos2.to(device), sin2.to(device)


def rope_table(grid, head_dim: int, start: int, end: int, device) -> tuple[Tensor, Tensor]:
    """This shard's RoPE rows, cached per device: a static shape per plan, copied to the GPU once."""
    return _rope_slice(tuple(grid), head_dim, start, end, str(device))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as complex numbers. x (B, S, H, D); cos/sin (S, D)
    from rope_table, so that out = x * cos + swap(x) * sin, swap exchanging each pair's two values.

    The products run in fp32 (cos/sin are fp32) and are rounded once, into x's dtype, as they are
    stored: no fp32 copy of x. Three contiguous passes (the swap, one fp32 product, one addcmul
    into the output) move 18 bytes per bf16 element; diffusers' `x1 * cos - x2 * sin` per half
    is eight, four of them strided, ~36.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)    # (B, S, H, D): (x[2i+1], x[2i]), a copy
    rotated = x * cos[:, None]                                 # (B, S, H, D) fp32
    return addcmul_into(torch.empty_like(x), rotated, swapped, sin[:, None])


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMSNorm over the whole hidden dim (before the split into heads): x / rms(x) * weight.

    torch's rms_norm: one fused kernel on CUDA with fp32 statistics (as diffusers' Wan uses it);
    written out in eager ops it cost four extra passes over q and k per attention.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm. Self-attention applies RoPE and calls `attn_fn`."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attn_fn: AttentionFn = sdpa_attention

    def forward(self, x: Tensor, context: Tensor | None = None, rope=None) -> Tensor:
        b, s, d = x.shape
        kv_in = x if context is None else context
        q = self.norm_q(self.q(x)).view(b, s, self.num_heads, -1)                     # (B, S, H, Dh)
        k = self.norm_k(self.k(kv_in)).view(b, kv_in.shape[1], self.num_heads, -1)    # (B, Skv, H, Dh)
        v = self.v(kv_in).view(b, kv_in.shape[1], self.num_heads, -1)
        if context is None:  # self-attention: RoPE, then the (possibly parallel) seam
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out = self.attn_fn(q, k, v)
        else:                # cross-attention: text is small and replicated, always local
            out = sdpa_attention(q, k, v)
        return self.o(out.reshape(b, s, d))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.modulation = nn.Parameter(torch.randn(1, 6, d).mul_(d**-0.5))  # in place: no dynamo import on meta
        self.norm1 = FP32LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(d, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope) -> Tensor:
        # e0: (B, 1 or L, 6, D); the six modulation vectors, each (B, 1 or L, D), in fp32 (the table
        # upcast, not e0: one pass over a per-token e0, which promotes as it is added)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unbind(-2)
        # 1. self-attention on the modulated, normalised stream; the gated residual in fp32, rounded
        #    once into the stream's dtype (paradit.models.elementwise: one kernel each)
        h = self.norm1.modulated(x, shift1, scale1)
        x = addcmul_into(torch.empty_like(x), x, self.self_attn(h, rope=rope), gate1)
        # 2. cross-attention to the text (no gate)
        x = x + self.cross_attn(self.norm3(x), context=context)
        # 3. feed-forward (ffn[1], the GELU, runs inside linear_gelu: in the GEMM's epilogue on CUDA)
        h = self.norm2.modulated(x, shift2, scale2)
        return addcmul_into(torch.empty_like(x), x, self.ffn[2](linear_gelu(self.ffn[0], h)), gate2)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.modulation = nn.Parameter(torch.randn(1, 2, d).mul_(d**-0.5))
        self.norm = FP32LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, math.prod(cfg.patch) * cfg.out_channels)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # e: (B, 1 or L, D)
        shift, scale = (self.modulation.float() + e.unsqueeze(-2)).unbind(-2)
        return self.head(self.norm.modulated(x, shift, scale))


# ----------------------------------------------------------------------------- the model
class WanTransformer(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """x (B, C_in, F, H, W), t (B,) or (B, L), context (B, S, text_dim) -> (B, C_out, F, H, W)."""
        grid = token_grid(x.shape, self.cfg.patch)
        out = self.forward_tokens(patchify(x, self.cfg.patch), t, context, grid)
        return unpatchify(out, grid, self.cfg.patch)

    def forward_tokens(self, patches: Tensor, t: Tensor, context: Tensor,
                       grid: tuple[int, int, int], offset: int = 0) -> Tensor:
        """Run on patch tokens [offset, offset + L) of a `grid`.

        patches (B, L, pt*ph*pw*C_in); t (B,) or (B, L) for per-token timesteps;
        returns (B, L, pt*ph*pw*C_out), channel fastest (the layout of patchify).
        """
        b, n, _ = patches.shape
        x = self.embed_patches(patches)                                       # (B, L, D)
        e, e0 = self.time_embed(t.reshape(b, -1))                            # (B, 1|L, D), (B, 1|L, 6, D)
        context = self.text_embedding(context.to(x.dtype))                   # (B, S, D)
        rope = rope_table(grid, self.cfg.head_dim, offset, offset + n, x.device)
        for block in self.blocks:
            x = block(x, e0, context, rope)
        return self.head(x, e)

    def embed_patches(self, patches: Tensor) -> Tensor:
        """The stride = kernel Conv3d as the linear map it is on (pt, ph, pw, C)-ordered patches."""
        w = self.patch_embedding.weight                                      # (D, C, pt, ph, pw)
        w = w.permute(0, 2, 3, 4, 1).reshape(w.shape[0], -1)                 # (D, pt*ph*pw*C)
        return F.linear(patches.to(w.dtype), w, self.patch_embedding.bias)

    def time_embed(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t (B, 1 or L) -> e (B, 1|L, D) for the head and e0 (B, 1|L, 6, D) for the blocks."""
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim).to(dtype))
        e0 = self.time_projection(e).unflatten(-1, (6, -1))
        return e, e0

    def set_attention(self, fn: AttentionFn) -> None:
        """Bind the self-attention seam of every block (parallelize uses this)."""
        for block in self.blocks:
            block.self_attn.attn_fn = fn

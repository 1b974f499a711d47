"""One Wan expert in numbers: parameters, FLOPs of a forward, working sets.

Pure Python, no torch; the formulas are those of paradit.plan.costs' docstring.
"""
from __future__ import annotations

import math

from paradit.config import WanConfig
from paradit.plan.hardware import GB

TEXT_ENCODER_PARAMS = 5.7e9          # umT5-XXL encoder, held in bf16



def param_count(m: WanConfig) -> int:
    """Parameters of one expert (blocks, embeddings, head), from the architecture."""
    parts = param_parts(m)
    return m.num_layers * parts["block"] + parts["embed"] + parts["head"]


def param_parts(m: WanConfig) -> dict[str, int]:
    """Parameters of one block, of the embeddings (patch, text, time) and of the head."""
    d, f, p = m.dim, m.ffn_dim, math.prod(m.patch)
    attn = 4 * (d * d + d) + 2 * d                   # q, k, v, o with bias; RMSNorm q, k
    block = 2 * attn + 2 * f * d + f + d + 6 * d     # self + cross attn, FFN, modulation
    block += 2 * d if m.cross_attn_norm else 0       # affine LayerNorm before cross-attn
    embed = (m.in_channels * p * d + d                # patch embedding
             + m.text_dim * d + d + d * d + d         # text embedding
             + m.freq_dim * d + d + d * d + d         # time embedding
             + 6 * d * d + 6 * d)                     # time projection
    head = 2 * d + d * m.out_channels * p + m.out_channels * p
    return {"block": block, "embed": embed, "head": head}


def forward_flops(m: WanConfig, tokens: int) -> dict[str, float]:
    """FLOPs of one forward (batch 1) of one expert over the whole sequence."""
    d, f, n, t, p = m.dim, m.ffn_dim, m.num_layers, m.text_len, math.prod(m.patch)
    per_token = n * (2 * (4 * d * d + 2 * d * f) + 2 * 2 * d * d) \
        + 2 * d * p * (m.in_channels + m.out_channels)             # patch embedding, head
    per_forward = n * t * 2 * 2 * d * d \
        + t * 2 * (m.text_dim * d + d * d) \
        + 2 * (m.freq_dim * d + d * d + 6 * d * d)                 # text kv, text / time MLPs
    return {"linear": float(tokens * per_token + per_forward),
            "attention": float(n * (4 * tokens * tokens * d + 4 * tokens * t * d))}


def activation_gb(m: WanConfig, local_tokens: int, batch: int, ring: bool) -> float:
    """Working set of one block on one rank (bf16 tensors, fp32 residual stream)."""
    d, f = m.dim, m.ffn_dim
    # attention phase: normed input, q/k/v, their all-to-all copies, output; ring adds two
    # in-flight K/V blocks (8 D) and the fp32 partial output for the LSE merge (4 D)
    attention = 16 * d + (12 * d if ring else 0)
    ffn = 8 * d + 4 * f                          # normed input, output, fp32 gate temp; 2 F-wide
    return batch * local_tokens * (4 * d + max(attention, ffn)) / GB


def vae_decode_gb(m: WanConfig, width: int, height: int, frames: int) -> tuple[float, float]:
    """(resident weights, decode working set) of the VAE, an estimate.

    Wan VAEs: weights ~0.5 GB; tiled decoding bounds the conv activations at ~3 GB whatever
    the size. The decoded video is held whole in fp32 on the decoding rank. The tiny test VAE
    has no weights to speak of.
    """
    video = frames * height * width * 3 * 4 / GB
    return (0.0, video) if m.vae == "tiny" else (0.5, 3.0 + video)


def text_encoder_gb(m: WanConfig) -> float:
    """umT5-XXL encoder in bf16 for the real models (text_dim 4096); the tiny one is negligible."""
    return TEXT_ENCODER_PARAMS * 2 / GB if m.text_dim == 4096 else 0.0

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


# The Wan VAEs as diffusers' AutoencoderKLWan builds them: parameters (held in bf16 on a GPU), and the
# channels per output pixel of the decoder's last conv and of the encoder's first (after the Wan2.2
# VAE's 2x2 patch), which set a call's working set. tests/test_planner.py checks them against diffusers.
VAE_SHAPES = {"wan2.1": {"params": 126_892_531, "decode_channels": 96, "encode_channels": 96},
              "wan2.2": {"params": 704_688_668, "decode_channels": 64, "encode_channels": 40}}
# bytes per pixel and channel of one bf16 VAE call on CUDA: paradit.models.vae_memory.work_bytes (48 per
# channel, a third of it fp32: 48 x (2 x 2 + 4) / 3)
VAE_WORK_BYTES = 128.0


def vae_gb(m: WanConfig, width: int, height: int, frames: int, image_frames: int = 0) -> dict[str, float]:
    """GB of the VAE on a GPU: its bf16 weights, the whole-latent decode's working set (one decoder
    call at the top level plus the decoded frames held twice, as paradit.models.vae_memory.decode_bytes
    estimates it), and the encode of `image_frames` frames (I2V: the whole video; TI2V: one). The
    tiny and demo codecs are negligible."""
    shape = VAE_SHAPES.get(m.vae)
    if shape is None:
        return {"weights": 0.0, "decode": 0.0, "encode": 0.0}
    pixels = width * height

    def call(channels: int, out_frames: int) -> float:
        return (VAE_WORK_BYTES * channels * pixels + 2 * 3 * out_frames * pixels * 2) / GB
    return {"weights": shape["params"] * 2 / GB, "decode": call(shape["decode_channels"], frames),
            "encode": call(shape["encode_channels"], image_frames) if image_frames else 0.0}


BLEND_PX = 64   # paradit.models.vae.BLEND_PX: the overlap of a spread decode's column tiles


def decode_share(width: int, decoders: int) -> float:
    """The share of the video's pixels each of `decoders` ranks decodes: a column tile of width / N
    pixels and the blend (720p: 0.55 on 2, 0.30 on 4, 0.175 on 8)."""
    return min(1.0, (width / decoders + BLEND_PX) / width) if decoders > 1 else 1.0


def image_frames(m: WanConfig, frames: int) -> int:
    """Frames the VAE encodes for a request's image condition: I2V the first frame and zeros after it,
    TI2V the first frame alone, text-to-video none."""
    return {"i2v": frames, "ti2v": 1}.get(m.task, 0)


def text_encoder_gb(m: WanConfig) -> float:
    """umT5-XXL encoder in bf16 for the real models (text_dim 4096); the tiny one is negligible."""
    return TEXT_ENCODER_PARAMS * 2 / GB if m.text_dim == 4096 else 0.0

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


# The Wan VAEs as diffusers' AutoencoderKLWan builds them: parameters (held in bf16 on a GPU); the
# encoder's channels per input pixel (conv_in's, after the Wan2.2 VAE's 2x2 patch), which set an encode's
# working set; the spatial compression (pixels per latent pixel along a side); and the decoder's shape
# in the numbers that set a decoder call's peak (decoder_call_bytes): cache_channels (the channels whose
# last 2 frames its causal convolutions keep, summed over its levels, each weighted by its pixels per
# latent pixel), top_channels (the widest convolution input at its last level) and top_scale (that
# level's pixels per latent pixel: 8 x 8 for both, the Wan2.2 decoder's output being 2x2-patched).
# paradit.models.vae_memory.decoder_shape reads them off a module; tests/test_vae_memory.py checks these
# against diffusers'.
VAE_SHAPES = {"wan2.1": {"params": 126_892_531, "ratio": 8, "cache_channels": 75_664, "top_channels": 96,
                         "top_scale": 64, "encode_channels": 96},
              "wan2.2": {"params": 704_688_668, "ratio": 16, "cache_channels": 228_400, "top_channels": 512,
                         "top_scale": 64, "encode_channels": 40}}
# bytes per pixel and channel of one bf16 VAE encode on CUDA: paradit.models.vae_memory.work_bytes (48 per
# channel, a third of it fp32: 48 x (2 x 2 + 4) / 3)
VAE_WORK_BYTES = 128.0
# A decoder call (one latent frame after the first: 4 frames at its last level) peaks at its last level:
# every causal convolution's 2-frame cache, and about 7 tensors of the widest 4-frame size there. Counted
# on the real decoders (tests/test_vae_memory.py: the live tensors of a decode on the meta device, which
# bench/vae.py's measured CUDA peak matches: 9.76 GB for Wan2.1 at 720p x 81): Wan2.1's peak is in its
# last RMS norm (the 96-channel input, two fp32 copies, two convolution outputs: 7.4), Wan2.2's in its
# last block's first convolution (the 512-channel input, diffusers' copy of it for a shortcut that block
# does not have, the activation, the cache-extended and the padded inputs at 1.5 each, the shortcut: 6.7)
TOP_COPIES, TOP_FRAMES, CACHE_FRAMES = 7, 4, 2


def decoder_call_bytes(shape: dict, latent_pixels: int, itemsize: int) -> float:
    """Peak bytes of one decoder call on a latent of `latent_pixels` pixels, weights aside (the
    allocator's peak on CUDA: within 1% of the counted tensors in bf16, +3.5% in fp32)."""
    per_pixel = (CACHE_FRAMES * shape["cache_channels"]
                 + TOP_COPIES * TOP_FRAMES * shape["top_channels"] * shape["top_scale"])
    return per_pixel * latent_pixels * itemsize


def vae_gb(m: WanConfig, width: int, height: int, image_frames: int = 0) -> dict[str, float]:
    """GB of the VAE on a GPU: its bf16 weights, the whole-latent decode's working set (one decoder
    call's peak, decoder_call_bytes: the CLI hands each call's frames to the mp4 encoder, so no decoded
    video is held; paradit.models.vae_memory.decode_bytes adds it for a decode that returns the video),
    and the encode of `image_frames` frames (I2V: the whole video; TI2V: one). The tiny and demo codecs
    are negligible."""
    shape = VAE_SHAPES.get(m.vae)
    if shape is None:
        return {"weights": 0.0, "decode": 0.0, "encode": 0.0}
    pixels = width * height
    decode = decoder_call_bytes(shape, pixels / shape["ratio"] ** 2, 2)
    encode = (VAE_WORK_BYTES * shape["encode_channels"] * pixels + 2 * 3 * image_frames * pixels * 2) / GB
    return {"weights": shape["params"] * 2 / GB, "decode": decode / GB, "encode": encode if image_frames else 0.0}


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

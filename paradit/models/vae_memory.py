"""The VAE's memory estimates of one call, whole: paradit.models.vae plans its decode tiles with them
(tiles_bytes, plan_tiles there), and the planner's model shares the decoder's formula
(paradit.plan.model.decoder_call_bytes, on the shape decoder_shape reads off the module)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from paradit.plan.model import decoder_call_bytes

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

# Activation bytes per pixel and per top-level channel of one VAE call on CPU, where conv3d unfolds its
# input (vol2col): the peak RSS of fp32 decodes was 59 KB per pixel for Wan2.1 (96 top channels) and 71 KB
# for Wan2.2 (64 per pixel), so up to 280 per channel in fp32 (x 4 bytes). On CUDA an encode's is an
# estimate from the encoder's tensors (48); a decode's is counted from the decoder's shape (decoder_shape).
WORK_PER_PIXEL = {"cuda": 48.0, "cpu": 280.0}


def work_bytes(channels: float, pixels: int, dtype: torch.dtype, device_type: str) -> float:
    """One VAE call's working set: a third of it fp32 whatever the dtype (norms, upsamples)."""
    return WORK_PER_PIXEL.get(device_type, WORK_PER_PIXEL["cpu"]) * channels * pixels * (2 * dtype.itemsize + 4) / 3


def decoder_shape(vae: AutoencoderKLWan) -> dict:
    """The decoder's numbers paradit.plan.model.decoder_call_bytes takes (VAE_SHAPES there): the channels
    every causal convolution with a temporal kernel caches 2 frames of, weighted by its level's pixels per
    latent pixel (each up block that upsamples quadruples them after it), the widest convolution input at
    the last level, and that level's pixels per latent pixel."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    dec = vae.decoder

    def cached(module) -> list:
        return [m.in_channels for m in module.modules() if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1]
    scale, cache = 1, sum(cached(dec.conv_in) + cached(dec.mid_block))
    for block in dec.up_blocks:
        cache += scale * sum(cached(block))
        if any(isinstance(m, WanResample) and m.mode.startswith("upsample") for m in block.modules()):
            scale *= 4
    cache += scale * sum(cached(dec.conv_out))
    return {"cache_channels": cache, "top_channels": max(cached(dec.up_blocks[-1]) + cached(dec.conv_out)),
            "top_scale": scale}


def video_bytes(vae: AutoencoderKLWan, lat_hw: tuple[int, int], frames: int, dtype: torch.dtype) -> int:
    """The decoded video of a latent of lat_hw over `frames` latent frames, in the VAE's dtype."""
    pixels = lat_hw[0] * lat_hw[1] * vae.spatial_compression_ratio ** 2
    return 3 * (1 + 4 * (frames - 1)) * pixels * dtype.itemsize


def decode_bytes(vae: AutoencoderKLWan, lat_hw: tuple[int, int], frames: int, dtype: torch.dtype,
                 device_type: str = "cuda") -> int:
    """Estimated peak bytes of decoding a latent of lat_hw over `frames` latent frames whole, weights
    aside: one decoder call's peak (on CUDA the counted tensors, decoder_call_bytes; on CPU the vol2col
    calibration, per channel of conv_out's input per pixel) with the decoded video held beside it (the
    runs of frames so far: a decode handing them over as they come, the CLI's, holds one run instead)."""
    if device_type == "cuda":
        call = decoder_call_bytes(decoder_shape(vae), lat_hw[0] * lat_hw[1], dtype.itemsize)
    else:
        ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
        call = work_bytes(vae.decoder.conv_out.in_channels / patch ** 2, lat_hw[0] * lat_hw[1] * ratio ** 2, dtype,
                          device_type)
    return int(call + video_bytes(vae, lat_hw, frames, dtype))


def encode_bytes(vae: AutoencoderKLWan, hw: tuple[int, int], frames: int, dtype: torch.dtype,
                 device_type: str = "cuda") -> int:
    """Estimated peak bytes of encoding `frames` frames of hw pixels whole: one encoder call's working
    set at its top level (conv_in's output channels per pixel) and the input video (and its copy)."""
    patch = vae.config.patch_size or 1
    work = work_bytes(vae.encoder.conv_in.out_channels / patch ** 2, hw[0] * hw[1], dtype, device_type)
    return int(work + 2 * 3 * frames * hw[0] * hw[1] * dtype.itemsize)

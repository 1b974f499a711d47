"""The VAE's memory estimates of one call, whole: paradit.models.vae plans its decode tiles with them
(tiles_bytes, plan_tiles there), and the planner's model mirrors them (paradit.plan.model)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

# Activation bytes per pixel and per top-level channel of one VAE call (4 frames, 2 cached, the fp32
# norms and upsamples): on CUDA an estimate from the decoder's tensors (the GPU benchmark,
# bench/vae.py, prints it against the measured peak); on CPU, conv3d unfolds its input (vol2col):
# the peak RSS of fp32 decodes was 59 KB per pixel for Wan2.1 (96 top channels) and 71 KB for
# Wan2.2 (64 per pixel), so up to 280 per channel in fp32 (x 4 bytes).
WORK_PER_PIXEL = {"cuda": 48.0, "cpu": 280.0}


def work_bytes(channels: float, pixels: int, dtype: torch.dtype, device_type: str) -> float:
    """One VAE call's working set: a third of it fp32 whatever the dtype (norms, upsamples)."""
    return WORK_PER_PIXEL.get(device_type, WORK_PER_PIXEL["cpu"]) * channels * pixels * (2 * dtype.itemsize + 4) / 3


def decode_bytes(vae: AutoencoderKLWan, lat_hw: tuple[int, int], frames: int, dtype: torch.dtype,
                 device_type: str = "cuda") -> int:
    """Estimated peak bytes of decoding a latent of lat_hw over `frames` latent frames, weights aside:
    one decoder call's working set at its top level (conv_out's input channels, per output pixel
    after unpatchify), plus the decoded frames held twice (the list and its concatenation)."""
    ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
    pixels = lat_hw[0] * lat_hw[1] * ratio ** 2
    out_frames = 1 + 4 * (frames - 1)
    work = work_bytes(vae.decoder.conv_out.in_channels / patch ** 2, pixels, dtype, device_type)
    return int(work + 2 * 3 * out_frames * pixels * dtype.itemsize)


def encode_bytes(vae: AutoencoderKLWan, hw: tuple[int, int], frames: int, dtype: torch.dtype,
                 device_type: str = "cuda") -> int:
    """Estimated peak bytes of encoding `frames` frames of hw pixels whole: one encoder call's working
    set at its top level (conv_in's output channels per pixel) and the input video (and its copy)."""
    patch = vae.config.patch_size or 1
    work = work_bytes(vae.encoder.conv_in.out_channels / patch ** 2, hw[0] * hw[1], dtype, device_type)
    return int(work + 2 * 3 * frames * hw[0] * hw[1] * dtype.itemsize)

"""A lossless video codec in the VAE's place for the demo model: time-to-depth, normalised.

Wan's DiT knows positions only through RoPE, which is relative, and generation starts from i.i.d.
noise, so a tiny DiT cannot tell which way time runs: trained on moving shapes with latent frames
of one video frame each, it learns the axis of the motion but draws it forwards or backwards at
random. This codec folds time into channels instead, as a VAE with temporal stride 8 would: latent
frame k holds 8 consecutive video frames (the last one starts 8 frames before the end, so a clip
of 8k + 1 frames gives k + 1 latent frames, the last two overlapping in all but one frame), each
frame as RGB channels. The order of the frames is then the order of the channels, which every
token sees. Values are shifted and scaled per colour channel to about zero mean and unit variance
over the demo data (data.py), as Wan's VAE latents are. decode(encode(v)) == v exactly.

Same interface as paradit.models.vae.VideoVAE: decode(latent (C, F_lat, H, W) fp32) -> uint8
(F, H, W, 3); encode(uint8 (F, H, W, 3)) -> latent.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

# per-RGB mean and std of x = pixel / 127.5 - 1 over the demo clips (data.make_batch, seed 0, 4096 clips)
MEAN = (-0.713, -0.714, -0.657)
STD = (0.343, 0.327, 0.328)


class TimeToDepthCodec:
    def __init__(self, window: int = 8, mean=MEAN, std=STD, device="cpu"):
        self.window, self.device = window, torch.device(device)
        self.mean = torch.tensor(mean).repeat(window).view(-1, 1, 1, 1)   # (window*3, 1, 1, 1)
        self.std = torch.tensor(std).repeat(window).view(-1, 1, 1, 1)

    @property
    def z_dim(self) -> int:
        return 3 * self.window

    def starts(self, frames: int) -> list[int]:
        """First video frame of each latent frame."""
        if frames < self.window + 1 or (frames - 1) % self.window:
            raise ValueError(f"frames={frames}: this codec takes {self.window}k + 1 frames, k >= 1")
        n = (frames - 1) // self.window + 1
        return [min(k * self.window, frames - self.window) for k in range(n)]

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        """uint8 (..., F, H, W, 3) -> fp32 latent (..., window*3, F_lat, H, W); channels (frame, rgb)."""
        x = frames.float() / 127.5 - 1                                       # (..., F, H, W, 3)
        groups = [x[..., s:s + self.window, :, :, :] for s in self.starts(x.shape[-4])]
        z = torch.stack(groups, dim=-5)                                      # (..., F_lat, window, H, W, 3)
        z = z.movedim(-1, -3).flatten(-5 + 1, -3)                            # (..., F_lat, window*3, H, W)
        return (z.movedim(-4, -3) - self.mean) / self.std                    # (..., C, F_lat, H, W)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """fp32 latent (..., C, F_lat, H, W) -> uint8 (..., F, H, W, 3); each frame from the first
        latent frame that holds it."""
        x = latent.float().cpu() * self.std + self.mean                      # (..., C, F_lat, H, W)
        n = x.shape[-3]
        frames = self.window * (n - 1) + 1
        x = x.movedim(-3, -4).unflatten(-3, (self.window, 3))               # (..., F_lat, window, 3, H, W)
        out, have = [], 0
        for k, s in enumerate(self.starts(frames)):
            out.append(x[..., k, have - s:, :, :, :])                        # frames have .. s + window - 1
            have = s + self.window
        x = torch.cat(out, dim=-4)                                           # (..., F, 3, H, W)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.movedim(-3, -1)                                             # (..., F, H, W, 3)

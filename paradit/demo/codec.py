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

With `space` s > 1 each latent pixel also holds an s x s block of pixels (space-to-depth, as a VAE's
spatial stride): the 64x64x33 demo (preset demo64) uses s = 2, so a clip is (96, 5, 32, 32) and its
DiT sees 1280 tokens rather than 5120, which keeps `make demo` on a CPU in budget. Channels are
ordered (frame, block row, block column, rgb): the order of the frames is still the channels' order.

Same interface as paradit.models.vae.VideoVAE: decode(latent (C, F_lat, H, W) fp32) -> uint8
(F, H, W, 3); encode(uint8 (F, H, W, 3)) -> latent.

`writable`, when set (paradit.demo.demo_components does for demo64), is applied to a latent before
it is decoded: the part of it the model cannot write is the sampler's initial noise, demo64's
background grain (paradit/demo/writable.py). The codec itself stays lossless.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

# per-RGB mean and std of x = pixel / 127.5 - 1 over the demo clips (data.make_batch, seed 0, 4096 clips)
MEAN = (-0.713, -0.714, -0.657)
STD = (0.343, 0.327, 0.328)
# the same over demo64's clips (data.DEMO64, seed 0, 512 clips): more background, so darker and flatter
MEAN64 = (-0.781, -0.784, -0.722)
STD64 = (0.205, 0.184, 0.188)


class TimeToDepthCodec:
    def __init__(self, window: int = 8, mean=MEAN, std=STD, device="cpu", space: int = 1):
        self.window, self.space, self.device = window, space, torch.device(device)
        per = window * space * space                                       # RGB triples per latent pixel
        self.mean = torch.tensor(mean).repeat(per).view(-1, 1, 1, 1)      # (z_dim, 1, 1, 1)
        self.std = torch.tensor(std).repeat(per).view(-1, 1, 1, 1)
        self.writable = None                # a WritableSpace to project latents onto before decoding

    @classmethod
    def for_config(cls, cfg, device="cpu") -> "TimeToDepthCodec":
        """The codec of a demo preset: window and space from its vae_stride, statistics of its data."""
        st, sh, _ = cfg.vae_stride
        mean, std = (MEAN64, STD64) if sh > 1 else (MEAN, STD)
        return cls(st, mean, std, device, space=sh)

    @property
    def z_dim(self) -> int:
        return 3 * self.window * self.space * self.space

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
        if self.space > 1:
            z = self._fold(z)                                                 # (..., F_lat, C, H/s, W/s)
        return (z.movedim(-4, -3) - self.mean.to(z.device)) / self.std.to(z.device)  # (..., C, F_lat, H', W')

    def _fold(self, z: Tensor) -> Tensor:
        """(..., F_lat, window*3, H, W) -> (..., F_lat, window*s*s*3, H/s, W/s), channels (frame, i, j, rgb)."""
        s, (h, w) = self.space, z.shape[-2:]
        if h % s or w % s:
            raise ValueError(f"frames of {w}x{h} pixels: this codec takes sizes divisible by {s}")
        z = z.unflatten(-3, (self.window, 3)).unflatten(-1, (w // s, s)).unflatten(-3, (h // s, s))
        # (..., F_lat, window, 3, H/s, s, W/s, s) -> (..., F_lat, window, s, s, 3, H/s, W/s)
        z = z.permute(*range(z.dim() - 6), -6, -3, -1, -5, -4, -2)
        return z.flatten(-6, -3)

    def _unfold(self, x: Tensor) -> Tensor:
        """The inverse of _fold: (..., F_lat, C, H', W') -> (..., F_lat, window*3, H' s, W' s)."""
        s, (h, w) = self.space, x.shape[-2:]
        x = x.unflatten(-3, (self.window, s, s, 3))                          # (..., F_lat, window, s, s, 3, H', W')
        x = x.permute(*range(x.dim() - 6), -6, -3, -2, -5, -1, -4)           # (..., window, 3, H', s, W', s)
        return x.reshape(*x.shape[:-6], self.window * 3, h * s, w * s)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """fp32 latent (..., C, F_lat, H, W) -> uint8 (..., F, H, W, 3); each frame from the first
        latent frame that holds it; `writable` (when set) projects the latent first."""
        if self.writable is not None:
            latent = self.writable(latent)
        x = latent.float().cpu() * self.std + self.mean                      # (..., C, F_lat, H', W')
        n = x.shape[-3]
        frames = self.window * (n - 1) + 1
        x = x.movedim(-3, -4)                                                 # (..., F_lat, C, H', W')
        if self.space > 1:
            x = self._unfold(x)                                               # (..., F_lat, window*3, H, W)
        x = x.unflatten(-3, (self.window, 3))                                # (..., F_lat, window, 3, H, W)
        out, have = [], 0
        for k, s in enumerate(self.starts(frames)):
            out.append(x[..., k, have - s:, :, :, :])                        # frames have .. s + window - 1
            have = s + self.window
        x = torch.cat(out, dim=-4)                                           # (..., F, 3, H, W)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.movedim(-3, -1)                                             # (..., F, H, W, 3)

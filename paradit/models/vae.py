"""The video VAE: diffusers' AutoencoderKLWan behind the pipeline's small interface."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan


class VideoVAE:
    def __init__(self, vae: AutoencoderKLWan, device="cpu", dtype=torch.float32, tiling: bool = False):
        self.vae = vae.eval().requires_grad_(False).to(device)
        if dtype != torch.float32:  # diffusers warns on a .to(dtype) that is a no-op
            self.vae.to(dtype)
        self.device, self.dtype = torch.device(device), dtype
        c = vae.config
        self.mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        self.std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)
        if tiling:
            self.vae.enable_tiling()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (C, F, H, W), normalised -> uint8 frames (F', H', W', 3)."""
        z = latent[None].float() * self.std + self.mean                    # un-normalise
        video = self.vae.decode(z.to(self.device, self.dtype), return_dict=False)[0][0]  # (3, F', H', W')
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return video.permute(1, 2, 3, 0).cpu()

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (F, H, W, 3) -> normalised latent (C, F', H', W') fp32 (distribution mode)."""
        x = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1            # (1, 3, F, H, W)
        z = self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mode().float().cpu()
        return ((z - self.mean) / self.std)[0]

    @classmethod
    def tiny(cls, z_dim: int = 16, seed: int = 0, device="cpu") -> "VideoVAE":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True])
        return cls(vae, device)

"""paradit/demo/writable.py: demo64's decode keeps what the model can write and drops the initial
noise the sampler leaves in the rest (the background grain)."""
from __future__ import annotations

import pytest
import torch

from paradit.config import WanConfig
from paradit.demo.judge import background
from paradit.demo.writable import WritableSpace
from paradit.models.transformer import patchify, token_grid, unpatchify
from paradit.settings import VideoSettings


def test_projection_keeps_the_column_space_and_drops_the_rest():
    """Random head (P = 12 > D = 5): a latent the head can write comes back unchanged, noise outside
    its column space becomes the background, and projecting twice changes nothing."""
    gen = torch.Generator().manual_seed(0)
    weight, patch, shape = torch.randn(12, 5, generator=gen), (1, 2, 2), (3, 2, 4, 6)
    bg = torch.randn(12, generator=gen)
    space = WritableSpace(weight, patch, bg)
    grid, n = token_grid(shape, patch), 2 * 2 * 3
    written = bg + torch.randn(2, n, 5, generator=gen) @ weight.T             # (B, L, P) in the space
    latent = unpatchify(written, grid, patch)                                  # (B, C, F, H, W)
    assert torch.allclose(space(latent), latent, atol=1e-5)
    q, _ = torch.linalg.qr(weight, mode="complete")
    noise = unpatchify(torch.randn(2, n, 7, generator=gen) @ q[:, 5:].T, grid, patch)   # outside it
    assert torch.allclose(space(latent + noise), latent, atol=1e-5)
    assert noise.abs().mean() > 0.3
    assert torch.allclose(space(space(latent + noise)), space(latent + noise), atol=1e-5)


@pytest.fixture(scope="module")
def demo64():
    from paradit.pipeline import Pipeline
    return Pipeline.from_pretrained("demo64")


def test_demo64_decodes_without_the_noise_its_head_cannot_write(demo64):
    """The raw latent's part outside the low-noise expert's column space is the seed's initial noise
    (the sampler never changes it); demo64's decode drops it: the background's median distance from
    its colour falls from ~25 RGB units to a few. The 16x16 demo's head writes everything: no
    projection there."""
    from paradit.demo import demo_components
    assert demo_components(WanConfig.preset("demo"), "cpu")[2].writable is None
    codec, space = demo64.vae, demo64.vae.writable
    kw = dict(width=32, height=32, frames=9, steps=6, seed=4)
    latent = demo64("a green circle moving down slowly", output="latent", progress=False, **kw)
    noise = demo64.denoiser.initial_noise(VideoSettings.resolve(demo64.cfg, **kw))
    q, _ = torch.linalg.qr(demo64.experts[1].head.head.weight.double(), mode="complete")
    outside = q[:, 192:].float()                                               # (384, 192)

    def part(x):
        return patchify(x[None], demo64.cfg.patch)[0] @ outside               # (L, 192)
    assert (part(latent) - part(noise)).norm() < 0.05 * part(noise).norm()
    codec.writable = None
    try:
        raw = codec.decode(latent).float()
    finally:
        codec.writable = space
    clean = codec.decode(latent).float()
    grain = [float((v - background(v.to(torch.uint8))).norm(dim=-1).median()) for v in (raw, clean)]
    assert grain[0] > 18 and grain[1] < 6, grain

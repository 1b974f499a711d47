"""Tiny local checkpoints and images, and the functions that spawned ranks run, for
test_checkpoint.py and test_conditioning.py (module-level, so that spawn can import them).

Everything is built here from seeded random weights: no download. A checkpoint folder holds the
diffusers layout (model_index.json, transformer/ and transformer_2/ sharded with an index,
text_encoder/ + tokenizer/ saved with save_pretrained, vae/, scheduler/) and, under original/,
the same experts in the original Wan layout.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from paradit.checkpoint import save_diffusers_layout
from paradit.config import WanConfig
from paradit.models.loading import save_original_layout
from paradit.parallel import init_parallel
from paradit.pipeline import Pipeline, tiny_components
from paradit.plan import ParallelConfig

PROMPT, NEGATIVE = "a red circle moving left", "blurry"
# Checkpoints carry no text_len: Wan's 512 is what from_pretrained uses, so the tiny T2V model has it too.
TINY_T2V = WanConfig.preset("tiny").replace(text_len=512)
TINY_I2V = WanConfig.preset("tiny").replace(in_channels=36, task="i2v", boundary=0.9, shift=5.0,
                                            guidance=(3.5, 3.0))
TINY_TI2V = WanConfig.preset("tiny").replace(in_channels=48, out_channels=48, z_dim=48, vae="wan2.2",
                                             vae_stride=(4, 16, 16), task="ti2v", boundary=None,
                                             guidance=(5.0, 5.0), shift=5.0)
TILE = {16: (32, 24), 48: (64, 48)}   # small VAE tiles (pixels) so that tiny videos are decoded in tiles
SPREAD_CASES = ((16, (5, 8)), (48, (5, 7)))  # latent (H, W): 2 x 3 tiles of 4 (stride 3), the last ragged
GIVEN_TILES = {16: (32, 40, 24, 32), 48: (64, 80, 48, 64)}  # (size_h, size_w, stride_h, stride_w): 2 x 2 tiles
RUN = dict(negative_prompt=NEGATIVE, frames=9, steps=4, seed=7, progress=False)
SIZE = {"t2v": dict(width=80, height=48), "i2v": dict(width=80, height=48), "ti2v": dict(width=96, height=64)}


def small_tiles(vae) -> None:
    size, stride = TILE[vae.z_dim]
    vae.vae.enable_tiling(size, size, stride, stride)


def components(cfg: WanConfig, seed: int = 0):
    return tiny_components(cfg, "cpu", torch.float32, seed)


def write_checkpoint(root: Path, cfg: WanConfig = TINY_T2V, seed: int = 0, shard_bytes: int = 20_000) -> Path:
    """The tiny model's components as a diffusers-layout folder, plus root/original/ in the original layout."""
    from diffusers import UniPCMultistepScheduler

    experts, text, vae = components(cfg, seed)
    dirs = ("transformer", "transformer_2")[:len(experts)]
    for model, name in zip(experts, dirs):
        save_diffusers_layout(model, root / name, max_shard_bytes=shard_bytes)
    for model, name in zip(experts, ("high_noise_model", "low_noise_model")):
        save_original_layout(model, root / "original" / name)
    text.model.save_pretrained(root / "text_encoder")
    text.tokenizer.save_pretrained(root / "tokenizer")
    vae.vae.save_pretrained(root / "vae")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                            flow_shift=cfg.shift).save_pretrained(root / "scheduler")
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.35.0", "boundary_ratio": cfg.boundary,
             "expand_timesteps": cfg.task == "ti2v",
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if len(experts) == 2 else [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return root


def sample_image(width: int = 100, height: int = 70):
    """A deterministic RGB image: colour ramps and a bright square."""
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = torch.stack([x, y, 1 - x * y])
    rgb[:, height // 4:height // 2, width // 3:width // 2] = 1.0
    return Image.fromarray((rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def _mesh(layout):
    return init_parallel(ParallelConfig(**layout), num_heads=2) if layout else None


# ----------------------------------------------------------------------------- spawned ranks
def checkpoint_ranks(root: str, layout: dict):
    """From each layout of the checkpoint: the final latent (and, for diffusers, the video), then a
    load with one expert per rank for the bytes-read check."""
    import torch.distributed as dist

    out = {}
    for name, kw in (("diffusers", {}), ("original", dict(components=root))):
        path = root if name == "diffusers" else str(Path(root) / "original")
        pipe = Pipeline.from_pretrained(path, parallel=ParallelConfig(**layout), **kw)
        out[name] = pipe(PROMPT, output="latent", **SIZE["t2v"], **RUN)
        if name == "diffusers":
            if pipe.vae is not None:
                small_tiles(pipe.vae)
            out["video"] = pipe.decode(out[name])  # tiles spread over the output rank's sp group
            out["has"] = dict(text_encoder=pipe.text_encoder is not None, vae=pipe.vae is not None)
    rank = dist.get_rank()
    lean = Pipeline.from_pretrained(root, parallel=ParallelConfig(**layout), experts_needed={rank % 2})
    out["needed"] = rank % 2
    out["stats"] = {k: dict(v, names=sorted(v.get("names", []))) for k, v in lean.load_stats.items()}
    out["loaded"] = [m is not None for m in lean.experts]
    out["startup"] = dict(lean.startup)
    return out


def conditioned(kind: str, layout: dict | None, image=None, video: bool = False):
    """The tiny I2V or TI2V pipeline (in memory) on the sample image, under a layout: the final
    latent and, if asked, the video decoded in small tiles (spread over the decode group)."""
    cfg = {"i2v": TINY_I2V, "ti2v": TINY_TI2V}[kind]
    pipe = Pipeline(cfg, *components(cfg), mesh=_mesh(layout))
    image = sample_image() if image is None else image
    latent = pipe(PROMPT, image=image, output="latent", **SIZE[kind], **RUN)
    if not video:
        return latent, None
    small_tiles(pipe.vae)
    return latent, pipe.decode(latent)


def conditioning_ranks(layout: dict):
    out = {"i2v": conditioned("i2v", layout, video=True), "ti2v": conditioned("ti2v", layout)}
    out["spread"] = spread_decodes()
    return out


def spread_decodes():
    """The VAE decode spread over the whole world, and paradit's single-rank tiled decode, on rank 0:
    with the module's fixed tiles, with given Tiles, and with the tiles planned for the world."""
    import torch.distributed as dist

    import paradit.models.vae as vae_module
    from paradit.models.vae import Tiles, VideoVAE, tiled_decode
    from paradit.parallel.vae import spread_decode, spread_tiled_decode

    world, first = dist.group.WORLD, dist.get_rank() == 0
    res = {}
    for z, hw in SPREAD_CASES:
        vae = VideoVAE.tiny(z, tile=TILE[z])
        latent = torch.randn(z, 2, *hw, generator=torch.Generator().manual_seed(z))
        raw = vae.to_model_space(latent)
        tiles = Tiles(*GIVEN_TILES[z])
        res[z] = dict(spread=spread_tiled_decode(vae.vae, raw, world),
                      frames=spread_decode(vae, latent, world),
                      ref=tiled_decode(vae.vae, raw) if first else None,
                      given=spread_tiled_decode(vae.vae, raw, world, tiles),
                      given_ref=tiled_decode(vae.vae, raw, tiles) if first else None)
    blend = vae_module.BLEND_PX
    vae_module.BLEND_PX = 16   # so that a tiny latent (8 x 16) is cut into world-size tiles
    try:
        vae = VideoVAE.tiny(16)
        latent = torch.randn(16, 2, 8, 16, generator=torch.Generator().manual_seed(1))
        raw = vae.to_model_space(latent)
        tiles = vae.decode_plan(raw, pieces=dist.get_world_size(), budget=float("inf"))
        res["planned"] = dict(tiles=tiles, frames=spread_decode(vae, latent, world),
                              ref=vae.to_frames(tiled_decode(vae.vae, raw, tiles)) if first else None)
    finally:
        vae_module.BLEND_PX = blend
    return res


def read_once_ranks(root: str):
    """Loads of the checkpoint with the once-per-node read: every expert on every rank (ulysses 2 x cfg 2,
    read_once=True), and one expert per rank (PARADIT_READ_ONCE=1, through from_pretrained); each
    rank's experts compared with a plain load, and its bytes read and received."""
    import os

    import torch.distributed as dist

    from paradit.checkpoint import locate
    from paradit.models.loading import load_transformer

    rank, layout = dist.get_rank(), ParallelConfig(ulysses=2, cfg=2)
    plain = [load_transformer(folder) for folder in locate(root).experts]
    pipes = {"all": Pipeline.from_pretrained(root, parallel=layout, read_once=True)}
    os.environ["PARADIT_READ_ONCE"] = "1"
    try:
        pipes["split"] = Pipeline.from_pretrained(root, parallel=layout, experts_needed={rank % 2})
    finally:
        del os.environ["PARADIT_READ_ONCE"]
    out = {}
    for case, pipe in pipes.items():
        same = [all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
                and list(m.state_dict()) == list(ref.state_dict()) for m, ref in zip(pipe.experts, plain) if m]
        out[case] = dict(same=same, loaded=[m is not None for m in pipe.experts],
                         stats={k: (v["bytes"], v.get("received_bytes", 0)) for k, v in pipe.load_stats.items()
                                if k.startswith("transformer")})
    return out

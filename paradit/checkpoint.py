"""Pipeline checkpoints: a diffusers-layout folder (model_index.json, transformer/ = high-noise
expert, transformer_2/ = low-noise expert, text_encoder/, tokenizer/, vae/), or an original-layout
folder (high_noise_model/, low_noise_model/) whose text encoder and VAE come from a diffusers folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from paradit.config import WanConfig
from paradit.models.loading import CheckpointError, config_from_checkpoint, index_checkpoint, load_transformer

EXPERT_DIRS = {"diffusers": ("transformer", "transformer_2"), "original": ("high_noise_model", "low_noise_model")}


def expert_folders(path: str | Path) -> list[Path]:
    """The transformer folder(s) of a checkpoint, high-noise expert first."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--model {path}: not a preset name and not a checkpoint folder "
                              f"(presets: {', '.join(WanConfig.names())})")
    for high, low in EXPERT_DIRS.values():
        if (path / high).is_dir():
            return [path / high] + ([path / low] if (path / low).is_dir() else [])
    if (path / "config.json").exists() and any(path.glob("*.safetensors*")):
        return [path]  # a bare transformer folder
    raise CheckpointError(f"{path} is not a Wan checkpoint: expected model_index.json with transformer/ "
                          f"(and transformer_2/), or high_noise_model/ and low_noise_model/")


def model_config(path: str | Path) -> WanConfig:
    """The architecture and sampling defaults of a checkpoint, read from its configs only (cheap)."""
    path = Path(path)
    folders = expert_folders(path)
    cfg = config_from_checkpoint(index_checkpoint(folders[0]))
    index_file = path / "model_index.json"
    boundary = json.loads(index_file.read_text()).get("boundary_ratio") if index_file.exists() else None
    if len(folders) == 2:
        cfg = cfg.replace(boundary=boundary or cfg.boundary or 0.875)
    else:
        cfg = cfg.replace(boundary=None)
    text_cfg = path / "text_encoder" / "config.json"
    if text_cfg.exists():
        cfg = cfg.replace(text_dim=json.loads(text_cfg.read_text())["d_model"])
    return cfg


def load_pipeline_components(cls, path, parallel, info, dtype, backend):
    """Build a Pipeline from a checkpoint folder; the layout is validated before weights are read."""
    from paradit.models.text_encoder import TextEncoder
    from paradit.models.vae import VideoVAE
    from paradit.parallel.mesh import init_parallel

    path = Path(path)
    cfg = model_config(path)
    mesh = init_parallel(parallel, info.device, num_heads=cfg.num_heads)
    dtype = dtype or (torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    experts = [load_transformer(f, dtype=dtype, device=info.device, config=cfg) for f in expert_folders(path)]
    for part in ("text_encoder", "tokenizer", "vae"):
        if not (path / part).is_dir():
            raise CheckpointError(f"{path} has no {part}/ folder; a pipeline checkpoint needs "
                                  f"text_encoder/, tokenizer/ and vae/ in the diffusers layout")
    text = TextEncoder.from_pretrained(path / "text_encoder", path / "tokenizer", cfg.text_len,
                                       dtype=dtype, device=info.device)
    from diffusers import AutoencoderKLWan
    vae = VideoVAE(AutoencoderKLWan.from_pretrained(path / "vae", torch_dtype=torch.float32), info.device,
                   tiling=info.device.type == "cuda")
    return cls(cfg, experts, text, vae, mesh=mesh, backend=backend)

"""One rank's components (Components), and the presets' builders. paradit.runspec.build_components
builds them from a BuildSpec under its mesh, presets here and checkpoints in paradit.checkpoint,
alike; nothing here knows the facade: Pipeline.from_spec takes the Components and builds itself.

Presets that bring their weights are registered by name in PRESET_BUILDERS ("module:function",
imported when used), so that no layer imports the demo model to know that it exists.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from paradit.config import WanConfig
from paradit.events import phase
from paradit.models.lora import apply_loras, check_loras, for_expert
from paradit.models.text_encoder import TextEncoder
from paradit.models.transformer import WanTransformer
from paradit.models.vae import VideoVAE

# preset name -> "module:function(cfg, device, dtype, seed, needed)" returning (experts, text encoder, codec)
PRESET_BUILDERS = {"tiny": "paradit.components:tiny_components", "demo": "paradit.demo:demo_components",
                   "demo64": "paradit.demo:demo_components"}


@dataclass
class Components:
    """What one rank built: its experts (None where it never runs one), text encoder and VAE (None
    where it needs none), and how the build went (phase seconds, bytes read per component)."""
    cfg: WanConfig
    experts: list
    text_encoder: object
    vae: object
    startup: dict[str, float] = field(default_factory=dict)
    load_stats: dict[str, dict] = field(default_factory=dict)


def preset_components(spec, mesh) -> Components:
    """A preset built locally (random weights, or the shipped demo model), LoRAs merged."""
    cfg, startup = spec.cfg, {}
    timings = startup if spec.loras else None   # LoRA figures only where there are LoRAs
    with phase("lora_check", timings):
        lora_files = check_loras(spec.loras, cfg)
    module, name = PRESET_BUILDERS[spec.model].split(":")
    needed = None if spec.experts_needed is None else set(spec.experts_needed)
    experts, text, vae = getattr(importlib.import_module(module), name)(
        cfg, mesh.device, spec.dtype or torch.float32, spec.seed, needed)
    with phase("lora_merge", timings):
        for k, expert in enumerate(experts):
            if expert is not None:
                apply_loras(expert, for_expert(lora_files, k, cfg.num_experts))
    return Components(cfg, experts, text, vae, startup)


def tiny_components(cfg: WanConfig, device, dtype, seed: int = 0, needed: set[int] | None = None):
    """Seeded random experts, a tiny umT5 and a tiny Wan VAE: identical on every rank.
    Experts not in `needed` are not built (None)."""
    experts = []
    for k in range(cfg.num_experts):
        if needed is not None and k not in needed:
            experts.append(None)
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            experts.append(WanTransformer(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False))
    text = TextEncoder.tiny(cfg.text_dim, cfg.text_len, seed=seed, device=device)
    vae = VideoVAE.tiny(cfg.z_dim, seed=seed, device=device)
    return experts, text, vae


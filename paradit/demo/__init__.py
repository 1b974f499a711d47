"""The demo model: a tiny Wan-architecture text-to-video model trained on moving coloured shapes.

Its weights ship in the package (paradit/assets/demo, written by `python scripts/train_demo.py`);
`Pipeline.from_pretrained("demo")` loads them through `demo_components` (registered in
paradit.components.PRESET_BUILDERS). See docs/demo-model.md.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, load_model

from paradit.config import WanConfig
from paradit.demo.codec import TimeToDepthCodec
from paradit.demo.data import BACKGROUND
from paradit.demo.writable import WritableSpace
from paradit.models.transformer import WanTransformer

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


def demo_components(cfg: WanConfig, device, dtype=None, seed: int = 0, needed=None, assets: Path | None = None):
    """([high-noise expert, low-noise expert], text encoder, codec) with the shipped weights, fp32
    (the signature of paradit.components.PRESET_BUILDERS; the weights are the shipped ones, whatever
    dtype, seed and needed say, and both experts are built); a preset's weights are in
    paradit/assets/<preset name> unless `assets` says where."""
    assets = assets or ASSETS.parent / cfg.name
    missing = [f for f in ("high.safetensors", "low.safetensors", "text_encoder.safetensors")
               if not (assets / f).is_file()]
    if missing:
        raise FileNotFoundError(f"demo model weights {', '.join(missing)} not found in {assets}; "
                                f"reinstall paradit, or rebuild them: python scripts/train_demo.py --preset {cfg.name} "
                                f"--out {assets}")
    experts = []
    for name in ("high", "low"):
        with torch.device("meta"):
            m = WanTransformer(cfg)
        m.load_state_dict(load_file(assets / f"{name}.safetensors"), assign=True)
        experts.append(m.to(device).eval().requires_grad_(False))
    # imported here: the CLI's vocabulary check (paradit.demo.data) runs this package's imports before
    # the input is valid, and the text encoder's are transformers' (seconds)
    from paradit.models.text_encoder import TextEncoder
    text = TextEncoder.tiny(cfg.text_dim, cfg.text_len, device=device)   # the architecture; weights next
    load_model(text.model, str(assets / "text_encoder.safetensors"))
    return experts, text, decode_writable(TimeToDepthCodec.for_config(cfg, device=device), experts)


def decode_writable(codec: TimeToDepthCodec, experts) -> TimeToDepthCodec:
    """`codec`, made to decode only what the low-noise expert (the last of `experts`, which takes
    the last steps) can write: demo64's head writes half of each token's latent, and the other half
    would decode as grain (paradit/demo/writable.py). Nothing changes for a head that writes it all."""
    codec.writable = WritableSpace.for_expert(experts[-1], codec, BACKGROUND)
    return codec

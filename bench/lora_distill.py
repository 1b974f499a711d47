"""Random LoRAs of a preset's real shapes, for timing the step-distilled recipe.

    python bench/lora_distill.py --out /tmp/distill                  # Wan2.2 T2V-A14B, rank 64
    python bench/lora_distill.py --preset tiny --rank 4 --out /tmp/d  # the same at the tiny preset (CPU test)

Writes high_noise.safetensors and low_noise.safetensors in the layout LightX2V's Wan2.2 4-step
LoRAs are published in (original Wan names, diffusion_model.<module>.lora_down.weight /
.lora_up.weight / .alpha, and .diff_b bias deltas): a LoRA of rank --rank on every attention
linear (self and cross: q, k, v, o) and both FFN linears of every block, seeded, --dtype (bf16).
Each file is checked against the preset with paradit's own LoRA check. Then it prints the two runs
to time on a random-weight checkpoint of the preset's architecture, the 40-step guided baseline and
the distilled one:

    python -m paradit.generate --model CKPT --size 1280x720 --frames 81 --out base.mp4
    python -m paradit.generate --model CKPT --size 1280x720 --frames 81 --steps 4 --guidance 1 \\
        --sampler euler --shift 5 --lora-high DIR/high_noise.safetensors --lora-low DIR/low_noise.safetensors \\
        --out distill.mp4

Their JSON sidecars (timings_s) hold what each phase took, LoRA check and merge included
(startup.lora_check_s, startup.lora_merge_s). Random weights: the timings are real, the videos are noise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]   # the repository root

from paradit.config import WanConfig  # noqa: E402
from paradit.models.lora import LoraSpec, check_loras, model_shapes  # noqa: E402

ATTENTION = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"]
FFN = ["ffn.0", "ffn.2"]


def lora_tensors(cfg: WanConfig, rank: int, alpha: float, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA on every attention and FFN linear, kohya names, with bias deltas."""
    g = torch.Generator().manual_seed(seed)
    shapes = model_shapes(cfg)
    out = {}
    for i in range(cfg.num_layers):
        for module in ATTENTION + FFN:
            name = f"blocks.{i}.{module}"
            n_out, n_in = shapes[name + ".weight"]
            key = "diffusion_model." + name
            out[key + ".lora_down.weight"] = (torch.randn(rank, n_in, generator=g) / n_in ** 0.5).to(dtype)
            out[key + ".lora_up.weight"] = (torch.randn(n_out, rank, generator=g) * 1e-3).to(dtype)
            out[key + ".alpha"] = torch.tensor(alpha, dtype=dtype)
            out[key + ".diff_b"] = (torch.randn(n_out, generator=g) * 1e-3).to(dtype)
    return out


def write(cfg: WanConfig, folder: Path, rank: int, dtype: torch.dtype, seed: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    experts = ("high_noise", "low_noise") if cfg.num_experts == 2 else ("lora",)
    for k, name in enumerate(experts):
        path = folder / f"{name}.safetensors"
        tensors = lora_tensors(cfg, rank, float(rank), dtype, seed + k)
        save_file(tensors, path, metadata={"rank": str(rank), "preset": cfg.name, "note": "random, for timing"})
        files[name] = dict(path=str(path), tensors=len(tensors), bytes=path.stat().st_size)
    targets = ("high", "low") if cfg.num_experts == 2 else ("all",)
    checked = check_loras([LoraSpec(f["path"], 1.0, t) for f, t in zip(files.values(), targets)], cfg)
    for f, lf in zip(files.values(), checked):
        f["weights_changed"] = len(lf.patches)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan2.2-t2v-a14b", help="architecture whose shapes the LoRAs take")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for the LoRA files")
    args = ap.parse_args(argv)
    cfg = WanConfig.preset(args.preset)
    files = write(cfg, Path(args.out), args.rank, getattr(torch, args.dtype), args.seed)
    (Path(args.out) / "loras.json").write_text(json.dumps(dict(preset=cfg.name, rank=args.rank, dtype=args.dtype,
                                                                 files=files), indent=1))
    for name, f in files.items():
        print(f"wrote {f['path']}: {f['tensors']} tensors, {f['bytes'] / 1e6:.1f} MB, "
              f"changes {f['weights_changed']} weights")
    if cfg.num_experts == 2:
        w, h = cfg.size
        base = f"python -m paradit.generate --model CKPT --size {w}x{h} --frames {cfg.frames}"
        print("time these on a random-weight checkpoint CKPT of this architecture:\n"
              f"  {base} --out base.mp4\n"
              f"  {base} --steps 4 --guidance 1 --sampler euler --shift 5 "
              f"--lora-high {files['high_noise']['path']} --lora-low {files['low_noise']['path']} --out distill.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(main())

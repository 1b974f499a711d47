"""A full-size random-weight pipeline folder of any preset, in diffusers layout (bench/e2e.py's first
step, and the folder bench/cache.py and bench/vae.py read).

    write_checkpoint("wan2.2-t2v-a14b", Path("/dev/shm/a14b"), torch.device("cuda"))

model_index.json, transformer/ (and transformer_2/ for two experts) in 5 GB shards with an index, an
umT5-XXL-shaped text_encoder/ (the tiny presets: a tiny umT5), a word-level tokenizer/, the model kind's
VAE (Wan2.1's for 16 latent channels, Wan2.2's for TI2V) and a scheduler/. Weights are random (bf16 for
the transformers and the text encoder, fp32 for the VAE), drawn on the given device and scaled as a
default init would (unit-scale activations), so that a random-weight run does the same work as a trained
one. model_index.json is written last: a folder that has it is complete, and is reused.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from paradit.checkpoint import to_diffusers_name  # noqa: E402
from paradit.config import WanConfig  # noqa: E402
from paradit.models.transformer import WanTransformer  # noqa: E402

SHARD_BYTES = 5 * 2**30
# umT5-XXL as Wan ships it (google/umt5-xxl's encoder): 5.7B parameters
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6)
# diffusers' AutoencoderKLWan configs: Wan2.1 (z 16) is the class default; Wan2.2's (z 48, TI2V-5B):
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 attn_scales=[], temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                 out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)


def random_like(name: str, shape: tuple[int, ...], dtype, device, gen) -> torch.Tensor:
    """A default init's scale: weights ~ U(-1, 1)/sqrt(fan_in) in std, norms 1, biases 0; embeddings
    and modulation tables N(0, 1)/sqrt(dim)."""
    if len(shape) == 1:
        return (torch.ones if name.endswith("weight") and "norm" in name else torch.zeros)(
            shape, dtype=dtype, device=device)
    fan_in = math.prod(shape[1:]) if "shared" not in name and "embed_tokens" not in name else 1
    if "scale_shift_table" in name or "relative_attention_bias" in name:
        fan_in = shape[-1]
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(1 / math.sqrt(3 * fan_in))
    return t.to(dtype)


def write_shards(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], folder: Path, prefix: str, device,
                 seed: int) -> int:
    """Random tensors of the given shapes, drawn on device, written as safetensors shards with an index."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    groups, size = [[]], 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = (f"{prefix}.safetensors" if len(groups) == 1
                else f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors")
        shard = {n: random_like(n, *tensors[n], device, gen).cpu() for n in names}
        save_file(shard, folder / file)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(names, file))
        del shard
    if len(groups) > 1:
        (folder / f"{prefix}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def write_transformer(cfg: WanConfig, folder: Path, device, seed: int) -> int:
    from paradit.checkpoint import save_diffusers_layout

    with torch.device("meta"):
        model = WanTransformer(cfg)
    save_diffusers_layout(model, folder, config_only=True)
    shapes = {to_diffusers_name(n): (tuple(p.shape), torch.bfloat16) for n, p in model.state_dict().items()}
    return write_shards(shapes, folder, "diffusion_pytorch_model", device, seed)


def write_text_encoder(cfg: WanConfig, root: Path, device, seed: int) -> int:
    from transformers import UMT5Config, UMT5EncoderModel

    from paradit.models.text_encoder import word_tokenizer

    tokenizer = word_tokenizer()
    kw = UMT5_XXL if cfg.text_dim == UMT5_XXL["d_model"] else dict(
        vocab_size=len(tokenizer), d_model=cfg.text_dim, d_kv=8, d_ff=2 * cfg.text_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu")
    config = UMT5Config(**kw, dropout_rate=0.0)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    config.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    shapes = {n: (tuple(p.shape), torch.bfloat16) for n, p in model.state_dict().items()
              if n != "encoder.embed_tokens.weight" or not config.tie_word_embeddings}
    return write_shards(shapes, root / "text_encoder", "model", device, seed)


def write_vae(cfg: WanConfig, folder: Path) -> int:
    from diffusers import AutoencoderKLWan

    from paradit.models.vae import VideoVAE

    if cfg.vae == "wan2.1":
        vae = AutoencoderKLWan()
    elif cfg.vae == "wan2.2":
        vae = AutoencoderKLWan(**WAN22_VAE)
    else:  # the tiny presets' VAE
        vae = VideoVAE.tiny(cfg.z_dim).vae
    vae.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in vae.parameters())


def write_checkpoint(preset: str, root: Path, device, seed: int = 0) -> dict:
    """The preset's full-size pipeline folder, diffusers layout; returns bytes and seconds per part."""
    from diffusers import UniPCMultistepScheduler

    cfg = WanConfig.preset(preset)
    done = root / "model_index.json"
    if done.exists():
        return {"reused": True}
    root.mkdir(parents=True, exist_ok=True)
    report = {}
    experts = ("transformer", "transformer_2")[:cfg.num_experts]
    for k, name in enumerate(experts):
        t0 = time.perf_counter()
        report[name] = {"bytes": write_transformer(cfg, root / name, device, seed + k), "s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    report["text_encoder"] = {"bytes": write_text_encoder(cfg, root, device, seed + 7), "s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    report["vae"] = {"bytes": write_vae(cfg, root / "vae"), "s": time.perf_counter() - t0}
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                            flow_shift=cfg.shift).save_pretrained(root / "scheduler")
    pipeline = "WanImageToVideoPipeline" if cfg.task == "i2v" else "WanPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": "0.35.0", "boundary_ratio": cfg.boundary,
             "expand_timesteps": cfg.task == "ti2v", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"] if cfg.num_experts == 2 else [None, None],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    done.write_text(json.dumps(index, indent=1))  # last: its presence means the folder is complete
    return report

"""diffusers' WanPipeline on a pipeline folder, phase by phase, as bench/e2e.py's peer (its subprocess).

    python bench/e2e_diffusers.py --folder /dev/shm/a14b --size 1280x720 --frames 81 --steps 3 --out d.json

Phases, each device-synchronised: start-up (WanPipeline.from_pretrained in bf16 on a GPU, fp32 on a
CPU, then .to(device); the tokenizer loaded by AutoTokenizer), text encoding (encode_prompt, prompt
and negative prompt), denoise (the pipeline's own loop, output_type="latent", on the embeddings;
per-step times from its step-end callback), VAE decode (what WanPipeline.__call__ does after the
loop: un-normalise, vae.decode, postprocess_video to uint8). No video is written: paradit's write
time is reported apart. The VAE is as from_pretrained loads it (torch_dtype for every component,
tiling off): diffusers' default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device):
    sync(device)
    return time.perf_counter()


@torch.no_grad()
def decode(pipe, latents):
    """WanPipeline.__call__'s tail (diffusers 0.35-0.42): latents -> uint8 frames (F, H, W, 3)."""
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device,
                                                                                               latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="np")


def run(folder: Path, width: int, height: int, frames: int, steps: int, prompt: str, negative: str) -> dict:
    from diffusers import WanPipeline
    from transformers import AutoTokenizer

    t_process = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = clock(device)
    # the tokenizer as its own config names it (bench/e2e.py writes a word-level one, not T5's)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    pipe = WanPipeline.from_pretrained(folder, tokenizer=tokenizer, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    startup = clock(device) - t0
    t0 = clock(device)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, negative, do_classifier_free_guidance=True,
                                          device=device)
    text = clock(device) - t0
    steps_at = []
    t0 = clock(device)

    def on_step(pipe_, i, t, kw):
        steps_at.append(clock(device))
        return kw
    latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0 if pipe.transformer_2 else None,
                   output_type="latent", callback_on_step_end=on_step,
                   generator=torch.Generator("cpu").manual_seed(0), return_dict=False)[0]
    denoise = clock(device) - t0
    t1 = clock(device)
    video = decode(pipe, latents)
    decode_s = clock(device) - t1
    step_s = [b - a for a, b in zip([t0, *steps_at[:-1]], steps_at)]
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return dict(library="diffusers", startup_s=startup, text_encoder_s=text, step_s=step_s, denoise_s=denoise,
                vae_decode_s=decode_s, frames_shape=list(video.shape), peak_allocated_gb=peak,
                vae_dtype=str(pipe.vae.dtype), vae_tiling=bool(pipe.vae.use_tiling), device=str(device),
                process_s=time.perf_counter() - t_process)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", required=True, type=Path)
    p.add_argument("--size", required=True, help="WxH")
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--prompt", default="a red circle moving left")
    p.add_argument("--negative-prompt", default="blurry")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    a.out.write_text(json.dumps(run(a.folder, w, h, a.frames, a.steps, a.prompt, a.negative_prompt), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

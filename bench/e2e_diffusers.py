"""diffusers' WanPipeline on a pipeline folder, phase by phase, as bench/e2e.py's peer (its subprocess).

    python bench/e2e_diffusers.py --folder /dev/shm/a14b --size 1280x720 --frames 81 --steps 3 --out d.json

Phases, each device-synchronised: start-up (WanPipeline.from_pretrained in bf16 on a GPU, fp32 on a
CPU, then .to(device); the tokenizer loaded by AutoTokenizer), text encoding (encode_prompt, prompt
and negative prompt), denoise (the pipeline's own loop, output_type="latent", on the embeddings;
per-step times from its step-end callback), VAE decode (what WanPipeline.__call__ does after the
loop: un-normalise, vae.decode, postprocess_video), then writing the mp4 as diffusers' examples do
(diffusers.utils.export_to_video, imageio's ffmpeg writer, at the model's 16 fps). The VAE is as
from_pretrained loads it (torch_dtype for every component, tiling off): diffusers' default. Each
phase's peak GPU memory (allocated and reserved, GB; the peak statistics reset as it starts) lands in
`phases`, as bench/cli_probe.py records paradit's; time_to_video_s counts from the process start, and
imports_s is its part before start-up (the interpreter, torch, diffusers and transformers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]   # the repository root (paradit)


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


class Phases:
    """Seconds and peak GPU memory per phase (the peak statistics reset as each starts)."""

    def __init__(self, device):
        self.device, self.rows = device, {}

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return clock(self.device)

    def end(self, name: str, t0: float) -> float:
        row = self.rows[name] = {"s": clock(self.device) - t0}
        if self.device.type == "cuda":
            row.update(allocated_gb=torch.cuda.max_memory_allocated(self.device) / 1e9,
                       reserved_gb=torch.cuda.max_memory_reserved(self.device) / 1e9)
        return row["s"]


def run(folder: Path, width: int, height: int, frames: int, steps: int, prompt: str, negative: str,
        video_path: Path) -> dict:
    from diffusers import WanPipeline
    from diffusers.utils import export_to_video
    from transformers import AutoTokenizer

    t_process = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    phases = Phases(device)
    t0 = phases.start()
    # the tokenizer as its own config names it (bench/e2e.py writes a word-level one, not T5's)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    pipe = WanPipeline.from_pretrained(folder, tokenizer=tokenizer, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    startup = phases.end("startup", t0)
    t0 = phases.start()
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, negative, do_classifier_free_guidance=True,
                                          device=device)
    text = phases.end("text_encode", t0)
    steps_at = []
    t0 = phases.start()

    def on_step(pipe_, i, t, kw):
        steps_at.append(clock(device))
        return kw
    latents = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=height, width=width, num_frames=frames,
                   num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=3.0 if pipe.transformer_2 else None,
                   output_type="latent", callback_on_step_end=on_step,
                   generator=torch.Generator("cpu").manual_seed(0), return_dict=False)[0]
    denoise = phases.end("denoise", t0)
    t1 = phases.start()
    video = decode(pipe, latents)
    decode_s = phases.end("decode", t1)
    t2 = phases.start()
    export_to_video(list(video[0]), str(video_path), fps=16)
    write_s = phases.end("write", t2)
    step_s = [b - a for a, b in zip([t0, *steps_at[:-1]], steps_at)]
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    from paradit.generate import since_process_start     # after the video: not part of what is timed
    process_s, to_video = time.perf_counter() - t_process, since_process_start()
    return dict(library="diffusers", startup_s=startup, text_encoder_s=text, step_s=step_s, denoise_s=denoise,
                vae_decode_s=decode_s, write_video_s=write_s, frames_shape=list(video.shape), peak_allocated_gb=peak,
                phases=phases.rows, vae_dtype=str(pipe.vae.dtype), vae_tiling=bool(pipe.vae.use_tiling),
                device=str(device), process_s=process_s, time_to_video_s=to_video, mp4_bytes=video_path.stat().st_size,
                imports_s=to_video - process_s if to_video is not None else None)  # interpreter, torch, diffusers


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
    video = a.out.with_suffix(".mp4")
    try:
        a.out.write_text(json.dumps(run(a.folder, w, h, a.frames, a.steps, a.prompt, a.negative_prompt, video),
                                    indent=1))
    finally:
        video.unlink(missing_ok=True)   # a random-weight video is noise; keep the numbers only
    return 0


if __name__ == "__main__":
    sys.exit(main())

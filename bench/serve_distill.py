"""The step-distilled recipe served with per-request LoRAs: N jobs in a row through the HTTP API.

    python bench/serve_distill.py --model /ckpt/Wan2.2-T2V-A14B-Diffusers --size 1280x720 --frames 81
    python bench/serve_distill.py --model tiny-ckpt --size 64x64 --frames 9 --rank 4   # CPU smoke (tests)

Starts `python -m paradit.serve --lora-dir DIR --steps 4 --guidance 1 --shift 5 --sampler euler` (the
server's default request: the 4-step recipe) on the checkpoint, with two random LoRAs of the model's
real shapes in DIR (bench/lora_distill.py: high_noise, low_noise, rank --rank), and posts --jobs jobs
one after another, each listing the two LoRAs ("loras": [{"name": "high_noise", "expert": "high"},
{"name": "low_noise", "expert": "low"}]); the second job on uses --scale-2 for its high-noise LoRA, so
that the second job switches sets and later ones keep it (0 switches if it is 1.0). Writes
bench/results/DATE_HOST_serve_distill.json: the service's start-up (process start to ready), each
job's timings (queued, run, LoRA switch, denoising span) and the wall time from POST to completed.
Random LoRAs: the timings are real, the videos are noise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import httpx  # noqa: E402
import torch  # noqa: E402

PROMPT = "a red fox running through fresh snow, low sun, cinematic"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Wan2.2 A14B checkpoint folder (two experts)")
    p.add_argument("--size", default="1280x720")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--rank", type=int, default=64, help="the random LoRAs' rank")
    p.add_argument("--scale-2", type=float, default=0.9, help="the high-noise LoRA's scale from the second job on")
    p.add_argument("--serve-args", default="", help="more paradit.serve flags, e.g. '--offload text-encoder'")
    p.add_argument("--out", default=None, help="the results JSON (default: bench/results/DATE_HOST_serve_distill.json)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a job may take")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from lora_distill import write

    from paradit.checkpoint import model_config
    from paradit.serve.process import ServerProcess, wait_for
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="paradit-serve-distill-"))
    write(model_config(args.model), work / "loras", args.rank, torch.bfloat16, 0)
    flags = ["--model", args.model, "--lora-dir", str(work / "loras"), "--steps", "4", "--guidance", "1",
             "--shift", "5", "--sampler", "euler", "--max-video-tokens", str(10**9), *args.serve_args.split()]
    t0 = time.time()
    proc = ServerProcess(flags, state_dir=work / "state", ready_timeout_s=1800).launch()
    jobs = []
    with proc, httpx.Client(base_url=proc.wait_ready().url, timeout=60) as client:
        ready_s = time.time() - t0
        for i in range(args.jobs):
            scale = 1.0 if i == 0 else args.scale_2
            body = {"prompt": PROMPT, "size": args.size, "num_frames": args.frames, "seed": i,
                    "loras": [{"name": "high_noise", "scale": scale, "expert": "high"},
                              {"name": "low_noise", "scale": 1.0, "expert": "low"}]}
            t1 = time.time()
            r = client.post("/v1/videos", json=body)
            r.raise_for_status()
            vid = r.json()["id"]
            done = wait_for(lambda: (v := client.get(f"/v1/videos/{vid}").json())["status"] in
                            ("completed", "failed") and v, args.timeout, interval_s=0.2, what=f"job {i}")
            jobs.append({"job": i, "status": done["status"], "error": done["error"], "wall_s": time.time() - t1,
                         "high_noise_scale": scale, "steps": done["num_inference_steps"], "sampler": done["sampler"],
                         "guidance": done["guidance_scale"], "timings": done["timings"]})
            print(f"job {i}: {done['status']} in {jobs[-1]['wall_s']:.1f} s; timings {done['timings']}", flush=True)
        metrics = httpx.get(proc.url + "/metrics").text
    result = {"date": datetime.date.today().isoformat(), "host": socket.gethostname(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "model": args.model, "size": args.size, "frames": args.frames, "rank": args.rank,
              "serve_flags": flags, "ready_s": ready_s, "jobs": jobs,
              "lora_switch_metrics": [line for line in metrics.splitlines()
                                      if line.startswith("paradit_lora_switch_seconds")]}
    gpu = result["gpu"].lower().replace(" ", "-")
    out = Path(args.out or ROOT / "bench" / "results" / f"{result['date']}_{gpu}_serve_distill.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

"""Where a forward's time goes, kernel by kernel: paradit's WanTransformer and diffusers' twin.

    python bench/profile_block.py                       # GPU: A14B shape, 1280x720x81, 2 blocks, bf16
    python bench/profile_block.py --preset tiny --size 256x256 --frames 65      # CPU, fp32

Both models hold the same random weights (bench/peers_measure.py's diffusers_twin) and take the same input.
After two warm-up forwards, torch.profiler records one forward of each; the table lists the kernels
(device time on GPU, CPU time on CPU) summed by name, largest first, and a total per model, so that
a gap between the two libraries (bench/peers.py) can be traced to the kernels that make it.
Results: bench/results/<date>_<machine>_profile.json and the printed tables.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from launcher import code_revision, environment, machine_description, machine_tag, results_path, write_json  # noqa: E402
from peers_measure import diffusers_class, diffusers_twin, latent_call  # noqa: E402
from scaling_measure import build_model, make_inputs  # noqa: E402

from paradit.config import WanConfig  # noqa: E402


def kernel_table(prof, cuda: bool, top: int) -> tuple[list[dict], float]:
    """(rows of name, calls, ms, share), total ms: device kernels on GPU, leaf CPU ops on CPU."""
    events = prof.key_averages()
    if cuda:
        rows = [(e.key, e.count, e.self_device_time_total / 1e3) for e in events if e.self_device_time_total > 0]
    else:
        rows = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in events if e.self_cpu_time_total > 0]
    total = sum(ms for _, _, ms in rows)
    rows.sort(key=lambda r: -r[2])
    return [dict(name=n[:90], calls=c, ms=ms, share=ms / total) for n, c, ms in rows[:top]], total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="model preset (default: wan2.2-t2v-a14b on GPU, tiny on CPU)")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 1280x720 GPU, 256x256 CPU)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", help="results folder (default: bench/results)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    preset = args.preset or ("wan2.2-t2v-a14b" if cuda else "tiny")
    w, h = (int(v) for v in (args.size or ("1280x720" if cuda else "256x256")).split("x"))
    frames = args.frames or (81 if cuda else 65)
    cfg = WanConfig.preset(preset).replace(num_layers=args.layers)
    opts = dict(width=w, height=h, frames=frames, sample_steps=cfg.steps)
    model = build_model(cfg, device, dtype)
    inputs = make_inputs(cfg, opts, device)
    call = latent_call(cfg, inputs, device, dtype)
    twin = diffusers_twin(model, diffusers_class())
    runs = {"paradit": lambda: model(call["x"], call["t"], call["cond"]),
            "diffusers": lambda: twin(hidden_states=call["x"], timestep=call["t"],
                                      encoder_hidden_states=call["cond"], return_dict=False)[0]}
    tag = machine_tag(device.type)
    print(f"profile: {preset} ({args.layers} blocks), {w}x{h}x{frames} ({cfg.num_tokens(w, h, frames)} tokens), "
          f"{dtype}, on {machine_description(device.type)}; paradit at {code_revision()}", flush=True)
    result = dict(what="profile", date=time.strftime("%Y-%m-%d"), machine=tag, environment=environment(),
                  settings=dict(preset=preset, layers=args.layers, width=w, height=h, frames=frames, dtype=str(dtype)),
                  method=__doc__, models={})
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad():
        for name, fn in runs.items():
            for _ in range(2):
                fn()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                fn()
                if cuda:
                    torch.cuda.synchronize()
            rows, total = kernel_table(prof, cuda, args.top)
            result["models"][name] = dict(total_ms=total, kernels=rows)
            print(f"\n{name}: {total:.1f} ms of {'device kernels' if cuda else 'CPU ops'} per forward")
            for r in rows:
                print(f"  {r['ms']:9.2f} ms {100 * r['share']:5.1f}%  x{r['calls']:<4} {r['name']}")
    print(f"\nwrote {write_json(results_path('profile', 'json', args.out, tag), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The VAE decode alone: paradit's modes against diffusers' AutoencoderKLWan, on the same weights.

    python bench/vae.py                           # GPU: Wan2.1's VAE (A14B), latent 16x21x90x160 = 1280x720x81
    python bench/vae.py --worlds 2,4,8            # ... and the decode spread over 2, 4, 8 GPUs
    python bench/vae.py --arch tiny --latent 3x6x8 --repeats 1    # CPU: the whole path, small

Modes (paradit.models.vae.VideoVAE unless said):
  fp32-tiles        fp32, diffusers' fixed 256/192-pixel tiles: what paradit did before (28 tiles at 720p)
  bf16-tiles        the same tiles in bf16
  bf16-auto         the default: bf16, the whole latent when its estimated peak fits in free memory,
                    channels-last on a GPU
  bf16-auto-chunk4  ... 4 latent frames per decoder call after the first (diffusers: 1)
  bf16-auto-cf      ... channels-first (diffusers' layout), not channels-last
  bf16-auto-cudnnb  ... under torch.backends.cudnn.benchmark (its first call, the search, is the warm-up)
  fp32-whole        the reference every error is measured against
  diffusers-bf16    AutoencoderKLWan.decode in bf16, tiling off: what WanPipeline in bf16 does
  diffusers-fp32-tiles  AutoencoderKLWan.decode in fp32 with enable_tiling()
  spread-N          (--worlds) bf16-auto spread over N GPUs (paradit.parallel.vae.spread_decode), rank 0's clock

Each mode: --warmup untimed decodes, then --repeats timed (device-synchronised) ones; min and median.
Peak memory: torch.cuda.max_memory_allocated over the timed calls minus what was allocated before
(weights and latent), next to paradit's estimate (decode_bytes / tiles_bytes). Error against the fp32
whole decode: relative L2 of the [-1, 1] video, and the mean and max difference of the uint8 frames.
Writes bench/results/<date>_<machine>_vae.json (--out to choose).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, root
from launcher import environment, has_cuda, rank_device, results_path, run_world, sync, write_json  # noqa: E402

from paradit.models.vae import VideoVAE, decode_bytes, tiles_bytes  # noqa: E402

PARADIT_MODES = {  # name: (dtype, VideoVAE keywords, cudnn benchmark)
    "fp32-tiles": (torch.float32, dict(tiling=True), False),
    "bf16-tiles": (torch.bfloat16, dict(tiling=True), False),
    "bf16-auto": (torch.bfloat16, {}, False),
    "bf16-auto-chunk4": (torch.bfloat16, dict(chunk=4), False),
    "bf16-auto-cf": (torch.bfloat16, dict(channels_last=False), False),
    "bf16-auto-cudnnb": (torch.bfloat16, {}, True),
    "fp32-whole": (torch.float32, dict(tiling=False), False),
}
DIFFUSERS_MODES = {"diffusers-bf16": (torch.bfloat16, False), "diffusers-fp32-tiles": (torch.float32, True)}


def build_module(arch: str, seed: int, folder: str | None):
    """The fp32 AutoencoderKLWan every mode copies: from --folder, else seeded random (diffusers' init)."""
    from diffusers import AutoencoderKLWan

    from random_checkpoint import WAN22_VAE

    if folder:
        path = Path(folder)
        return AutoencoderKLWan.from_pretrained(path / "vae" if (path / "vae").is_dir() else path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "tiny":
            return VideoVAE.tiny(16).vae
        return AutoencoderKLWan(**(WAN22_VAE if arch == "wan2.2" else {}))


def make_vae(module, device, dtype, **kw) -> VideoVAE:
    copy = type(module).from_config(module.config)
    copy.load_state_dict(module.state_dict())
    return VideoVAE(copy, device, dtype, **kw)


def timed(fn, device, warmup: int, repeats: int) -> tuple[dict, object]:
    """fn() after `warmup` untimed calls, `repeats` times: seconds (min, median, all) and peak memory."""
    for _ in range(warmup):
        out = fn()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    row = dict(min_s=min(times), median_s=statistics.median(times), times_s=times)
    if device.type == "cuda":
        row["peak_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
    return row, out


def errors(video: torch.Tensor, ref: torch.Tensor) -> dict:
    """video and ref (1, 3, F, H, W) in [-1, 1], on the CPU."""
    v, r = video.double(), ref.double()
    frames, ref_frames = VideoVAE.to_frames(video).int(), VideoVAE.to_frames(ref).int()
    return dict(rel_err=((v - r).norm() / r.norm()).item(), uint8_mean_abs=(frames - ref_frames).abs().float().mean().item(),
                uint8_max_abs=(frames - ref_frames).abs().max().item())


def paradit_row(module, latent, device, name, args) -> tuple[dict, torch.Tensor]:
    dtype, kw, cudnn_benchmark = PARADIT_MODES[name]
    vae = make_vae(module, device, dtype, **kw)
    z = vae.to_model_space(latent)
    tiles = vae.decode_plan(z)
    flags = torch.backends.cudnn.flags(enabled=True, benchmark=True) if cudnn_benchmark else contextlib.nullcontext()
    with flags:
        row, video = timed(lambda: vae.decode_raw(z, tiles), device, args.warmup, args.repeats)
    lat_hw, frames = z.shape[-2:], z.shape[2]
    est = decode_bytes(vae.vae, lat_hw, frames, dtype) if tiles is None else tiles_bytes(vae.vae, lat_hw, frames, dtype, tiles)
    row.update(mode=name, dtype=str(dtype), tiles=None if tiles is None else vars(tiles), estimate_gb=est / 1e9, **kw)
    return row, video.float().cpu()


def diffusers_row(module, latent, device, name, args) -> tuple[dict, torch.Tensor]:
    dtype, tiling = DIFFUSERS_MODES[name]
    vae = make_vae(module, device, dtype, tiling=False)          # VideoVAE only for the normalisation
    z = vae.to_model_space(latent)
    if tiling:
        vae.vae.enable_tiling()
    row, video = timed(lambda: vae.vae.decode(z, return_dict=False)[0], device, args.warmup, args.repeats)
    row.update(mode=name, dtype=str(dtype), tiling=tiling)
    return row, video.float().cpu()


def spread_rank(device_type: str, arch: str, seed: int, folder, shape, args_dict: dict):
    """One rank of spread-N: bf16-auto over the world; rank 0 returns its row and video."""
    import torch.distributed as dist

    from paradit.parallel.vae import spread_decode

    device = rank_device(device_type)
    vae = make_vae(build_module(arch, seed, folder), device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    args = argparse.Namespace(**args_dict)

    def call():
        dist.barrier()
        return spread_decode(vae, latent, dist.group.WORLD)
    row, frames = timed(call, device, args.warmup, args.repeats)
    return (row, frames) if dist.get_rank() == 0 else None


def table(rows: list[dict], ref_s: float) -> str:
    lines = ["mode | min s | median s | vs diffusers-bf16 | peak GB (est.) | rel err | uint8 mean/max",
             "--- | --- | --- | --- | --- | --- | ---"]
    for r in rows:
        peak = f"{r['peak_gb']:.1f} ({r.get('estimate_gb', float('nan')):.1f})" if "peak_gb" in r else "-"
        lines.append(f"{r['mode']} | {r['min_s']:.3f} | {r['median_s']:.3f} | {r['min_s'] / ref_s:.2f}x | {peak} | "
                     f"{r['rel_err']:.2e} | {r['uint8_mean_abs']:.2f}/{r['uint8_max_abs']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = has_cuda()
    p.add_argument("--arch", default="wan2.1" if gpu else "tiny", choices=("wan2.1", "wan2.2", "tiny"))
    p.add_argument("--folder", help="a diffusers VAE folder (or a pipeline folder with vae/); default random weights")
    p.add_argument("--latent", default="21x90x160" if gpu else "3x6x8", help="latent FRAMESxHxW")
    p.add_argument("--modes", default=",".join([*PARADIT_MODES, *DIFFUSERS_MODES]))
    p.add_argument("--worlds", default="", help="comma-separated group sizes for spread-N rows (GPU: N GPUs)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="the results JSON (default bench/results/<date>_<machine>_vae.json)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if gpu else "cpu")
    module = build_module(args.arch, args.seed, args.folder)
    shape = (module.config.z_dim, *(int(v) for v in args.latent.lower().split("x")))
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    modes = [m for m in args.modes.split(",") if m]
    order = ["fp32-whole"] + [m for m in modes if m != "fp32-whole"]     # the reference first
    rows, ref = [], None
    for name in order:
        fn = paradit_row if name in PARADIT_MODES else diffusers_row
        try:
            row, video = fn(module, latent, device, name, args)
        except torch.OutOfMemoryError as err:
            rows.append(dict(mode=name, error=f"out of memory: {err}"[:300]))
            print(rows[-1], flush=True)
            continue
        ref = video if ref is None else ref
        row.update(errors(video, ref))
        rows.append(row)
        print({k: v for k, v in row.items() if k != "times_s"}, flush=True)
        del video
        if gpu:
            torch.cuda.empty_cache()
    for n in (int(w) for w in args.worlds.split(",") if w):
        try:
            row, frames = run_world(spread_rank, n, device.type, args.arch, args.seed, args.folder, shape, vars(args),
                                    device_type=device.type)[0]
        except Exception as err:   # e.g. fewer GPUs than ranks: the row says why
            rows.append(dict(mode=f"spread-{n}", error=f"{type(err).__name__}: {err}"[-500:]))
            print(rows[-1], flush=True)
            continue
        ref_frames = VideoVAE.to_frames(ref).int()
        row.update(mode=f"spread-{n}", rel_err=float("nan"), uint8_mean_abs=(frames.int() - ref_frames).abs().float().mean().item(),
                   uint8_max_abs=(frames.int() - ref_frames).abs().max().item())
        rows.append(row)
        print({k: v for k, v in row.items() if k != "times_s"}, flush=True)
    ok = [r for r in rows if "error" not in r]
    base = next((r["min_s"] for r in ok if r["mode"] == "diffusers-bf16"), ok[0]["min_s"])
    for r in ok:
        r["vs_diffusers_bf16"] = r["min_s"] / base
    print(table(ok, base))
    out = args.out or results_path("vae", "json")
    write_json(out, dict(method=__doc__, arch=args.arch, latent=list(shape), folder=args.folder,
                         environment=environment(), rows=rows))
    print(f"wrote {out}")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The VAE decode's peak memory, counted on the meta device, beside paradit's estimate: no GPU needed.

    python bench/vae_memory.py                                  # both Wan VAEs at 1280x704x121 and 1280x720x81
    python bench/vae_memory.py --size 320x176x17 --dtype float32

The real decoder (diffusers' AutoencoderKLWan with the shipped VAEs' configs, built on the meta device:
no weights, no arithmetic) runs paradit's decode of a latent of the size's shape, in bf16 by default,
channels-last as on a GPU, while a dispatch mode sums the bytes of the tensors created and still alive
after every op: the peak of that sum is what torch's CUDA allocator reports as the decode's
max_memory_allocated above the weights (Wan2.1 at 720p x 81: 9.763 GB counted, 9.760 measured on an
H200 by bench/vae.py, bench/results/2026-12-02_h200x1_vae.json; TI2V-5B 1280x704x121 through the CLI:
9.72 counted, 9.72 measured on an H100, bench/results/2026-12-06_h100x1_e2e_ti2v_final.json's decode
peak less its write phase's). cuDNN's workspaces are not tensors and are not counted. Two decodes
per VAE and size: whole (the video returned: paradit.models.vae_memory.decode_bytes estimates it) and
streamed (each decoder call's frames handed on, as the CLI encodes the mp4: the planner's vae_gb).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, root
from random_checkpoint import WAN22_VAE  # noqa: E402

from paradit.models.vae import VideoVAE, decode_bytes  # noqa: E402
from paradit.models.vae_memory import decoder_shape  # noqa: E402
from paradit.plan.model import decoder_call_bytes  # noqa: E402

CONFIGS = {"wan2.1": {}, "wan2.2": WAN22_VAE}   # diffusers' defaults are Wan2.1's VAE


class LiveBytes(TorchDispatchMode):
    """The peak, op by op, of the bytes of the storages created under the mode and still alive."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:   # a view of a counted storage adds nothing
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.now += self.live[ref.cdata][1]
        self.peak = max(self.peak, self.now)
        return out


def meta_vae(arch: str, dtype: torch.dtype) -> VideoVAE:
    """The shipped VAE of `arch` on the meta device, as paradit runs it on a GPU (channels-last)."""
    from diffusers import AutoencoderKLWan
    with torch.device("meta"):
        module = AutoencoderKLWan(**CONFIGS[arch])
    vae = VideoVAE(module, "meta", dtype, tiling=False, channels_last=True)
    vae.mean, vae.std = vae.mean.to("meta"), vae.std.to("meta")
    return vae


def counted_peaks(vae: VideoVAE, lat_hw: tuple[int, int], frames: int) -> dict[str, int]:
    """Counted peak bytes of decoding a (C, frames, *lat_hw) latent whole and streamed."""
    z = vae.to_model_space(torch.zeros(vae.z_dim, frames, *lat_hw, device="meta"))
    with LiveBytes() as whole:
        vae.to_frames(vae.decode_raw(z, None), host=False)
    with LiveBytes() as streamed:
        vae.decode_to(z, None, on_frames=lambda run: None)
    return {"whole": whole.peak, "streamed": streamed.peak}


def row(arch: str, size: tuple[int, int, int], dtype: torch.dtype) -> dict:
    """Counted and estimated peaks (GB) of one VAE's decode of a video of size (W, H, F)."""
    vae = meta_vae(arch, dtype)
    ratio = vae.vae.spatial_compression_ratio
    lat_hw, frames = (size[1] // ratio, size[0] // ratio), 1 + (size[2] - 1) // 4
    counted = counted_peaks(vae, lat_hw, frames)
    return {"arch": arch, "size": "x".join(map(str, size)), "dtype": str(dtype).removeprefix("torch."),
            "whole_gb": counted["whole"] / 1e9,
            "whole_estimate_gb": decode_bytes(vae.vae, lat_hw, frames, dtype) / 1e9,
            "streamed_gb": counted["streamed"] / 1e9,
            "streamed_estimate_gb": decoder_call_bytes(decoder_shape(vae.vae), lat_hw[0] * lat_hw[1],
                                                       dtype.itemsize) / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="wan2.1,wan2.2", help="comma-separated: wan2.1 (A14B), wan2.2 (TI2V-5B)")
    ap.add_argument("--size", action="append", help="WxHxF (repeatable; default 1280x720x81 and 1280x704x121)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args(argv)
    sizes = [tuple(map(int, s.split("x"))) for s in args.size or ("1280x720x81", "1280x704x121")]
    print("VAE | video | dtype | whole: counted / estimate GB | streamed: counted / estimate GB")
    print("--- | --- | --- | --- | ---")
    for arch in args.arch.split(","):
        for size in sizes:
            r = row(arch, size, getattr(torch, args.dtype))
            print(f"{r['arch']} | {r['size']} | {r['dtype']} | {r['whole_gb']:.3f} / {r['whole_estimate_gb']:.3f} | "
                  f"{r['streamed_gb']:.3f} / {r['streamed_estimate_gb']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

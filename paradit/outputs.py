"""Outputs written atomically: a temporary file in the target folder, then a rename.

A failed run leaves no partial file and never replaces an earlier good output.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path` (same suffix); rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_video(path: str | Path, frames, fps: int, min_side: int = 128) -> Path:
    """uint8 frames (F, H, W, 3) -> H.264 mp4 (imageio-ffmpeg).

    Frames smaller than min_side pixels (the demo model's 16x16) are enlarged by an integer factor
    with nearest-neighbour pixels, so that a player shows them; the pixels themselves are unchanged.
    """
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    k = -(-min_side // min(frames.shape[1:3]))
    if k > 1:
        frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    with atomic_path(path) as tmp:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                pixelformat="yuv420p", format="FFMPEG") as w:
            for f in frames:
                w.append_data(f)
    return Path(path)


def write_json(path: str | Path, data: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))
    return Path(path)


def write_tensor(path: str | Path, tensors: dict) -> Path:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return Path(path)

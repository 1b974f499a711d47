"""The VAE's whole-latent decode, its bf16 path, and the tiles planned from free memory, each
against diffusers' AutoencoderKLWan on the same weights or against the fp32 decode."""
import pytest
import torch
from diffusers import AutoencoderKLWan

from paradit.models.vae import (Tiles, VideoVAE, decode_bytes, plan_tiles, tile_area, tile_geometry,
                                tile_origins, tiles_bytes)

LATENT_HW = (6, 8)  # one tile at diffusers' defaults: the whole latent either way


def latent(z: int, frames: int = 3) -> torch.Tensor:
    return torch.randn(z, frames, *LATENT_HW, generator=torch.Generator().manual_seed(z))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("z", [16, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_whole_decode_is_diffusers_decode(z, dtype):
    vae = VideoVAE.tiny(z, dtype=dtype)
    x = vae.to_model_space(latent(z))
    # the same convolutions in the same order (post_quant_conv per frame is a 1x1x1 conv): bit for bit
    assert torch.equal(vae.decode_raw(x, None), vae.vae.decode(x, return_dict=False)[0])
    assert vae.decode_plan(x) is None                                    # auto: it fits, so whole


@pytest.mark.parametrize("z", [16, 48])
def test_bf16_decode_is_within_tolerance_of_fp32(z):
    ref, bf16 = VideoVAE.tiny(z), VideoVAE.tiny(z, dtype=torch.bfloat16)
    a = ref.decode_raw(ref.to_model_space(latent(z)), None)
    b = bf16.decode_raw(bf16.to_model_space(latent(z)), None)
    # bf16 keeps 8 mantissa bits (4e-3 per rounding), compounded over some 30 layers of random weights;
    # measured: 5.1e-2 (z 16: base_dim 3, outputs near 0) and 9.4e-3 (z 48). bench/vae.py reports
    # the figure for the full-size architectures.
    assert rel_err(b, a) < 0.1
    assert (bf16.to_frames(b).int() - ref.to_frames(a).int()).abs().float().mean() < 3


@pytest.mark.parametrize("kw", [dict(chunk=2), dict(chunk=4), dict(channels_last=True)], ids=str)
def test_chunked_and_channels_last_decode_match(kw):
    ref, other = VideoVAE.tiny(16), VideoVAE.tiny(16, **kw)
    x = latent(16, frames=5)
    # the causal cache holds the last 2 frames of every conv, so chunks compute the same function;
    # other convolution shapes or layouts sum in another order: fp32 rounding, near 1e-7 relative
    torch.testing.assert_close(other.decode_raw(other.to_model_space(x), None),
                               ref.decode_raw(ref.to_model_space(x), None), rtol=1e-5, atol=1e-5)


def test_fixed_tiles_stay_fixed():
    vae = VideoVAE.tiny(16, tile=(32, 24))
    assert vae.decode_plan(vae.to_model_space(latent(16))) == Tiles(32, 32, 24, 24)
    assert VideoVAE.tiny(16, tiling=False).decode_plan(vae.to_model_space(latent(16)), budget=0) is None


# ----------------------------------------------------------------------------- planning
def full_size_vae():
    with torch.device("meta"):
        return AutoencoderKLWan()                                        # Wan2.1's VAE (A14B)


def covered(vae, hw, tiles) -> bool:
    g = tile_geometry(vae, tiles)
    origins = [o for row in tile_origins(vae, torch.empty(1, 1, 1, *hw, device="meta"), tiles) for o in row]
    cover = torch.zeros(hw, dtype=torch.bool)
    for i, j in origins:
        cover[i:i + g["lat_h"], j:j + g["lat_w"]] = True
    return bool(cover.all())


def test_plan_whole_when_it_fits_else_the_fewest_tiles_that_fit():
    vae, hw, frames = full_size_vae(), (90, 160), 21                     # 1280x720x81
    whole = decode_bytes(vae, hw, frames, torch.bfloat16)
    assert 5e9 < whole < 30e9                                            # bf16: about 12 GB
    assert plan_tiles(vae, hw, frames, torch.bfloat16, whole) is None
    for budget in (whole / 2, whole / 5):
        tiles = plan_tiles(vae, hw, frames, torch.bfloat16, budget)
        assert tiles_bytes(vae, hw, frames, torch.bfloat16, tiles) <= budget and covered(vae, hw, tiles)
    with pytest.raises(RuntimeError, match="free device memory"):
        plan_tiles(vae, hw, frames, torch.bfloat16, 1e6)


@pytest.mark.parametrize("pieces", [2, 3, 4, 8])
def test_plan_spread_tiles(pieces):
    vae, hw = full_size_vae(), (90, 160)
    tiles = plan_tiles(vae, hw, 21, torch.bfloat16, 100e9, pieces)
    count = sum(len(row) for row in tile_origins(vae, torch.empty(1, 1, 1, *hw, device="meta"), tiles))
    assert count == pieces and covered(vae, hw, tiles)
    # the largest tile, each rank's work: the whole latent's share plus at most the blend
    assert tile_area(vae, hw, tiles) <= hw[0] * hw[1] / pieces + 8 * max(hw)
    assert plan_tiles(vae, (4, 6), 21, torch.bfloat16, 100e9, pieces) is None   # too small to cut


@pytest.mark.parametrize("z", [16, 48])
def test_decode_hands_frames_over_as_they_are_decoded(z):
    """on_frames: the frames of each decoder call, in time order, as they are decoded (what the mp4
    encoder is fed while the decode runs); together the whole decode's frames, bit for bit. In tiles
    the blend needs every tile first: the whole video, once."""
    vae = VideoVAE.tiny(z)
    lat = latent(z, frames=3)
    runs = []
    assert vae.decode(lat, on_frames=runs.append) is None
    assert len(runs) == 3 and runs[0].shape[0] == 1 and all(r.dtype == torch.uint8 for r in runs)
    assert torch.equal(torch.cat(runs), vae.decode(lat))
    if z == 16:      # 2 x 2 tiles of the 48 x 64-pixel video
        tiled, whole = VideoVAE.tiny(z, tile=(40, 24)), []
        assert tiled.decode(lat, on_frames=whole.append) is None
        assert len(whole) == 1 and torch.equal(whole[0], tiled.decode(lat))


def test_video_stream_encodes_runs_as_they_arrive(tmp_path, monkeypatch):
    """outputs.VideoStream: runs of frames are queued, not written in the caller (an encoder that
    reads nothing does not hold the decode up), and the mp4 holds every frame of every run."""
    import time

    import numpy as np
    from imageio_ffmpeg import read_frames

    from paradit.outputs import Outputs
    out = Outputs()
    stream = out.video_stream(tmp_path / "v.mp4", 8)
    frames = np.random.default_rng(0).integers(0, 255, (9, 160, 200, 3), dtype=np.uint8)
    for run in (frames[:1], frames[1:5], frames[5:]):
        stream(run)
    assert stream.close() == 1 and stream.frames == 9
    out.commit()
    meta, *decoded = read_frames(str(tmp_path / "v.mp4"))
    assert len(decoded) == 9 and meta["size"] == (200, 160)
    stuck = tmp_path / "ffmpeg"
    stuck.write_text("#!/bin/sh\nexec sleep 600\n")
    stuck.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(stuck))
    slow = Outputs()
    stream, t0 = slow.video_stream(tmp_path / "w.mp4", 8), time.monotonic()
    for _ in range(3):
        stream(frames)                                      # 3 x 0.9 MB: more than a pipe holds
    assert time.monotonic() - t0 < 5
    slow.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ffmpeg", "v.mp4"]


HIDE_DIFFUSERS = '''
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Hide())
'''


def test_the_demo_pipeline_runs_without_diffusers():
    """diffusers is imported where a Wan VAE is built: the demo model (its own codec) imports, builds
    and generates on a machine without diffusers, and a Wan VAE there says what is missing."""
    import subprocess
    import sys

    script = HIDE_DIFFUSERS + '''
import pytest
from paradit.pipeline import Pipeline
from paradit.models.vae import VideoVAE
video = Pipeline.from_pretrained("demo")("a red ball moving left", steps=2, progress=False)
assert video.ndim == 4 and video.shape[-1] == 3, video.shape
with pytest.raises(ImportError, match="pip install diffusers"):
    VideoVAE.tiny()
assert "diffusers" not in sys.modules
print("ok")
'''
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]

"""bench/e2e.py at the tiny preset: it writes a diffusers-layout folder that diffusers itself reads,
runs the real CLI in a subprocess and reports every phase from the sidecar, then diffusers' WanPipeline
on the same folder, with per-phase ratios."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import e2e  # noqa: E402


def test_e2e_writes_a_checkpoint_and_reports_every_phase(tmp_path):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    out = tmp_path / "e2e.json"
    assert e2e.main(["--preset", "tiny", "--folder", str(tmp_path / "ckpt"), "--run", "64x48x5:2",
                     "--out", str(out), "--device", "cpu", "--vs-diffusers"]) == 0
    ckpt = tmp_path / "ckpt"
    for name in ("transformer", "transformer_2"):   # what diffusers reads, with accelerate installed
        model = WanTransformer3DModel.from_pretrained(ckpt / name)
        assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    AutoencoderKLWan.from_pretrained(ckpt / "vae")
    (row,) = json.loads(out.read_text())["runs"]
    assert row["returncode"] == 0, row.get("error")
    assert len(row["step_s"]) == 2 and all(s > 0 for s in row["step_s"])
    for phase in ("weights_s", "text_encoder_s", "vae_s", "build_s"):
        assert row["startup"][phase] > 0, phase
    for phase in ("text_encoder_s", "denoise_s", "vae_decode_s", "write_video_s"):
        assert row[phase] > 0, phase
    assert row["time_to_video_s"] >= row["startup"]["build_s"] + row["denoise_s"]
    assert row["gpu_memory_gb"] is None and row["mp4_bytes"] > 0  # no GPU here: no GPU memory to report
    # diffusers' WanPipeline on the same folder, phase by phase, and paradit / diffusers per phase
    peer = row["diffusers"]
    assert peer["returncode"] == 0, peer.get("error")
    assert len(peer["step_s"]) == 2 and peer["frames_shape"] == [1, 5, 48, 64, 3]
    assert set(row["ratios"]) == {"startup", "text_encoder", "denoise", "decode"}
    assert all(v > 0 for v in row["ratios"].values())

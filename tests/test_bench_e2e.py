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
                     "--out", str(out), "--device", "cpu", "--vs-diffusers", "--distill", "64x48x5"]) == 0
    ckpt = tmp_path / "ckpt"
    for name in ("transformer", "transformer_2"):   # what diffusers reads, with accelerate installed
        model = WanTransformer3DModel.from_pretrained(ckpt / name)
        assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())
    AutoencoderKLWan.from_pretrained(ckpt / "vae")
    row, distill = json.loads(out.read_text())["runs"]
    assert (row["run"], distill["run"]) == ("64x48x5:2", "64x48x5:distill-4-steps")
    assert row["returncode"] == 0, row.get("error")
    assert len(row["step_s"]) == 2 and all(s > 0 for s in row["step_s"])
    for phase in ("imports_s", "pipeline_import_s", "weights_s", "text_encoder_s", "text_encoder_warmup_s", "vae_s",
                  "build_s"):
        assert row["startup"][phase] > 0, phase
    for phase in ("text_encoder_s", "denoise_s", "vae_decode_s", "write_video_s"):
        assert row[phase] > 0, phase
    assert row["time_to_video_s"] >= row["startup"]["build_s"] + row["denoise_s"]
    assert row["gpu_memory_gb"] is None and row["mp4_bytes"] > 0  # no GPU here: no GPU memory to report
    # diffusers' WanPipeline on the same folder, phase by phase, and paradit / diffusers per phase
    peer = row["diffusers"]
    assert peer["returncode"] == 0, peer.get("error")
    assert len(peer["step_s"]) == 2 and peer["frames_shape"] == [1, 5, 48, 64, 3]
    assert set(row["ratios"]) == {"startup", "text_encoder", "denoise", "decode", "decode_write", "time_to_video"}
    assert all(v > 0 for v in row["ratios"].values())
    assert peer["write_video_s"] > 0 and peer["mp4_bytes"] > 0 and peer["time_to_video_s"] > peer["denoise_s"]
    assert peer["time_to_video_s"] > peer["imports_s"] > 0      # the process's seconds before its start-up
    # each phase timed from outside the library (bench/cli_probe.py; no GPU here: no peaks)
    assert set(row["phases"]) == set(peer["phases"]) == {"startup", "text_encode", "denoise", "decode", "write"}
    assert all(p["s"] > 0 and p["calls"] == 1 for p in row["phases"].values())
    # the distilled recipe: 4 Euler steps at guidance 1, both rank-64 LoRAs merged, no diffusers run
    assert distill["returncode"] == 0, distill.get("error")
    assert len(distill["step_s"]) == 4 and len(distill["loras"]) == 2 and "diffusers" not in distill
    assert distill["startup"]["lora_merge_s"] > 0


def test_probe_hides_a_package_as_if_not_installed():
    """bench/cli_probe.py --hide-fa4 (e2e.py --without-fa4): paradit's own check for an optional package
    finds it missing while it is hidden (shown with one that is installed here, the standard library's
    tabnanny, never imported), and finds flash-attn-4
    missing whether or not it is installed."""
    import cli_probe
    from paradit.models import attention
    assert attention._has_module("tabnanny")
    sys.meta_path[:0] = [cli_probe.HideModule("tabnanny"), cli_probe.HideModule("flash_attn.cute")]
    try:
        assert not attention._has_module("tabnanny") and not attention.fa4_available()
    finally:
        del sys.meta_path[:2]
    assert attention._has_module("tabnanny")


def test_probe_keeps_the_runs_peak_beside_each_phases(monkeypatch):
    """The probe resets the peak statistics as each phase starts; what the CLI reads for its sidecar
    (torch.cuda.max_memory_*) stays the whole run's peak, between phases included. A fake allocator
    stands in for CUDA's."""
    import cli_probe
    state = {"now": 0, "peak": 0}

    def alloc(n):
        state["now"] = n
        state["peak"] = max(state["peak"], n)
    fake = {"max_memory_allocated": lambda device=None: state["peak"], "max_memory_reserved": lambda device=None: 0}
    monkeypatch.setattr(cli_probe, "REAL", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=state["now"]))
    for name in fake:
        monkeypatch.setattr(torch.cuda, name, fake[name])
    record, whole = {}, {}
    cli_probe.keep_whole_peaks(whole)
    load = cli_probe.measured(lambda: (alloc(5e9), alloc(1e9)), "startup", record, whole)
    decode = cli_probe.measured(lambda: (alloc(3e9), alloc(0)), "decode", record, whole)
    load()
    alloc(7e9)                         # between the phases: the next phase's reset must not lose it
    alloc(2e9)
    decode()
    assert record["startup"]["allocated_gb"] == 5 and record["decode"]["allocated_gb"] == 3
    assert torch.cuda.max_memory_allocated() == 7e9                 # the run's, as the sidecar reads it


def test_probe_leaves_the_pipeline_s_imports_to_the_cli(tmp_path):
    """bench/cli_probe.py wraps the pipeline's methods once the CLI imports paradit.pipeline (where the CLI
    times that import, pipeline_import_s), not before the CLI's clock: a run refused by its checks, under
    the probe, imports neither paradit.pipeline nor transformers. (The probe's phases of a run that goes
    through: test_e2e_writes_a_checkpoint_and_reports_every_phase.)"""
    import subprocess
    probe = Path(__file__).resolve().parents[1] / "bench" / "cli_probe.py"
    run = subprocess.run([sys.executable, "-X", "importtime", str(probe), "--phase-memory", str(tmp_path / "p.json"),
                          "--", "--model", "tiny", "--out", str(tmp_path / "video.txt")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "the video is written as H.264 mp4" in run.stderr, run.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "paradit.cli.spec" in imported and not {"paradit.pipeline", "transformers"} & imported

"""bench/vae.py on CPU at a tiny size: every mode asked for runs, errors are measured against the
fp32 whole decode, and the spread decode over 2 gloo ranks gives the single-rank frames."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import vae as bench_vae  # noqa: E402


def test_vae_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "vae.json"
    assert bench_vae.main(["--arch", "tiny", "--latent", "3x6x8", "--repeats", "1", "--warmup", "0",
                           "--modes", "fp32-tiles,bf16-auto,diffusers-bf16", "--worlds", "2",
                           "--out", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"fp32-whole", "fp32-tiles", "bf16-auto", "diffusers-bf16", "spread-2"}
    assert all(r["min_s"] > 0 and "vs_diffusers_bf16" in r for r in rows.values())
    assert rows["fp32-whole"]["rel_err"] == 0 and rows["fp32-tiles"]["rel_err"] == 0  # one tile here: the same
    # paradit's bf16 whole decode and diffusers' are the same computation (tests/test_vae.py): the same error
    assert 0 < rows["bf16-auto"]["rel_err"] == rows["diffusers-bf16"]["rel_err"] < 0.1
    assert rows["spread-2"]["uint8_max_abs"] == 0   # CPU: fp32, too small to cut, decoded on rank 0

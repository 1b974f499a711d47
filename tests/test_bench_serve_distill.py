"""bench/serve_distill.py end to end on CPU: a tiny two-expert checkpoint served with the 4-step recipe
as the server's default request, two jobs in a row with per-request LoRAs (a switch between them)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ckpt_workers import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_serve_distill_bench(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_distill.py"), "--model", str(ckpt), "--size",
                          "80x48", "--frames", "9", "--rank", "4", "--jobs", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [j["status"] for j in result["jobs"]] == ["completed", "completed"], result["jobs"]
    # the server's default request is the recipe: the requests gave no steps, guidance or sampler
    assert all((j["steps"], j["sampler"], j["guidance"]) == (4, "euler", [1.0, 1.0]) for j in result["jobs"])
    assert all(j["timings"]["lora_switch_s"] > 0 for j in result["jobs"])      # the first merge, then a switch
    assert any(line.startswith("paradit_lora_switch_seconds_count 2.0") for line in result["lora_switch_metrics"])

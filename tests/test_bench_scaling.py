"""bench/scaling.py end to end at world 1 on a tiny model: the JSON, and a calibration fitted
relative to the factors its predictions were made with (a per-GPU entry, when the file has one)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_scaling_run_and_calibration_refit(tmp_path):
    sys.path.insert(0, str(BENCH))
    import scaling
    from paradit.plan import DEFAULT_CALIBRATION

    base = json.loads(Path(DEFAULT_CALIBRATION).read_text())
    base["gpus"] = {"cpu": {"matmul_efficiency": 0.2, "attention_efficiency": 0.2, "elementwise_efficiency": 0.1}}
    cal_in, cal_out = tmp_path / "in.json", tmp_path / "out.json"
    cal_in.write_text(json.dumps(base))
    argv = ["--device", "cpu", "--size", "64x64", "--frames", "9", "--worlds", "1", "--layouts", "1",
            "--steps", "2", "--warmup", "1", "--calibration", str(cal_in), "--write-calibration", str(cal_out),
            "--out", str(tmp_path)]
    assert scaling.main(argv) == 0
    (path,) = tmp_path.glob("*_scaling.json")
    data = json.loads(path.read_text())
    (point,) = data["points"]
    assert point["step_s"]["headline"] > 0 and point["predicted"]["step_s"] > 0
    s = data["planner"]["fit"]["compute_scale"]
    written = json.loads(cal_out.read_text())["gpus"]["cpu"]
    # the predictions used the per-GPU 0.2, so the fit scales 0.2 (not the top-level 0.65)
    assert written["matmul_efficiency"] == pytest.approx(0.2 * s, rel=1e-3)
    assert written["elementwise_efficiency"] == pytest.approx(0.1 * s, rel=1e-3)

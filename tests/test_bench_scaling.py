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


def test_the_fit_caps_an_efficiency_the_steps_would_put_above_one():
    """A busy machine's probe can run slower than the steps: the README's CPU sweep died after every
    world had run (matmul_efficiency=1.43: must be in (0, 1]) and wrote nothing."""
    sys.path.insert(0, str(BENCH))
    import dataclasses

    import scaling_fit
    from paradit.plan import Calibration

    base = Calibration()   # matmul and attention 0.65, elementwise 0.5, comm 0.7, latency 20 us
    pred = dict(step_s=4.0, compute_s=3.0, launch_s=0.0, ring_merge_s=0.0, comm_s=1.0)
    points = [dict(world=2, backend="auto", predicted=pred, compute_only_s={"headline": 1.0},   # compute 3x faster
                   step_s={"headline": 1.1}, comm_s=0.1)]                                      # comm 10x faster
    fit = scaling_fit.fit_calibration(points, base, fit_world_max=2)
    assert fit["compute_scale"] == pytest.approx(3.0) and fit["comm_scale"] == pytest.approx(0.1)
    assert fit["capped"] == ["matmul_efficiency", "attention_efficiency", "elementwise_efficiency", "comm_efficiency"]
    fitted = dataclasses.replace(base, **fit["factors"])       # Calibration checks every fraction
    assert fitted.matmul_efficiency == fitted.elementwise_efficiency == fitted.comm_efficiency == 1.0
    assert fitted.collective_latency_us == pytest.approx(2.0)  # not a fraction: scaled, not capped

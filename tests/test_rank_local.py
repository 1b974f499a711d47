"""bench/rank_local.py: one rank's step at every stage the planner proposes, run in a subprocess as
a user would, and the fit that turns such measurements into the planner's calibration."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import paradit.plan as pl
from paradit.config import WanConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_every_planner_stage_is_measured_at_its_shard_and_the_calibration_reads_back(tmp_path):
    import rank_local
    import rank_local_fit
    import rank_local_measure

    base = json.loads(Path(pl.DEFAULT_CALIBRATION).read_text())
    base["gpus"]["cpu"] = {"comm_efficiency": 0.3, "collective_latency_us": 77.0}   # comm factors must survive
    cal_in, cal_out = tmp_path / "in.json", tmp_path / "out.json"
    cal_in.write_text(json.dumps(base))
    # 64x48x9: 36 tokens, split 3, 5 and 7 ways unevenly by the 8-GPU stages
    cmd = [sys.executable, str(ROOT / "bench" / "rank_local.py"), "--preset", "tiny", "--sizes", "64x48x9",
           "--world", "8", "--steps", "2", "--warmup", "1", "--calibration", str(cal_in),
           "--write-calibration", str(cal_out), "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = tmp_path.glob("*_rank_local.json")
    data = json.loads(path.read_text())

    cfg = WanConfig.preset("tiny")
    spec = pl.GPUSpec(**data["planner"]["spec"])
    cal = dataclasses.replace(pl.load_calibration(str(cal_in)), min_tokens_per_rank=1)
    stages = rank_local_measure.planner_stages(pl.make_problem(cfg, 8, spec, 64, 48, 9, calibration=cal))
    assert len(stages) > 8 and any(36 % (u * r) for u, r, _ in stages)          # uneven shards among them
    assert sorted(tuple(p["stage"]) for p in data["points"]) == sorted(stages)
    for p in data["points"]:
        u, r, c = p["stage"]
        assert p["local_tokens"] == math.ceil(36 / (u * r)), p["label"]        # rank 0 holds the larger shard
        assert p["local_heads"] == cfg.num_heads // u
        assert p["batch"] == (1 if c == 2 else 2)
        assert p["step_s"] > 0 and len(p["step_all_s"]) == 2 and p["kernels"]
        assert p["predicted"]["busy_s"] > 0 and p["predicted"]["local_tokens"] == p["local_tokens"]
    assert {row["stage"] for row in data["gains"]} == {p["label"] for p in data["points"]}

    written = pl.load_calibration(str(cal_out)).for_gpu("cpu")
    fit = data["fit"]["factors"]
    assert written.matmul_efficiency == pytest.approx(fit["matmul_efficiency"], rel=1e-3)
    assert written.attention_efficiency == pytest.approx(fit["attention_efficiency"], rel=1e-3)
    assert written.gemm_half_rows == fit["gemm_half_rows"]
    assert written.comm_efficiency == 0.3 and written.collective_latency_us == 77.0
    assert json.loads(cal_out.read_text())["gpus"]["h200"] == base["gpus"]["h200"]

    # the same fit again from the saved file alone, attention pinned: the rest is refitted around it
    cal_fix = tmp_path / "fixed.json"
    assert rank_local.main(["--refit", str(path), "--fix", "attention_efficiency=0.7", "--calibration", str(cal_in),
                            "--write-calibration", str(cal_fix), "--note", "pinned by the test"]) == 0
    want = rank_local_fit.fit_rank_local([p for p in data["points"] if p["mode"] == "eager"],
                                     cfg.replace(num_layers=data["settings"]["layers"]), spec,
                                     pl.load_calibration(str(cal_in)).for_gpu("cpu"), {"attention_efficiency": 0.7})
    pinned = pl.load_calibration(str(cal_fix)).for_gpu("cpu")
    assert pinned.attention_efficiency == 0.7
    assert pinned.matmul_efficiency == pytest.approx(want["factors"]["matmul_efficiency"], rel=1e-3)
    assert "attention_efficiency fixed at 0.7" in pinned.source and "pinned by the test" in pinned.source


def test_fit_recovers_the_factors_that_made_the_times():
    """Times made by the planner's own model with known factors: the fit must find them again."""
    import rank_local_fit
    import rank_local_measure

    cfg = WanConfig.preset("wan2.2-t2v-a14b").replace(num_layers=2)
    spec = pl.GPUS["h200"]
    true = dataclasses.replace(pl.load_calibration(), matmul_efficiency=0.5, attention_efficiency=0.8,
                               gemm_half_rows=512, layer_overhead_us=30.0, per_gpu={})
    points = []
    for size in ((1280, 720, 81), (832, 480, 81)):
        problem = pl.make_problem(WanConfig.preset("wan2.2-t2v-a14b"), 8, spec, *size, calibration=true)
        for stage in rank_local_measure.planner_stages(problem):
            parts = rank_local_fit.predicted_parts(cfg, stage, size, spec, true)
            points.append(dict(stage=list(stage), size=list(size), step_s=parts["busy_s"]))
    fit = rank_local_fit.fit_rank_local(points, cfg, spec, true)
    f = fit["factors"]
    assert f["gemm_half_rows"] == 512
    assert f["matmul_efficiency"] == pytest.approx(0.5, rel=1e-3)
    assert f["attention_efficiency"] == pytest.approx(0.8, rel=1e-3)
    assert f["layer_overhead_us"] == pytest.approx(30.0, rel=1e-2)
    assert fit["rms_relative_error"] < 1e-6

    # a wrong pinned value: the others absorb what they can, and the error says the fit is off
    off = rank_local_fit.fit_rank_local(points, cfg, spec, true, {"attention_efficiency": 0.4})
    assert off["factors"]["attention_efficiency"] == 0.4 and off["rms_relative_error"] > 0.05
    right = rank_local_fit.fit_rank_local(points, cfg, spec, true, {"attention_efficiency": 0.8})
    assert right["factors"]["matmul_efficiency"] == pytest.approx(0.5, rel=1e-3)
    assert right["factors"]["layer_overhead_us"] == pytest.approx(30.0, rel=1e-2)
    with pytest.raises(ValueError, match="cannot fix"):
        rank_local_fit.fit_rank_local(points, cfg, spec, true, {"comm_efficiency": 0.5})


def test_the_fake_world_fills_what_each_collective_receives():
    """Kernels after a collective must see real values, not unwritten memory: every receive
    buffer of the runtime's collectives is written from this rank's own sent data."""
    import rank_local_measure
    import torch
    import torch.distributed as dist
    from paradit.parallel import collectives as co

    x = torch.randn(2, 1, 5, 7, 4)                                # (P, B, S_me, H, D): 7 heads over 3 ranks
    real = dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv
    with rank_local_measure.fake_world(3):
        out = co.seq_to_heads(x, None, [5, 5, 4], [3, 2, 2])
        assert out.shape == (2, 1, 14, 3, 4) and torch.isfinite(out).all()
        assert torch.equal(out[:, :, :5], x[:, :, :, :3])              # what rank 0 "receives from itself"
        assert set(out.flatten().tolist()) <= set(x.flatten().tolist())
        gathered = co.all_gather_uneven(torch.arange(6.0).view(3, 2), dist.group.WORLD, [3, 3, 2])
        assert gathered.shape == (8, 2) and torch.equal(gathered[:3], gathered[3:6])
        ring = co.RingComm(dist.group.WORLD)
        t = torch.randn(4, 6)
        ring.send_recv(t, (4, 6))
        assert torch.equal(ring.wait(), t)
    assert (dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv) == real     # put back
    big = torch.empty(10)
    rank_local_measure.fill_received(big, torch.arange(4.0))
    assert big.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]

"""scripts/demo_report.py: a trained demo model's judged numbers, contact sheet and loss curve, made
again from its weights folder alone (here the 16x16 model's, which is quick; demo64's takes minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paradit.config import WanConfig

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "bench" / "results" / "2026-12-06_h100x1_train_demo64.log"
RESUMED = LOG.with_name("2026-12-06_h100x1_train_demo64_resume.log")   # train_demo.py --init from LOG's weights


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_report
    import train_demo
    return demo_report, train_demo


def test_losses_from_a_training_log(scripts, tmp_path):
    demo_report, _ = scripts
    points = demo_report.losses_from_log(LOG)
    assert points["shared"][0] == [0, 2.4393] and points["shared"][-1] == [3459, 0.6451]
    assert points["high"][0] == [3500, 0.7133] and points["low"][-1] == [4612, 0.5935]
    assert len(points["high"]) == len(points["low"]) == 13
    both = demo_report.losses_from_logs([LOG, RESUMED])                  # the resumed run's iterations go on
    assert both["shared"] == points["shared"] and both["high"][:13] == points["high"]
    assert both["high"][13] == [4613, 0.6862] and both["low"][-1] == [4613 + 2406, 0.5727]
    (tmp_path / "empty.log").write_text("Traceback (most recent call last):\n")
    with pytest.raises(SystemExit, match="no `iter N  loss ...` lines"):
        demo_report.losses_from_log(tmp_path / "empty.log")


def test_loss_points_are_block_means_on_one_iteration_axis(scripts):
    demo_report, _ = scripts
    points = demo_report.loss_points({"shared": [1.0, 2.0, 3.0, 4.0, 5.0], "high": [6.0, 8.0], "low": [1.0]}, 2)
    assert points == {"shared": [[1, 1.5], [3, 3.5], [4, 5.0]], "high": [[6, 7.0]], "low": [[5, 1.0]]}


def test_report_from_the_folder_train_demo_writes(scripts, tmp_path):
    """train_demo.save writes the weights, train.json and losses.json; `python scripts/demo_report.py
    FOLDER` then judges into train.json (keeping what was there) and draws both images."""
    from paradit.demo import demo_components
    _, train_demo = scripts
    experts, text, _ = demo_components(WanConfig.preset("demo"), "cpu")
    folder, docs = tmp_path / "demo", tmp_path / "docs"
    losses = {"shared": [2.0 - 0.01 * i for i in range(40)], "high": [0.9] * 10, "low": [0.5] * 10}
    train_demo.save(folder, experts, text, dict(preset="demo", train_seconds=1.0), losses)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_report.py"), str(folder), "--docs", str(docs)],
                         capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((folder / "train.json").read_text())
    assert info["train_seconds"] == 1.0 and info["judged"]["count"] == 12
    assert info["judged"]["passed"]["colour"] >= 11 and info["judged"]["passed"]["direction"] >= 11, info["judged"]
    assert f"{folder / 'losses.json'}: means of 10 iterations" in res.stdout
    assert all((docs / f"demo-{kind}.png").stat().st_size > 10_000 for kind in ("loss", "samples"))


def test_report_refuses_a_folder_without_train_json(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no train.json" in res.stderr

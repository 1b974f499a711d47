"""bench/validate_layouts.py, the one-command layout validation, at worlds 2 and 4 on CPU (gloo,
fp32): every layout's model output and final latent against the single device, uneven splits."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import validate_layouts  # noqa: E402


def test_every_layout_of_worlds_2_and_4_matches_one_device(tmp_path):
    out = tmp_path / "layouts.json"
    assert validate_layouts.main(["--worlds", "2,4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    expected = {name for w in (2, 4) for name, _ in validate_layouts.LAYOUTS[w]}
    assert {r["layout"] for r in rows[1:]} == expected and all("error" not in r for r in rows)
    for r in rows[1:]:
        assert r["latent_err"] is not None and r["latent_err"] <= validate_layouts.TOL["fp32"], r
        assert r["model_err"] is None or r["model_err"] <= validate_layouts.TOL["fp32"], r


def test_a_diverging_layout_fails_the_table():
    rows = [dict(world=2, layout="U2", model_err=1e-7, latent_err=0.5)]
    assert "FAIL" in validate_layouts.table(rows, validate_layouts.TOL["fp32"])

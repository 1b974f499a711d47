"""bench/peers.py end to end at world 1 on a tiny model: paradit and diffusers agree, every row is in the JSON.

One gloo-less world of one process (spawned by the script itself, as on a real run), 48 tokens.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def peers_run(tmp_path_factory) -> dict:
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH))
    import peers

    out = tmp_path_factory.mktemp("peers")
    argv = ["--device", "cpu", "--size", "64x64", "--frames", "9", "--worlds", "1", "--steps", "2", "--warmup", "1",
            "--out", str(out)]
    assert peers.main(argv) == 0
    (path,) = out.glob("*_peers.json")
    return json.loads(path.read_text())


def rows_of(data: dict, library: str) -> dict[str, dict]:
    return {r["measure"]: r for r in data["rows"] if r["library"] == library}


def test_every_library_has_its_rows(peers_run):
    assert set(rows_of(peers_run, "paradit")) == {"forward", "step"}
    assert set(rows_of(peers_run, "diffusers")) == {"forward", "step"}
    xfuser = [r for r in peers_run["rows"] if r["library"] == "xfuser"]
    assert xfuser, "xfuser must have a row: its results, or why it did not run"
    for r in xfuser:   # ran (then it has numbers) or says why not, in the exception's words
        assert "step_s" in r or (r["status"] == "did not run" and len(r["reason"]) > 20), r
    for r in peers_run["rows"]:
        if "step_s" in r:
            assert r["world"] == 1 and r["step_s"]["headline"] > 0 and r["peak_mem_mb"]["max"] > 0


def test_diffusers_computes_the_same_function(peers_run):
    # Same fp32 weights and inputs on both sides: they differ only in summation order (patch embedding
    # as a matmul vs Conv3d, norm kernels), a few ulp grown through two layers (~2e-7 measured). 1e-5
    # leaves ~50x margin, while a wrong weight mapping or a wrong CFG combine is an O(0.1-1) error.
    for measure, row in rows_of(peers_run, "diffusers").items():
        assert row["rel_err_vs_paradit"] is not None and row["rel_err_vs_paradit"] < 1e-5, (measure, row)
    for row in peers_run["rows"]:
        if row["library"] == "xfuser" and "step_s" in row:
            assert row["rel_err_vs_paradit"] < 1e-5, row


def test_speedups_are_against_paradit_single(peers_run):
    for measure, row in rows_of(peers_run, "paradit").items():
        assert row["speedup_vs_paradit_single"] == pytest.approx(1.0)
    d = rows_of(peers_run, "diffusers")["step"]
    p = rows_of(peers_run, "paradit")["step"]
    assert d["speedup_vs_paradit_single"] == pytest.approx(p["step_s"]["headline"] / d["step_s"]["headline"])

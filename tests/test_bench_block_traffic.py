"""bench/block_traffic.py on a small shape: the counter's arithmetic, and the block's memory-bound
traffic below diffusers' (the fused chains of paradit.models.elementwise, counted, not timed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def block_traffic():
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(BENCH))
    import block_traffic
    return block_traffic


def test_touched_bytes_count_sectors_of_strided_views_and_broadcasts_once(block_traffic):
    x = torch.empty(4, 6, 32, dtype=torch.bfloat16, device="meta")                # rows of 64 bytes
    assert block_traffic.touched_bytes(x) == 4 * 6 * 32 * 2
    assert block_traffic.touched_bytes(x[..., ::2]) == 4 * 6 * 32 * 2           # every other element: all sectors
    assert block_traffic.touched_bytes(x[:, ::3]) == 4 * 2 * 32 * 2             # whole rows: only their bytes
    assert block_traffic.touched_bytes(torch.empty(1, 1, 8, device="meta").expand(4, 6, 8)) == 8 * 4


@pytest.mark.parametrize("batch", [1, 2])
def test_paradit_block_moves_less_than_diffusers(block_traffic, batch, tmp_path):
    argv = ["--preset", "tiny", "--size", "64x64", "--frames", "5", "--batch", str(batch), "--out", str(tmp_path)]
    assert block_traffic.main(argv) == 0
    (path,) = tmp_path.glob(f"*_block_traffic_b{batch}.json")
    blocks = json.loads(path.read_text())["blocks"]
    for lib in ("paradit", "diffusers"):
        ops, kinds = blocks[lib]["ops"], blocks[lib]["kinds"]
        assert kinds["gemm"]["kernels"] == 10 and kinds["attention"]["kernels"] == 2   # q k v o twice, the FFN
        total = sum(op["read"] + op["written"] for op in ops.values() if op["kind"] == "other")
        assert abs(total / 1e9 - kinds["other"]["gb"]) < 1e-9
    # diffusers' chains (fp32 copies, separate multiply, add and cast) move the stream ~3x; the
    # counts are exact functions of the code at a given shape, not timings
    assert blocks["paradit"]["kinds"]["other"]["gb"] < 0.5 * blocks["diffusers"]["kinds"]["other"]["gb"]
    assert "gelu" not in blocks["paradit"]["ops"] and "gelu" in blocks["diffusers"]["ops"]   # in the epilogue

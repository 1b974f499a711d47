"""Every layout computes what one device computes: model output and the pipeline's final latent.

Layouts run in gloo worlds of 2, 4 and 8 CPU processes (one launch per world size), on tiny models
with awkward sizes: head counts the Ulysses degree does not divide and token counts no degree
divides (45 and 105 tokens).
"""
import pytest
import torch

from paradit.demo.judge import rel_err
from paradit.launch import spawn
from paradit.parallel.runtime import Runtime
from workers import compiled_against_eager, model_output, pipeline_latent, run_layout_table, tiny_config

# (world, name, layout, heads, latent grid (F', H', W') of the model check)
TABLE = [
    (2, "U2", dict(ulysses=2), 3, (3, 5, 3)),                      # 3 heads on 2; 45 tokens
    (2, "R2", dict(ring=2), 2, (3, 5, 7)),                         # 105 tokens
    (2, "U2 in-turn", dict(ulysses=2, cfg_mode="in-turn"), 3, (3, 5, 3)),   # cond, then uncond
    (4, "U4", dict(ulysses=4), 6, (3, 5, 7)),                      # 6 heads on 4
    (4, "R4", dict(ring=4), 2, (3, 5, 7)),
    (4, "U2R2", dict(ulysses=2, ring=2), 3, (3, 5, 7)),
    (4, "U2xCFG2", dict(ulysses=2, cfg=2), 3, (3, 5, 3)),
    (4, "R2xDP2 in-turn", dict(ring=2, dp=2, cfg_mode="in-turn"), 2, (3, 5, 7)),
    (8, "U8", dict(ulysses=8), 12, (3, 5, 7)),                     # 12 heads on 8
    (8, "R8", dict(ring=8), 2, (3, 5, 7)),
    (8, "U4R2", dict(ulysses=4, ring=2), 6, (3, 5, 7)),
    (8, "U2R2xCFG2", dict(ulysses=2, ring=2, cfg=2), 3, (3, 5, 3)),
    (8, "R2xCFG2xDP2", dict(ring=2, cfg=2, dp=2), 2, (3, 5, 3)),
]
WORLDS = sorted({row[0] for row in TABLE})
# fp32 with a different summation order (split softmax, LSE merge, uneven head groups): rounding
# stays near 1e-7 relative; 1e-5 is two orders of margin and far below any real layout bug (>1e-2).
RTOL = 1e-5


@pytest.fixture(scope="module")
def results():
    out = {}
    for world in WORLDS:
        rows = [(n, lay, h, g) for w, n, lay, h, g in TABLE if w == world]
        out[world] = spawn(run_layout_table, world, rows, timeout_s=240)
    return out


@pytest.mark.parametrize("world,name,layout,heads,grid", TABLE, ids=[r[1] for r in TABLE])
def test_layout_matches_single_device(results, world, name, layout, heads, grid):
    cfg = tiny_config(heads)
    ref_out, ref_latent = model_output(cfg, grid, None), pipeline_latent(cfg, None)
    assert ref_out.abs().mean() > 1e-2 and ref_latent.abs().mean() > 1e-2  # real signal, not zeros
    for rank, per_rank in enumerate(results[world]):
        out, latent = per_rank[name]
        assert rel_err(out, ref_out) < RTOL, f"{name} rank {rank}: model output differs"
        assert rel_err(latent, ref_latent) < RTOL, f"{name} rank {rank}: final latent differs"


def test_cfg_in_turn_runs_two_batch_1_forwards_and_matches_batched():
    """One process: cfg_mode="in-turn" runs the cond and uncond forwards one after the other (batch 1
    each, so that the table's in-turn rows test that path, not the batched one), with the batched result."""
    cfg = tiny_config(3)
    batches = []
    original = Runtime.forward_tokens

    def recording(self, model, patches, *args, **kw):
        batches.append((self.batch_cfg, patches.shape[0]))
        return original(self, model, patches, *args, **kw)
    try:
        Runtime.forward_tokens = recording
        in_turn = pipeline_latent(cfg, dict(cfg_mode="in-turn"))
        seen_in_turn, batches[:] = sorted(set(batches)), []
        batched = pipeline_latent(cfg, None)
    finally:
        Runtime.forward_tokens = original
    assert seen_in_turn == [(False, 1)] and sorted(set(batches)) == [(True, 2)]
    assert rel_err(in_turn, batched) < RTOL


@pytest.mark.parametrize("layout", [dict(ulysses=2), dict(ring=2)], ids=["U2", "R2"])
def test_compiled_blocks_under_a_layout(layout):
    """--compile with sequence parallelism: the warm-up builds every graph, the run compiles nothing
    more (a guard on per-call Python state, such as the traffic counter, would recompile every
    block call until dynamo gave up and ran eager), and the latent is what eager mode gives."""
    for rank, (eager, out, new_graphs) in enumerate(spawn(compiled_against_eager, 2, layout, timeout_s=300)):
        assert new_graphs == 0, f"rank {rank}: {new_graphs} graphs built inside the run"
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)

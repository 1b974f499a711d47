"""offload="layers" (paradit.streaming): every expert in host memory, streamed to the device block
by block a few blocks ahead; the latent is the resident run's, and a rank holds on the device only
the running expert's embeddings, head and 1 + LEAD blocks (measured from the tensors themselves).

One process, and gloo worlds of 2, 4 and 8 (Ulysses with 3 heads on 2, Ring, CFG-parallel, split
stages, CHORDS), on the tiny model with 5 blocks; fp32.
"""
import pytest

from paradit.launch import spawn
from paradit.plan import GPUS, ParallelConfig, plan
from shard_workers import chords_reference, layers_run, layers_table, sharded_config
from workers import pipeline_latent

# (world, name, layout, heads, CHORDS cores)
TABLE = [
    (2, "U2", dict(ulysses=2), 3, None),
    (2, "cfg2", dict(cfg=2), 2, None),
    (2, "chords2", dict(chords=2), 2, 2),
    (4, "split 2+2", dict(experts="split", stages=((2, 1, 1), (1, 2, 1))), 3, None),
    (8, "U2R2xCFG2", dict(ulysses=2, ring=2, cfg=2), 3, None),
]
# layers offload moves bytes and computes nothing; CFG in turn (two batch-1 forwards instead of one
# batch-2 forward: other GEMM blockings) and the parallel layouts sum in another order: fp32
# rounding only, ~1e-7 relative; 1e-5 as in tests/test_parallel.py
RTOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_bytes(res: dict, what: str):
    assert res["peak"] == res["window"], f"{what}: {res['peak']} B on the device, predicted {res['window']}"
    assert res["peak"] < res["expert"], f"{what}: streaming kept a whole expert on the device"
    assert res["after"] == 0, f"{what}: blocks left on the device after the request"


def test_layers_offload_one_process_is_the_resident_run():
    heads = 3
    res, ref = layers_run(heads, None), pipeline_latent(sharded_config(heads), None)
    assert rel_err(res["latent"], ref) < RTOL
    _check_bytes(res, "one process")
    assert set(res["streamed"]) == {0, 1}          # both experts streamed, one evaluation at a time


@pytest.fixture(scope="module")
def results():
    return {w: spawn(layers_table, w, [r[1:] for r in TABLE if r[0] == w], timeout_s=300)
            for w in sorted({r[0] for r in TABLE})}


@pytest.mark.parametrize("world,name,layout,heads,cores", TABLE, ids=[r[1] for r in TABLE])
def test_layers_offload_under_a_layout(results, world, name, layout, heads, cores):
    ref = chords_reference(heads, cores) if cores else pipeline_latent(sharded_config(heads), None)
    for rank, per_rank in enumerate(results[world]):
        res = per_rank[name]
        finishes = not layout.get("stages") or ParallelConfig(**layout).coords(rank)["stage"] == 1
        if finishes:
            assert rel_err(res["latent"], ref) < RTOL, f"{name} rank {rank}: final latent differs"
        _check_bytes(res, f"{name} rank {rank}")


def test_layers_offload_where_it_is_needed_and_where_it_is_not():
    """4 x 4090 at 720p: no other mode fits, layers does; on one H100 the experts fit whole with the
    text encoder offloaded... not at 720p (78 GB), so layers is not refused there; at 480p they do,
    and the planner says layers only adds copies."""
    p = plan("wan2.2-t2v-a14b", 4, "4090", 1280, 720, 81)
    assert p.choice is not None and p.choice.offload == "layers" and p.choice.label() == "U1 R2 cfg2 offload layers"
    assert p.choice.mem_gb <= GPUS["4090"].usable_gb and 0 < p.choice.latency_s < 1e4
    assert all(c.offload == "layers" for c in p.feasible)
    one = plan("wan2.2-t2v-a14b", 1, "4090", 1280, 720, 81).choice      # CFG in turn: half the activations
    assert one is not None and one.label() == "U1 offload layers" and one.mem_gb <= GPUS["4090"].usable_gb
    small = plan("wan2.2-t2v-a14b", 1, "h100", 832, 480, 81, offload="layers").choice
    assert small is not None and "only adds copies" in small.note


def test_cli_offload_layers_with_sp(tmp_path):
    """The way users run it: the CLI under torchrun, two ranks of Ulysses, the experts streamed."""
    import json
    import subprocess
    import sys
    out = tmp_path / "v.mp4"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "paradit.generate", "--model", "tiny", "--offload", "layers", "--ulysses", "2", "--steps",
                          "2", "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["offload"] == "layers"


def test_layers_offload_streams_each_forward_of_cfg_in_turn():
    """CFG in turn (two batch-1 forwards a step) under layers offload: each forward streams the
    expert (the first one freed the blocks the second needs), and the latent is the batched run's."""
    from paradit.pipeline import Pipeline, tiny_components
    import torch
    cfg, kw = sharded_config(2), dict(output="latent", width=64, height=64, frames=5, steps=2, progress=False)
    ref = Pipeline(cfg, *tiny_components(cfg, "cpu", torch.float32)[:2], None)("a red circle", **kw)
    pipe = Pipeline(cfg, *tiny_components(cfg, "cpu", torch.float32)[:2], None,
                    parallel=ParallelConfig(cfg_mode="in-turn"))
    pipe.apply_offload("layers")
    assert pipe.runtime.batch_cfg is False
    assert rel_err(pipe("a red circle", **kw), ref) < RTOL
    streams = [op for _, op in pipe.residency.log if op == "stream"]
    assert len(streams) == 2 * 2                       # 2 steps x (cond, uncond)

"""Sharded weights (FSDP2 over the sp or the request group) compute what one device computes, and a
rank holds what paradit.parallel.sharding says: 1/group of each block, the embeddings and head
whole, and a window of two blocks gathered whole (the running one and the prefetched one).

Gloo worlds of 2, 4 and 8 CPU processes; the tiny model with 5 blocks, awkward head counts (3 heads
on 2 Ulysses ranks) and token counts no degree divides (45, 105); fp32.
"""
import pytest

from paradit.config import WanConfig
from paradit.demo.judge import rel_err
from paradit.launch import spawn
from paradit.plan import GPUS, ParallelConfig, plan
from shard_workers import bad_sharding_on_every_rank, chords_reference, sharded_config, table_run
from workers import model_output, pipeline_latent

# (world, name, layout, heads, grid of the model check)
TABLE = [
    (2, "U2 sp", dict(ulysses=2, shard_weights="sp"), 3, (3, 5, 3)),
    (2, "cfg2 request", dict(cfg=2, shard_weights="request"), 2, (3, 5, 3)),
    (4, "U2R2 sp", dict(ulysses=2, ring=2, shard_weights="sp"), 3, (3, 5, 7)),
    (4, "U2xCFG2 request", dict(ulysses=2, cfg=2, shard_weights="request"), 3, (3, 5, 3)),
    (4, "R2xDP2 request", dict(ring=2, dp=2, shard_weights="request"), 2, (3, 5, 7)),
    (8, "U2R2xCFG2 request", dict(ulysses=2, ring=2, cfg=2, shard_weights="request"), 3, (3, 5, 3)),
    (8, "R2xCFG2xDP2 sp", dict(ring=2, cfg=2, dp=2, shard_weights="sp"), 2, (3, 5, 3)),
]
# split stages: each stage shards its own expert over its own group (pipeline only)
SPLIT = [
    (4, "split 2+2 request", dict(experts="split", stages=((2, 1, 1), (1, 2, 1)), shard_weights="request"), 3),
    (4, "split 2+2 [cfg2 | U2] sp", dict(experts="split", stages=((1, 2, 1), (2, 1, 1)), shard_weights="sp"), 2),
]
CHORDS = [(4, "chords2 U2 sp", dict(chords=2, ulysses=2, shard_weights="sp"), 3, 2)]
# fp32, the same math in another order (split attention, LSE merges, uneven heads); the gathered
# weights are the very bytes of the whole ones, so sharding adds no error of its own. 1e-5 is two
# orders above the rounding seen (~1e-7) and far below any layout bug (>1e-2).
RTOL = 1e-5
A14B = WanConfig.preset("wan2.2-t2v-a14b")


@pytest.fixture(scope="module")
def results():
    def of(rows, world):
        return [r[1:] for r in rows if r[0] == world]
    worlds = sorted({r[0] for r in TABLE + SPLIT + CHORDS})       # one launch per world size
    return {w: spawn(table_run, w, of(TABLE, w), of(SPLIT, w), of(CHORDS, w), timeout_s=300) for w in worlds}


def _check_bytes(res: dict, what: str):
    assert res["peak"] == res["expected"]["peak"], f"{what}: held {res['peak']} B, predicted {res['expected']}"
    assert res["peak"] < res["whole"], f"{what}: sharding saved nothing"


@pytest.mark.parametrize("world,name,layout,heads,grid", TABLE, ids=[r[1] for r in TABLE])
def test_sharded_layout_matches_single_device(results, world, name, layout, heads, grid):
    cfg = sharded_config(heads)
    ref_out, ref_latent = model_output(cfg, grid, None), pipeline_latent(cfg, None)
    assert ref_out.abs().mean() > 1e-2 and ref_latent.abs().mean() > 1e-2   # real signal, not zeros
    for rank, per_rank in enumerate(results[world]):
        model, pipe = per_rank[name]
        assert rel_err(model["out"], ref_out) < RTOL, f"{name} rank {rank}: model output differs"
        assert rel_err(pipe["latent"], ref_latent) < RTOL, f"{name} rank {rank}: final latent differs"
        _check_bytes(model, f"{name} rank {rank} (model)")
        _check_bytes(pipe, f"{name} rank {rank} (pipeline)")
        assert model["after"] == model["expected"]["whole"] + model["expected"]["shards"], \
            f"{name} rank {rank}: blocks left gathered after the forward"


@pytest.mark.parametrize("world,name,layout,heads", SPLIT, ids=[r[1] for r in SPLIT])
def test_sharded_split_stages(results, world, name, layout, heads):
    ref = pipeline_latent(sharded_config(heads), None)
    for rank, per_rank in enumerate(results[world]):
        _, pipe = per_rank[name]
        stage = ParallelConfig(**layout).coords(rank)["stage"]
        assert (pipe["latent"] is None) == (stage == 0), f"{name} rank {rank}: the low stage finishes"
        if stage == 1:
            assert rel_err(pipe["latent"], ref) < RTOL, f"{name} rank {rank}: final latent differs"
        _check_bytes(pipe, f"{name} rank {rank}")


@pytest.mark.parametrize("world,name,layout,heads,cores", CHORDS, ids=[r[1] for r in CHORDS])
def test_sharded_chords(results, world, name, layout, heads, cores):
    ref = chords_reference(heads, cores)
    for rank, per_rank in enumerate(results[world]):
        _, pipe = per_rank[name]
        assert rel_err(pipe["latent"], ref) < RTOL, f"{name} rank {rank}: CHORDS latent differs"
        _check_bytes(pipe, f"{name} rank {rank}")


@pytest.mark.parametrize("layout,words", [
    (dict(dp=2, shard_weights="request"), "has one rank"),                         # a replica of one rank
    (dict(cfg=2, shard_weights="sp"), "has one rank"),                             # cfg2, but sp of one
    (dict(experts="split", stages=((1, 1, 1), (1, 1, 1)), shard_weights="request"), "has one rank"),
], ids=["dp2 request of one", "cfg2 sp of one", "split stage of one"])
def test_sharding_over_a_group_of_one_is_refused_on_every_rank(layout, words):
    errors = spawn(bad_sharding_on_every_rank, 2, layout, timeout_s=60)
    assert len(set(errors)) == 1 and words in errors[0] and "shard_weights=" in errors[0], errors


def test_request_sharding_across_chords_cores_is_refused():
    with pytest.raises(ValueError, match="CHORDS cores evaluate different steps"):
        ParallelConfig(chords=4, shard_weights="request").validate(4)
    with pytest.raises(ValueError, match="choose one of"):
        ParallelConfig(shard_weights="blocks")
    with pytest.raises(ValueError, match="planner's to resolve"):
        ParallelConfig(ulysses=2, shard_weights="auto").validate(2)


# ------------------------------------------------------------------ the planner
def test_planner_shards_where_whole_weights_leave_little_room():
    """8 x H100 at 720p: whole weights leave 12% of the allocator's memory (72 of 82 GB); the choice
    shards, keeps >= 20 GB spare, and its predicted step is within 3% of the whole-weights choice's.
    8 x a 72 GB H100 likewise; with half the memory spare (H200) whole weights stay, being faster."""
    for gpu in (GPUS["h100"], GPUS["h100"].replace(hbm_gb=72)):
        sharded = plan(A14B, 8, gpu, 1280, 720, 81)
        whole = plan(A14B, 8, gpu, 1280, 720, 81, shard_weights="none")
        c, limit = sharded.choice, gpu.usable_gb - sharded.problem.calibration.context_gb
        assert c.label() == "U8 shard:sp" and whole.choice.layout.shard_weights == "none", gpu
        assert limit - whole.choice.mem_gb < 0.25 * limit and limit - c.mem_gb >= 20
        assert c.step_s <= 1.03 * whole.choice.step_s
        assert c.breakdown.parts_s.weight_gather > 0        # the first block's gather, never hidden
    assert plan(A14B, 8, "h200", 1280, 720, 81).choice.layout.shard_weights == "none"


@pytest.mark.parametrize("gpus,gpu,label", [
    (8, "l40s", "U1 R4 cfg2 shard:sp"),          # within 3% of the idle expert in host memory, 11 GB more room
    (8, "a100-40g", "U4 cfg2 shard:request"),    # whole experts (57 GB) cannot fit 40 GB
    (4, "4090", "U1 R2 cfg2 offload layers"),    # nothing else fits 24 GB (tests/test_streaming.py)
], ids=["8xL40S", "8xA100-40G", "4x4090"])
def test_planner_fits_smaller_cards(gpus, gpu, label):
    p = plan(A14B, gpus, gpu, 1280, 720, 81)
    assert p.choice is not None and p.choice.label() == label
    assert p.choice.mem_gb <= GPUS[gpu].usable_gb and 0 < p.choice.latency_s < 1e4


def test_planner_memory_is_the_measured_count_at_full_size():
    """The planner's sharded weights equal paradit.parallel.sharding.held_bytes (the count the gloo
    tests measure) on the full-size A14B expert, built on the meta device."""
    import torch

    from paradit.models import WanTransformer
    from paradit.parallel.sharding import held_bytes
    from paradit.plan.sharding import weights_gb
    with torch.device("meta"):
        expert = WanTransformer(A14B).to(torch.bfloat16)
    for group in (2, 4, 8):
        held = held_bytes([expert, expert], group)["peak"] / 1e9
        assert weights_gb(A14B, 2, group) == pytest.approx(held, rel=1e-3), group


# ------------------------------------------------------------------ checkpoints: each rank reads its shards
def test_checkpoint_read_sharded(tmp_path):
    """Ulysses 2 with weights sharded over sp, from a checkpoint folder in both layouts: the latent
    of the whole-weights pipeline, and each rank read exactly the bytes it keeps (its shards of the
    blocks, the embeddings and head whole): about half the experts' bytes, not all of them."""
    from ckpt_workers import PROMPT, RUN, SIZE, TINY_T2V, components, write_checkpoint
    from paradit.pipeline import Pipeline
    from paradit.plan import param_parts
    from shard_workers import sharded_checkpoint_ranks
    root = write_checkpoint(tmp_path / "ckpt")
    ref = Pipeline(TINY_T2V, *components(TINY_T2V))(PROMPT, output="latent", **SIZE["t2v"], **RUN)
    parts = param_parts(TINY_T2V)
    blocks = 2 * TINY_T2V.num_layers * parts["block"] * 4              # two fp32 experts' blocks
    rest = 2 * (parts["embed"] + parts["head"]) * 4                    # read whole on every rank
    for rank, out in enumerate(spawn(sharded_checkpoint_ranks, 2, str(root), dict(ulysses=2, shard_weights="sp"),
                                     timeout_s=200)):
        for layout, res in out.items():
            assert res["sharded"] and rel_err(res["latent"], ref) < RTOL, f"rank {rank} {layout}"
            assert res["read"] == res["held"], f"rank {rank} {layout}: read {res['read']}, keeps {res['held']}"
            # half the blocks, give or take the rows of odd-sized tensors (torch.chunk's pieces)
            assert 0.4 * blocks < res["held"] - rest < 0.6 * blocks, f"rank {rank} {layout}: {res['held'] - rest}"


def test_scaling_bench_measures_weights_per_rank(tmp_path):
    """bench/scaling.py --shard-weights: a world of 2 sharded over sp holds the predicted weight
    bytes (measured from the tensors), its blocks' share half of one device's."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import scaling
    argv = ["--device", "cpu", "--preset", "tiny", "--layers", "8", "--size", "64x64", "--frames", "9", "--worlds",
            "1,2", "--layouts", "SP", "--shard-weights", "none,sp", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]
    assert scaling.main(argv) == 0
    (path,) = tmp_path.glob("*_scaling.json")
    points = {(p["world"], p["config"].get("shard_weights", "none")): p["weights_mb"]
              for p in json.loads(path.read_text())["points"]}
    one, whole, sharded = points[(1, "none")], points[(2, "none")], points[(2, "sp")]
    assert one["max"] == whole["max"] == pytest.approx(one["predicted"]["peak"], rel=1e-9)
    assert sharded["max"] == pytest.approx(sharded["predicted"]["peak"], rel=1e-9) and sharded["max"] < one["max"]
    blocks_one, blocks_two = one["predicted"]["shards"], sharded["predicted"]["shards"]
    assert blocks_two == pytest.approx(blocks_one / 2, rel=0.05)       # + dim-0 padding: (1, 6, D) modulations
    assert (tmp_path / path.name.replace(".json", "_weights.png")).exists()

"""Split expert stages give the colocated result; requests pipeline through the stages."""
import pytest

from paradit.config import WanConfig
from paradit.launch import spawn
from paradit.plan import ParallelConfig
from paradit.cli.layout import split_layout
from paradit.cli.spec import parse_args
from paradit.parallel.stages import Piece, transfer_plan
from paradit.plan.placement import stage_sizes
from paradit.schedulers.schedule import high_noise_steps
from workers import SPLIT_PROMPTS, pipeline_latent, split_run, tiny_config

# (stages: (ulysses, ring, cfg) of the high and low stage, heads) — the shards line up only in the first
TABLE = [
    (((1, 1, 1), (1, 1, 1)), 2),
    (((2, 1, 1), (1, 1, 1)), 3),   # U2 (3 heads on 2) hands off to one rank
    (((1, 1, 2), (1, 2, 1)), 2),   # CFG2 hands off to R2: a re-shard
]
RTOL = 1e-5  # fp32, same math in a different order (split attention, split CFG): rounding only


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("stages,heads", TABLE, ids=["1+1", "2+1", "2+2"])
def test_split_equals_colocated_and_pipelines(stages, heads):
    world = sum(u * r * c for u, r, c in stages)
    results = spawn(split_run, world, heads, stages, timeout_s=240)
    refs = [pipeline_latent(tiny_config(heads), None, prompt=p, steps=12) for p in SPLIT_PROMPTS]
    for res in results:
        assert res["loaded"] == [res["stage"] == 0, res["stage"] == 1], "a stage built the other expert"
        if res["stage"] == 1:
            assert sorted(res["latents"]) == [0, 1, 2]
            for i, ref in enumerate(refs):
                assert rel_err(res["latents"][i], ref) < RTOL, f"rank {res['rank']} request {i}"
    high = {i: (a, b) for i, st, a, b in results[0]["spans"]}
    low = {i: (a, b) for i, st, a, b in results[-1]["spans"]}
    # the high stage starts request i+1 before the low stage has finished request i: it does not wait
    # for it (run in turn, it would). Not also that the two spans overlap: a tiny request takes ~20 ms,
    # and on a loaded machine the hand-off alone took 40 ms, so the high stage was done before the
    # low one began.
    assert any(high[i + 1][0] < low[i][1] for i in range(2)), (high, low)


def test_transfer_plan_covers_every_token_once():
    split = ParallelConfig(experts="split", stages=((2, 1, 2), (1, 3, 1)))
    pieces = transfer_plan(45, split)
    assert {p.src for p in pieces} <= {0, 1}                # only the cfg-0 ranks of the high stage send
    for dst in (4, 5, 6):
        cover = sorted((p.start, p.end) for p in pieces if p.dst == dst)
        assert cover[0][0] == [0, 15, 30][dst - 4] and cover[-1][1] == [15, 30, 45][dst - 4]
        assert all(a[1] == b[0] for a, b in zip(cover, cover[1:]))  # contiguous, no overlap
    lined_up = ParallelConfig(experts="split", stages=((2, 1, 1), (2, 1, 1)))
    assert transfer_plan(45, lined_up) == [Piece(0, 2, 0, 23), Piece(1, 3, 23, 45)]  # rank to rank


def test_stage_sizes_follow_the_step_split():
    t2v, i2v = WanConfig.preset("wan2.2-t2v-a14b"), WanConfig.preset("wan2.2-i2v-a14b")
    n_t2v = high_noise_steps(t2v.boundary, 40, t2v.shift)
    n_i2v = high_noise_steps(i2v.boundary, 40, i2v.shift)
    assert (n_t2v, n_i2v) == (26, 15)
    assert stage_sizes(8, n_t2v, 40) == (5, 3) and stage_sizes(8, n_i2v, 40) == (3, 5)
    assert stage_sizes(40, n_t2v, 40) == (26, 14) and stage_sizes(40, n_i2v, 40) == (15, 25)
    assert high_noise_steps(None, 50, 5.0) == 50    # one expert: all steps


def test_bad_split_layouts():
    with pytest.raises(ValueError, match="stages"):        # stage sizes come from the step split, at build
        ParallelConfig(experts="split").validate(2, 40)
    with pytest.raises(ValueError, match="need experts='split'"):
        ParallelConfig(stages=((1, 1, 1), (1, 1, 1)))
    with pytest.raises(ValueError, match="per stage"):
        ParallelConfig(ulysses=2, experts="split", stages=((1, 1, 1), (1, 1, 1)))
    with pytest.raises(ValueError, match="needs 3 processes"):
        ParallelConfig(experts="split", stages=((2, 1, 1), (1, 1, 1))).validate(4, 40)
    with pytest.raises(ValueError, match="dp=2: with split experts"):  # a layout the planner ranks, not run
        ParallelConfig(dp=2, experts="split", stages=((1, 1, 1), (1, 1, 1))).validate(4, 40)
    with pytest.raises(ValueError, match="one expert"):
        split_layout(parse_args(["--experts", "split"]), WanConfig.preset("wan2.1-t2v-14b"), 2, None)

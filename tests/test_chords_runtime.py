"""CHORDS with every core a sequence/CFG-parallel group gives the emulation's hits, exactly."""
import pytest
import torch

from paradit.config import WanConfig
from paradit.engine import Stopped
from paradit.launch import spawn
from paradit.models.transformer import patchify
from paradit.parallel.collectives import even_split
from paradit.cli.flags import parse_stop
from paradit.demo.judge import rel_err
from paradit.pipeline import Pipeline, tiny_components
from paradit.settings import ChordsSettings, chords_layout
from paradit.plan.placement import chords_experts
from paradit.schedulers.chords_schedule import count_nfe
from paradit.schedulers.schedule import high_noise_steps
from workers import PIPE_KW, PROMPT, chords_hits, chords_hits_per_stop, pipeline_latent, tiny_config

# (world, layout, cores, heads): each core group is the layout without its chords axis
TABLE = [
    (4, dict(chords=2, ulysses=2), 2, 3),
    (4, dict(chords=2, cfg=2), 2, 2),
    (4, dict(chords=4), 4, 2),
    (8, dict(chords=2, ring=2, cfg=2), 2, 2),
]
RTOL = 1e-5  # fp32, the same Euler controller, split attention: rounding only (as in test_parallel)


@pytest.fixture(scope="module")
def emulated():
    return {(cores, heads): chords_hits(dict(heads=heads), None, cores, None)[0]
            for _, _, cores, heads in TABLE}


def _check_same_hits(got, ref, what):
    assert [h[:3] for h in got] == [h[:3] for h in ref], f"{what}: different cores / rounds"
    for (core, rnd, _, lat), (_, _, _, ref_lat) in zip(got, ref):
        assert rel_err(lat, ref_lat) < RTOL, f"{what}: hit of core {core} at round {rnd} differs"


@pytest.mark.parametrize("world", sorted({r[0] for r in TABLE}))
def test_distributed_cores_match_emulation(world, emulated):
    for _, layout, cores, heads in [r for r in TABLE if r[0] == world]:
        results = spawn(chords_hits, world, dict(heads=heads), layout, cores, None, timeout_s=240)
        for rank, (hits, _) in enumerate(results):
            _check_same_hits(hits, emulated[(cores, heads)], f"{layout} rank {rank}")


def test_last_hit_is_the_sequential_euler_result(emulated):
    seq = pipeline_latent(tiny_config(2), None, sampler="euler", steps=8)
    hits = emulated[(4, 2)]
    assert hits[0][2] and not any(h[2] for h in hits[1:])  # the preview comes first, once
    assert rel_err(hits[-1][3], seq) < 1e-6  # identical Euler arithmetic in the same order
    assert rel_err(hits[0][3], seq) > 1e-2   # the preview is coarse: the check can fail


def test_a_core_below_the_boundary_never_loads_the_high_noise_expert():
    cfg = WanConfig.preset("tiny")  # 8 steps at shift 12: t = 999 .. 877 high-noise, 799, 631 low
    needed = chords_experts([0, 6], 8, high_noise_steps(cfg.boundary, 8, cfg.shift), None)
    assert list(needed) == [{0, 1}, {1}]
    results = spawn(chords_hits, 2, dict(heads=2), dict(chords=2), 2, None, needed, (0, 6), timeout_s=120)
    (hits0, loaded0), (hits1, loaded1) = results
    assert loaded0 == [True, True] and loaded1 == [False, True]
    _check_same_hits(hits1, hits0, "core 1 vs core 0 view")


def test_bad_settings():
    with pytest.raises(ValueError, match="hit:M"):
        parse_stop("first")
    with pytest.raises(ValueError, match="needs at least as many steps"):
        ChordsSettings(8).validate(steps=4, mesh_cores=1)
    with pytest.raises(ValueError, match="start at 0|strictly increasing|0"):
        ChordsSettings(2, init=(1, 3)).validate(steps=8, mesh_cores=1)
    with pytest.raises(ValueError, match="core groups"):
        ChordsSettings(4).validate(steps=8, mesh_cores=2)
    with pytest.raises(ValueError):
        ChordsSettings(2, stop=3).validate(steps=8, mesh_cores=1)
    with pytest.raises(ValueError, match="the world has 6"):
        chords_layout(ChordsSettings(4), world=6, inner=2)
    assert chords_layout(ChordsSettings(4), world=8, inner=2) == 4
    assert chords_layout(ChordsSettings(4), world=2, inner=2) == 1


def test_on_step_runs_after_every_round_and_stops_the_request_there():
    """The hook the server's cancel uses (paradit.serve.engine.Worker.on_step) runs after every CHORDS
    round, as after every sequential step; raised Stopped ends the request at that round, its
    later rounds never evaluated; the pipeline then runs the next request."""
    cfg, chords, steps = tiny_config(2), ChordsSettings(2), 8
    pipe = Pipeline(cfg, *tiny_components(cfg, "cpu", torch.float32)[:2], None)
    seen = []
    pipe.on_step = lambda i, seconds: seen.append(i)
    whole = pipe(PROMPT, output="latent", chords=chords, **(PIPE_KW | dict(steps=steps)))
    assert seen == list(range(pipe.record.chords.rounds)) and len(seen) > 2

    def stop_at_round_3(i, seconds):
        if i == 2:
            raise Stopped("stopped at round 3")
    pipe.on_step = stop_at_round_3
    with pytest.raises(Stopped):
        pipe(PROMPT, output="latent", chords=chords, **(PIPE_KW | dict(steps=steps)))
    assert len(pipe.record.trace) == count_nfe(chords.resolve_init(steps), steps, 3)   # rounds 1-3 evaluated
    pipe.on_step = None
    assert torch.equal(pipe(PROMPT, output="latent", chords=chords, **(PIPE_KW | dict(steps=steps))), whole)



RESIDUAL_CORES, RESIDUAL_HEADS = 3, 3   # 3 cores: the 2nd real hit can stop a run before core 0's (2 cannot)


@pytest.fixture(scope="module")
def residual_stops():
    """Two residual thresholds and one process's hits under each. One tau lies between the two token
    shards' own residuals (2 ulysses ranks): a rank deciding from its shard alone would stop while the
    other ran on into the next round's collectives. The other lies just below the whole latent's
    residual: a sum that counted a shard's copies in other core groups too would fall below it."""
    cfg = tiny_config(RESIDUAL_HEADS)
    whole = chords_hits(dict(heads=RESIDUAL_HEADS), None, RESIDUAL_CORES, None)[0]
    real = [patchify(lat[None], cfg.patch)[0].double() for _, _, preview, lat in whole if not preview]
    diff = real[1] - real[0]                                    # (45 tokens, P*C): hit 2 - hit 1
    shards = torch.split(diff, even_split(diff.shape[0], 2))   # the two ulysses ranks' tokens
    res = sorted(d.norm().item() / d.numel() for d in shards)
    residual = diff.norm().item() / diff.numel()
    # margins of ~1%: the layouts' hits differ by fp32 rounding, ~1e-4 of this small difference
    taus = [(res[0] * res[1]) ** 0.5, 0.99 * residual]
    assert residual < res[0] < taus[0] < res[1] and res[1] / res[0] > 1.02
    # one process stops at the 2nd real hit under taus[0]; under taus[1], below the only residual
    # compared before core 0's hit, it runs on to core 0's as with no stop (test_chords.py: stop=tau)
    refs = [chords_hits(dict(heads=RESIDUAL_HEADS), None, RESIDUAL_CORES, taus[0])[0], whole]
    assert [h[:3] for h in refs[0]] == [h[:3] for h in whole[:3]] and whole[-1][0] == 0
    return taus, refs


@pytest.mark.parametrize("world, layout", [(2, dict(ulysses=2)), (6, dict(chords=3, ulysses=2))])
def test_a_residual_stop_is_decided_on_the_whole_latent_by_every_rank(world, layout, residual_stops):
    """residual:TAU compares the whole latent's residual, as one process does, on every rank of the
    request (its sequence-parallel group, and every core group), so all stop after the same hit."""
    taus, refs = residual_stops
    for rank, per_tau in enumerate(spawn(chords_hits_per_stop, world, dict(heads=RESIDUAL_HEADS), layout,
                                         RESIDUAL_CORES, taus, timeout_s=60)):
        for tau, hits, ref in zip(taus, per_tau, refs):
            _check_same_hits(hits, ref, f"{layout} tau={tau:.3e} rank {rank}")

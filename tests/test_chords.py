"""CHORDS controller (paradit/schedulers/chords.py) on a linear flow ODE, in float64.

The ODE: v(x, sigma) = x A^T + sigma b with a fixed random A, b, on Wan's shifted flow grid.
Sequential Euler over the grid, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i), is the
reference the last hit must reproduce; it is written out here independently of the module.
"""

import pytest
import torch
from torch.testing import assert_close

from paradit.schedulers.chords_schedule import PAPER_INIT, PAPER_STEPS
from paradit.schedulers.chords import (
    Chords,
    init_sequence,
    rectify,
    rounds_to_first_hit,
    validate_init,
)

D = 8  # state width: small, the algorithm is shape-agnostic


def flow_sigmas(n: int, shift: float = 5.0) -> list[float]:
    """Wan's shifted flow schedule: sigma = shift s / (1 + (shift - 1) s), s from 1 to 0."""
    s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).tolist()


def make_problem(n: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(D, D, generator=g, dtype=torch.float64) * 0.3 - 0.5 * torch.eye(D, dtype=torch.float64))
    b = torch.randn(D, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, D, generator=g, dtype=torch.float64).to(dtype)
    sigmas = flow_sigmas(n)

    def v(x: torch.Tensor, i: int) -> torch.Tensor:
        return x @ a.to(x.dtype).T + sigmas[i] * b.to(x.dtype)

    return sigmas, x0, v


def euler(sigmas, x, v):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * v(x, i)
    return x


class Recorder:
    """velocity() that evaluates a round's points one after another, recording each round."""

    def __init__(self, v, out_dtype=None):
        self.v, self.out_dtype, self.calls, self.dtypes = v, out_dtype, [], set()

    def __call__(self, points):
        self.calls.append([i for i, _ in points])
        self.dtypes.update(x.dtype for _, x in points)
        out = [self.v(x, i) for i, x in points]
        return [o.to(self.out_dtype) for o in out] if self.out_dtype else out


def run_all(n, init, stop=None):
    sigmas, x0, v = make_problem(n)
    ch = Chords(sigmas, init)
    rec = Recorder(v)
    hits = list(ch.run(rec, x0, stop=stop))
    return ch, rec, hits, euler(sigmas, x0, v)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_last_hit_is_sequential_euler(k):
    ch, rec, hits, ref = run_all(PAPER_STEPS, k)
    last = hits[-1]
    assert (last.core, last.preview, last.round) == (0, False, PAPER_STEPS)
    assert last.x.dtype == torch.float64  # fp64 input stays fp64
    # Core 0 is never rectified: it performs the very same fp64 operations as `euler`, so any
    # difference is rounding only (50 steps of O(1) values: 1e-12 is ~1e4 ulp of headroom).
    assert_close(last.x, ref, rtol=1e-12, atol=1e-12)


def test_single_core_is_sequential_euler_in_n_rounds():
    n = 12
    ch, rec, hits, ref = run_all(n, [0])
    assert len(rec.calls) == n and all(c == [i] for i, c in enumerate(rec.calls))
    preview, real = hits
    assert preview.preview and preview.round == 1  # the one-step jump from the noise
    assert (real.core, real.round, real.nfe) == (0, n, n)
    assert_close(real.x, ref, rtol=1e-12, atol=1e-12)  # same operations as `euler`


@pytest.mark.parametrize("k, expected", [(2, None), (4, 21), (8, 17)])
def test_first_hit_and_preview_rounds(k, expected):
    init = list(PAPER_INIT[k]) if k in PAPER_INIT else init_sequence(k, PAPER_STEPS)
    ch, rec, hits, _ = run_all(PAPER_STEPS, init, stop=1)
    first = (PAPER_STEPS - init[-1]) + (k - 1)
    assert rounds_to_first_hit(init, PAPER_STEPS) == first
    if expected is not None:
        assert first == expected  # the paper's figures for its sequences
    preview, real = hits
    assert preview.preview and preview.core == k - 1 and preview.round == k == ch.preview_round()
    assert not real.preview and real.core == k - 1 and real.round == first
    assert len(rec.calls) == first  # stop=1 makes no call after the first real hit


# the paper's sequences, K=2's default, and one with adjacent starts (simultaneous retirements)
@pytest.mark.parametrize("init", [[0, 24], *map(list, PAPER_INIT.values()), [0, 1, 2, 9], [0, 1, 5, 6, 7, 49]])
def test_schedule_matches_calls_and_nfe(init):
    ch, rec, hits, _ = run_all(PAPER_STEPS, init)
    sched = ch.schedule()
    assert rec.calls == [[i for _, i in pairs] for pairs in sched]
    # active cores are always a prefix 0..m-1, listed in core order
    assert [[c for c, _ in pairs] for pairs in sched] == [list(range(len(p))) for p in sched]
    for hit in hits:
        assert hit.nfe == ch.nfe(hit.round) == sum(len(c) for c in rec.calls[: hit.round])
    assert [(h.core, h.round) for h in hits if not h.preview] == ch.hit_rounds()
    for c, idx in enumerate(ch.core_indices()):
        assert idx == set(range(init[c], PAPER_STEPS))
    # truncated to the first hit: what a stop=1 runtime needs to load
    r1 = ch.rounds_to_first_hit()
    assert ch.rounds_for(1) == r1 and ch.rounds_for(None) == PAPER_STEPS and ch.rounds_for(1e-3) is None
    _, rec1, _, _ = run_all(PAPER_STEPS, init, stop=1)
    assert rec1.calls == [[i for _, i in pairs] for pairs in ch.schedule(r1)]
    assert max(ch.core_indices(r1)[0]) == r1 - 1


@pytest.mark.parametrize("k", [2, 4, 8])
def test_hits_stream_fastest_first_and_improve(k):
    ch, rec, hits, ref = run_all(PAPER_STEPS, k)
    assert hits[0].preview and sum(h.preview for h in hits) == 1
    real = [h for h in hits if not h.preview]
    assert [h.core for h in real] == list(reversed(range(k)))
    assert all(a.round <= b.round for a, b in zip(real, real[1:]))
    errors = [(h.x - ref).norm().item() for h in hits]  # preview first
    # Strictly better until a hit is exact: on a linear ODE, a core rectified by an exact slower
    # core becomes exact itself (with K=8, cores 3..0 all return the sequential result), so
    # from there on the error stays at rounding level (1e-10 is far below the 1e-9..1 steps).
    assert all(b < a or a < 1e-10 and b < 1e-10 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10


def test_stop_int():
    for m in (1, 2, 3):
        ch, rec, hits, _ = run_all(PAPER_STEPS, 4, stop=m)
        real = [h for h in hits if not h.preview]
        assert len(real) == m
        assert len(rec.calls) == real[-1].round == ch.hit_rounds()[m - 1][1] == ch.rounds_for(m)


def test_stop_residual():
    res = _residuals(8)
    # pick tau between two residuals: the run must stop at the first real hit j with res < tau
    tau = sorted(res)[len(res) // 2] * 1.0001
    expect = 1 + next(j for j, r in enumerate(res, start=1) if r < tau)
    _, rec, got, _ = run_all(PAPER_STEPS, 8, stop=tau)
    got_real = [h for h in got if not h.preview]
    assert len(got_real) == expect < 8
    assert len(rec.calls) == got_real[-1].round
    # the preview is not compared: a tau above every residual, preview's included, stops at
    # the 2nd real hit (the official code, comparing hit 1 with the preview, stops at the 1st)
    _, _, got, _ = run_all(PAPER_STEPS, 4, stop=1e6)
    assert [h.core for h in got] == [3, 3, 2]
    # a tau just below every residual runs to core 0
    _, _, got, _ = run_all(PAPER_STEPS, 4, stop=min(res4 := _residuals(4)) * 0.5)
    assert got[-1].core == 0 and len([h for h in got if not h.preview]) == 4 and min(res4) > 0


def _residuals(k):
    _, _, hits, _ = run_all(PAPER_STEPS, k)
    real = [h.x for h in hits if not h.preview]
    return [torch.linalg.vector_norm(b - a).item() / a.numel() for a, b in zip(real, real[1:])]


@pytest.mark.parametrize(
    "stop, msg", [(0, "1 <= stop <= 4"), (5, "1 <= stop <= 4"), (-1.0, "positive"), (True, "stop must be")]
)
def test_stop_validation(stop, msg):
    sigmas, x0, v = make_problem(10)
    with pytest.raises(ValueError, match=msg):
        next(Chords(sigmas, 4).run(Recorder(v), x0, stop=stop))


@pytest.mark.parametrize(
    "init, cores, msg",
    [
        ([0, 8, 8, 32], None, r"strictly increasing.*\(8 then 8\)"),
        ([0, 16, 8, 32], None, r"strictly increasing.*\(16 then 8\)"),
        ([1, 8, 16, 32], None, r"must start at 0"),
        ([0, 8, 16, 50], None, r"below N=50"),
        ([0, 8, 16, 60], None, r"below N=50"),
        ([0, 8, 16], 4, r"3 start indices but there are K=4 cores"),
        ([], None, r"empty"),
        ([0, 8.0], None, r"integer"),
    ],
)
def test_init_validation(init, cores, msg):
    with pytest.raises(ValueError, match=msg) as err:
        Chords(flow_sigmas(50), init, num_cores=cores)
    if init:
        assert "init_sequence(" in str(err.value)  # says what would work


def test_sigmas_and_k_validation():
    with pytest.raises(ValueError, match="end in 0"):
        Chords([1.0, 0.5, 0.1], [0, 1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        Chords([1.0, 1.0, 0.0], [0, 1])
    with pytest.raises(ValueError, match="K <= N"):
        init_sequence(9, 8)
    with pytest.raises(ValueError, match="K <= N"):
        Chords(flow_sigmas(4), 5)


def test_init_sequence_paper_and_rescaled():
    for k, seq in PAPER_INIT.items():
        assert init_sequence(k, PAPER_STEPS) == list(seq)
    assert init_sequence(1, 50) == [0]
    for n in (40, 8, 20, 100):
        for k in range(1, min(n, 8) + 1):
            seq = init_sequence(k, n)
            assert validate_init(seq, n, k) == seq  # strictly increasing, from 0, last < N, length K
        if n >= 8:
            # the flavour: spacing never shrinks much (rounding moves an index by <= 1)
            seq = init_sequence(8, n)
            gaps = [b - a for a, b in zip(seq, seq[1:])]
            assert all(g2 >= g1 - 1 for g1, g2 in zip(gaps, gaps[1:])), seq
    assert init_sequence(4, 40) == [0, 6, 13, 26]  # 50-step paper sequence times 40/50, rounded
    assert init_sequence(8, 8) == list(range(8))


def test_bf16_velocities_keep_fp32_controller():
    n = 20
    sigmas, x0, v = make_problem(n, dtype=torch.bfloat16)
    rec = Recorder(v, out_dtype=torch.bfloat16)
    hits = list(Chords(sigmas, 4).run(rec, x0))
    assert rec.dtypes == {torch.float32}
    assert all(h.x.dtype == torch.float32 for h in hits)
    # Reference: fp32 Euler on bf16-rounded velocities. fp32 arithmetic matches it to fp32
    # rounding (~1e-6 over 20 steps); bf16 arithmetic would be off by ~1e-2.
    x = x0.float()
    for i in range(n):
        x = x + (sigmas[i + 1] - sigmas[i]) * v(x, i).to(torch.bfloat16).float()
    assert_close(hits[-1].x, x, rtol=1e-5, atol=1e-5)


def _transcript(sigmas, init, x0, v):
    """Run the controller; return {(core, round, preview): x} of all hits, in yield order."""
    hits = Chords(sigmas, init).run(lambda pts: [v(x, i) for i, x in pts], x0)
    return {(h.core, h.round, h.preview): h.x for h in hits}


def test_two_cores_by_hand():
    """Every round of K=2, N=5, init [0, 2] written out by hand from the paper's algorithm, on a nonlinear ODE."""
    s = [1.0, 0.8, 0.55, 0.4, 0.2, 0.0]

    def v(x, i):
        return torch.sin(3 * x) + s[i]

    def P(x, a, b):  # Euler jump a -> b with the velocity at (x, a)
        return x + (s[b] - s[a]) * v(x, a)

    x0 = torch.tensor([0.7], dtype=torch.float64)
    x = [x0]
    for i in range(5):
        x.append(P(x[i], i, i + 1))
    y2 = P(x0, 0, 2)                                     # round 1: core 0 at 0 spawns core 1 at 2
    preview = P(y2, 2, 5)                                # round 2: core 1 at its start: hit 0
    y3 = P(y2, 2, 3)                                     # round 2: anchor 2 != 1, fine step
    y4 = P(y3, 3, 4) - P(y2, 2, 4) + P(x[2], 2, 4)       # round 3: core 0 evaluated 2 == anchor
    y5 = P(y4, 4, 5)                                     # round 4: anchor 4 != 3, fine step: hit
    want = {(1, 2, True): preview, (1, 4, False): y5, (0, 5, False): x[5]}
    got = _transcript(s, [0, 2], x0, v)
    assert got.keys() == want.keys()
    for key in want:  # same operations up to the order of the rectification's additions: 1e-14
        assert_close(got[key], want[key], rtol=1e-14, atol=1e-14)


def test_three_cores_by_hand():
    """K=3, N=6, init [0, 2, 3]: chained rectifications and two cores retiring in one round."""
    s = [1.0, 0.9, 0.7, 0.5, 0.35, 0.15, 0.0]

    def v(x, i):
        return torch.cos(2 * x) - s[i] * x

    def P(x, a, b):
        return x + (s[b] - s[a]) * v(x, a)

    x0 = torch.tensor([-0.4], dtype=torch.float64)
    x = [x0]
    for i in range(6):
        x.append(P(x[i], i, i + 1))
    y2 = P(x0, 0, 2)                                     # r1: core 0 spawns core 1 at 2
    z3 = P(y2, 2, 3)                                     # r2: core 1 at its start spawns core 2 at 3
    y3 = P(y2, 2, 3)                                     # r2: core 1 fine step
    preview = P(z3, 3, 6)                                # r3: core 2 at its start
    y4 = P(y3, 3, 4) - P(y2, 2, 4) + P(x[2], 2, 4)       # r3: core 0 evaluated core 1's anchor 2
    z4 = P(z3, 3, 4) - P(z3, 3, 4) + P(y3, 3, 4)         # r3: core 1 evaluated core 2's anchor 3
    y5 = P(y4, 4, 5)                                     # r4: core 1 fine (anchor 4, core 0 at 3)
    z5 = P(z4, 4, 5) - P(z4, 4, 5) + P(y4, 4, 5)         # r4: core 1 evaluated core 2's anchor 4
    y6 = P(y5, 5, 6) - P(y4, 4, 6) + P(x[4], 4, 6)       # r5: core 0 evaluated core 1's anchor 4
    z6 = P(z5, 5, 6) - P(z5, 5, 6) + P(y5, 5, 6)         # r5: core 1 evaluated core 2's anchor 5
    want = {(2, 3, True): preview, (2, 5, False): z6, (1, 5, False): y6, (0, 6, False): x[6]}
    got = _transcript(s, [0, 2, 3], x0, v)
    assert list(got) == list(want)  # order too: fastest first within round 5
    for key in want:  # same operations up to the order of the rectification's additions: 1e-14
        assert_close(got[key], want[key], rtol=1e-14, atol=1e-14)


def test_rectify_is_the_three_jump_formula():
    g = torch.Generator().manual_seed(1)
    x_f, v_f, x_b, v_b, x_p, v_p = torch.randn(6, 5, generator=g, dtype=torch.float64)
    s_b, s_f, s_n = 0.9, 0.6, 0.55

    def jump(x, v, sa, sb):
        return x + (sb - sa) * v

    want = jump(x_f, v_f, s_f, s_n) - jump(x_b, v_b, s_b, s_n) + jump(x_p, v_p, s_b, s_n)
    # algebraically equal; only the order of fp64 additions differs (O(1) values: 1e-14)
    assert_close(rectify(x_f, v_f, x_b, v_b, x_p, v_p, s_b, s_f, s_n), want, rtol=1e-14, atol=1e-14)

"""Flow samplers: parity with diffusers, Wan schedule facts, state round trips, token-space shards."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from paradit.schedulers import FlowEulerScheduler, FlowUniPCScheduler, wan_sigmas, wan_timesteps
from paradit.schedulers.sigmas import wan_schedule

SCHEDULERS = [FlowUniPCScheduler, FlowEulerScheduler]


# ---- a deterministic stand-in for the DiT -------------------------------------------------------
class MixModel:
    """v = tanh(W x over channels) + b * t / 1000: nonlinear, mixes channels, depends on t; never 0."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = (torch.randn(shape[1], shape[1], generator=g) / 2).to(dtype)  # (C, C)
        self.b = torch.randn(shape, generator=g).to(dtype)  # like x

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return torch.tanh(torch.einsum("oc,bc...->bo...", self.w, x)) + self.b * (t / 1000.0)


class RowModel:
    """Row-local model for token-space shards [L, C]: v = tanh(a * x) + b * t / 1000, a, b like x."""

    def __init__(self, shape: tuple[int, ...], seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    def __call__(self, x: torch.Tensor, t: int, rows: slice = slice(None)) -> torch.Tensor:
        return torch.tanh(self.a[rows] * x) + self.b[rows] * (t / 1000.0)


def noise(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(sched, model, x: torch.Tensor, steps: range | None = None) -> torch.Tensor:
    """Run the given steps (default: all that are left) of sched's trajectory from x."""
    steps = range(sched.step_index, sched.num_inference_steps) if steps is None else steps
    for i in steps:
        t = int(sched.timesteps[i])
        x = sched.step(model(x, t), t, x)
    return x


def diffusers_unipc(sigmas: torch.Tensor, order: int = 2) -> UniPCMultistepScheduler:
    """diffusers' UniPC as the original Wan configures it, on our sigmas [N + 1]."""
    d = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=order, predict_x0=True,
        solver_type="bh2", lower_order_final=True, num_train_timesteps=1000,
        flow_shift=1.0,  # our sigmas are already shifted; shift 1 maps s -> s / 1 exactly
    )
    # It takes the N sigmas without the final 0 and (in 0.42) needs an ndarray: a list fails in the shift.
    d.set_timesteps(sigmas=sigmas[:-1].numpy())
    d.set_begin_index(0)
    return d


def run_diffusers(d, model, x: torch.Tensor) -> torch.Tensor:
    for t in d.timesteps:
        x = d.step(model(x, int(t)), t, x).prev_sample
    return x


# ---- parity with diffusers -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps,shift,order", [(40, 12.0, 2), (10, 5.0, 2), (3, 5.0, 2), (1, 5.0, 2), (10, 5.0, 3)]
)
def test_unipc_matches_diffusers_fp64(steps, shift, order):
    ours = FlowUniPCScheduler(shift=shift, order=order)
    ours.set_timesteps(steps)
    d = diffusers_unipc(ours.sigmas, order)
    assert torch.equal(d.timesteps, ours.timesteps)  # both truncate 1000 * sigma of the float64 values
    d.sigmas = ours.sigmas.clone()  # diffusers stores float32 sigmas; give it ours so both solve in fp64
    shape = (1, 4, 3, 5)
    model, x = MixModel(shape, torch.float64), noise(shape, torch.float64)
    got, want = run(ours, model, x), run_diffusers(d, model, x)
    # Same algorithm in float64; the only differences are libm log/expm1 and the order of a few
    # additions (measured <= 1 ulp, ~4e-16 on values ~3). A 1% error in one corrector coefficient
    # moves the result by ~5e-4, so 1e-12 catches any algorithmic slip.
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps,shift", [(40, 12.0), (10, 5.0), (3, 5.0)])
def test_unipc_matches_diffusers_fp32_native(steps, shift):
    # float32-representable sigmas so diffusers (which stores them in float32) sees the same values
    ours = FlowUniPCScheduler(shift=shift)
    ours.set_timesteps(sigmas=wan_sigmas(steps, shift).float().double())
    d = diffusers_unipc(ours.sigmas)
    assert torch.equal(d.sigmas.double(), ours.sigmas)
    shape = (1, 4, 3, 5)
    model, x = MixModel(shape, torch.float32), noise(shape)
    got, want = run(ours, model, x), run_diffusers(d, model, x)
    assert got.dtype == want.dtype == torch.float32
    # diffusers computes the step coefficients in float32, we in float64: measured <= 7e-7 on values
    # ~3 (a few fp32 ulps); 1e-5 leaves margin and is still 50x below the ~5e-4 that a 1% error in
    # one corrector coefficient causes.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps,shift", [(40, 12.0), (10, 5.0), (3, 5.0)])
def test_euler_matches_diffusers(steps, shift):
    ours = FlowEulerScheduler(shift=shift)
    ours.set_timesteps(sigmas=wan_sigmas(steps, shift).float().double())
    d = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    d.set_timesteps(sigmas=ours.sigmas[:-1].numpy())
    assert torch.equal(d.sigmas.double(), ours.sigmas)
    shape = (1, 4, 3, 5)
    model, x = MixModel(shape, torch.float32), noise(shape)
    got = run(ours, model, x)
    want = x
    for t_ours, t_d in zip(ours.timesteps, d.timesteps):  # diffusers' timesteps are float 1000 * sigma
        want = d.step(model(want, int(t_ours)), t_d, want).prev_sample
    # Exact: our float64 dt = sigma_next - sigma rounds to the same float32 as diffusers' float32
    # subtraction of the same (float32) sigmas, and the update x + dt * v is one mul and one add.
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the Wan schedule ----------------------------------------------------------------------------
def test_t2v_a14b_schedule_facts():
    t = wan_timesteps(40, 12.0)
    assert t.dtype == torch.int64 and t.shape == (40,)
    assert t[:6].tolist() == [999, 997, 995, 993, 990, 988]
    assert int((t >= 875).sum()) == 26  # high-noise expert steps (boundary 0.875)


def test_i2v_a14b_schedule_facts():
    assert int((wan_timesteps(40, 5.0) >= 900).sum()) == 15  # boundary 0.900


def test_schedule_shape_and_original_sigma_max():
    s = wan_sigmas(50, 5.0)
    assert s.dtype == torch.float64 and s.shape == (51,) and float(s[-1]) == 0.0
    assert bool((s[1:] < s[:-1]).all())
    # The original's base table is float32, so it starts at float32(0.999); with shift 1 that
    # shows in the timesteps where 1000 * sigma is an integer (0.999 would give 665, 332).
    assert float(s[0]) < 1.0
    assert wan_timesteps(3, 1.0).tolist() == [999, 666, 333]


def test_explicit_sigmas_reproduce_the_schedule():
    a, b = FlowUniPCScheduler(shift=12.0), FlowUniPCScheduler(shift=3.0)
    a.set_timesteps(40)
    b.set_timesteps(sigmas=a.sigmas)  # used as given: b's own shift is not applied again
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps)


@pytest.mark.parametrize("bad,match", [
    ([0.9, 0.5], "end in 0"),
    ([0.5, 0.9, 0.0], "strictly decreasing"),
    ([0.9, 0.9, 0.0], "strictly decreasing"),
    ([0.0], "N \\+ 1 >= 2"),
    ([1.0, 0.5, 0.0], "sigma < 1"),
])
def test_bad_sigmas_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        FlowUniPCScheduler().set_timesteps(sigmas=bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="steps must be"):
        FlowUniPCScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="exactly one"):
        FlowUniPCScheduler().set_timesteps()
    with pytest.raises(ValueError, match="shift must be"):
        FlowEulerScheduler(shift=0.0)
    with pytest.raises(ValueError, match="order must be"):
        FlowUniPCScheduler(order=4)
    s = FlowUniPCScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(2), 999, torch.zeros(2))
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="step 0 of the schedule"):
        s.step(torch.zeros(2), int(s.timesteps[1]), torch.zeros(2))


# ---- behaviour -----------------------------------------------------------------------------------
def test_unipc_last_step_returns_x0_prediction():
    s = FlowUniPCScheduler(shift=5.0)
    s.set_timesteps(5)
    model, x = RowModel((6, 3)), noise((6, 3))
    x = run(s, model, x, range(4))
    t, sigma = int(s.timesteps[4]), float(s.sigmas[4])
    v = model(x, t)
    # lands on sigma = 0 with order 1, whose update is exactly m = x - sigma * v
    torch.testing.assert_close(s.step(v, t, x), x - sigma * v, rtol=0, atol=0)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_low_precision_input_steps_in_fp32(cls):
    s = cls(shift=5.0)
    s.set_timesteps(3)
    model, x = RowModel((8, 4)), noise((8, 4))
    ref = run(s, model, x)
    s.set_timesteps(3)
    lo = x.to(torch.bfloat16)
    t = int(s.timesteps[0])
    out = s.step(model(lo.float(), t).bfloat16(), t, lo)
    assert out.dtype == torch.float32  # the latent stays fp32 after the first step
    assert run(s, model, out).dtype == torch.float32
    assert not torch.equal(ref, out)  # sanity: bf16 input did change the numbers


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("k", [0, 1, 2, 5, 9])
def test_state_round_trip_is_bit_identical(cls, k):
    steps = 10
    model, x0 = RowModel((7, 5)), noise((7, 5))
    ref = cls(shift=5.0)
    ref.set_timesteps(steps)
    want = run(ref, model, x0)

    a = cls(shift=5.0)
    a.set_timesteps(steps)
    x = run(a, model, x0, range(k))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain data only: safe to ship between processes

    fresh = cls(shift=1.0)  # a different shift on purpose: the state carries the schedule
    fresh.load_state_dict(a.state_dict())
    via_bytes = cls()
    via_bytes.load_state_dict(loaded)
    copied = a.copy()
    for s in (fresh, via_bytes, copied, a):
        assert s.step_index == k
        assert torch.equal(run(s, model, x), want)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7])
def test_state_tensors_round_trip(k):
    """What a runtime does over torch.distributed: recv into buffers like the latent, then load."""
    model, x0 = RowModel((7, 5)), noise((7, 5))
    a = FlowUniPCScheduler(shift=12.0)
    a.set_timesteps(8)
    x = run(a, model, x0, range(k))
    sent = a.state_tensors()
    assert len(sent) == a.num_state_tensors() == a.num_state_tensors(k)
    b = FlowUniPCScheduler(shift=12.0)
    b.set_timesteps(8)
    bufs = [torch.empty_like(x) for _ in range(b.num_state_tensors(k))]
    for buf, t in zip(bufs, sent):
        buf.copy_(t)  # stands in for dist.recv(buf)
    b.load_state_tensors(k, bufs)
    assert torch.equal(run(b, model, x), run(a, model, x))


def test_load_state_checks_kind_and_order():
    a = FlowUniPCScheduler(order=2)
    a.set_timesteps(4)
    with pytest.raises(ValueError, match="order-2"):
        FlowUniPCScheduler(order=3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="same kind"):
        FlowEulerScheduler().load_state_dict(a.state_dict())


def test_scheduler_keeps_no_reference_to_callers_tensors():
    a, b = FlowUniPCScheduler(), FlowUniPCScheduler()
    for s in (a, b):
        s.set_timesteps(6)
    model, x0 = RowModel((5, 3)), noise((5, 3))
    xa, xb = x0.clone(), x0.clone()
    for i in range(6):
        t = int(a.timesteps[i])
        va, vb = model(xa, t), model(xb, t)
        na, nb = a.step(va, t, xa), b.step(vb, t, xb)
        xa.fill_(1e3)  # a runtime reusing its buffers must not corrupt a's history
        va.fill_(1e3)
        xa, xb = na, nb
    assert torch.equal(xa, xb)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_step_on_row_shards_equals_step_on_whole(cls):
    """Sequence parallelism steps each rank's [L_local, C] shard with its own scheduler."""
    L, C, steps = 37, 5, 6
    cuts = [0, 10, 23, 37]  # uneven, so vectorised loops and their tails fall differently
    model, x0 = RowModel((L, C)), noise((L, C))
    whole = cls(shift=5.0)
    whole.set_timesteps(steps)
    shards = [whole.copy() for _ in cuts[:-1]]
    x = x0
    parts = [x0[lo:hi] for lo, hi in zip(cuts, cuts[1:])]
    for i in range(steps):
        t = int(whole.timesteps[i])
        x = whole.step(model(x, t), t, x)
        parts = [s.step(model(p, t, slice(lo, hi)), t, p) for s, p, lo, hi in zip(shards, parts, cuts, cuts[1:])]
        assert torch.equal(torch.cat(parts), x), f"step {i}"


def test_timestep_may_be_a_tensor():
    s = FlowEulerScheduler()
    s.set_timesteps(2)
    x = noise((2, 3))
    t = s.timesteps[0]
    s.step(torch.ones_like(x), t.expand(2), x)  # a per-sample [B] timestep tensor
    s.step(torch.ones_like(x), s.timesteps[1], x)  # a 0-dim one
    assert s.step_index == 2
    with pytest.raises(ValueError, match="finished"):
        s.step(torch.ones_like(x), 0, x)


def test_wan_schedule_matches_numpy_reference():
    # Independent restatement of the original's recipe (float32 sigma_max, numpy float64).
    steps, shift = 40, 12.0
    s = np.linspace(np.float32(0.999).item(), 0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    sig, ts = wan_schedule(steps, shift)
    assert np.array_equal(sig[:-1].numpy(), s) and ts.tolist() == (s * 1000).astype(np.int64).tolist()

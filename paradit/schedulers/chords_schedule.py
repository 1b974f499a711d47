"""CHORDS' static schedule: which core evaluates which grid index in which round, known before any
model runs. Plain Python, no torch: the planner and the placement of experts read it, and the
controller (paradit.schedulers.chords.Chords) follows it; the algorithm is described there.
"""
from __future__ import annotations

import numbers
from types import MappingProxyType
from typing import Sequence

# The paper's initialisation sequences, all for N = 50 grid steps.
PAPER_STEPS = 50
PAPER_INIT = MappingProxyType({4: (0, 8, 16, 32), 6: (0, 3, 6, 12, 24, 36), 8: (0, 2, 4, 8, 16, 24, 32, 40)})


# ---------------------------------------------------------------- initialisation sequences


def _template(num_cores: int) -> list[int]:
    """[0, 1, 2, 4, 8, 12, 16, ...][:K]: doubling up to 8, then steps of 4.

    In units of 8, 3 and 2 grid steps this is each paper sequence (K = 4, 6, 8 at N = 50).
    """
    t = [0]
    while len(t) < num_cores:
        last = t[-1]
        t.append(1 if last == 0 else 2 * last if last < 8 else last + 4)
    return t


def init_sequence(num_cores: int, num_steps: int) -> list[int]:
    """Start indices for `num_cores` cores on a grid of `num_steps` steps.

    Rule: init = round(a * template) with the template above and the scale a chosen so that
    2 * init[K-1] - init[K-2] = 0.96 N. That relation holds for every paper sequence at N = 50
    (a = 8, 3, 2), so the rule returns them exactly, and for another N it is the paper's sequence
    rescaled by N / 50 and rounded. Its meaning: core K-2 reaches the fastest core's start index
    about 0.04 N rounds before the fastest core finishes, so even the first real hit has been
    rectified once. Later cores start further along and the spacing grows, as in the paper.
    K=1 gives [0] (plain sequential). Rounding collisions (small N, large K) are repaired by
    pushing indices up to keep them strictly increasing, then down to keep them below N.
    """
    if not 1 <= num_cores <= num_steps:
        raise ValueError(
            f"init_sequence needs 1 <= K <= N (each core starts at its own grid index); "
            f"got K={num_cores}, N={num_steps}. Use at most {num_steps} cores or more steps."
        )
    if num_cores == 1:
        return [0]
    t = _template(num_cores)
    scale = 0.96 * num_steps / (2 * t[-1] - t[-2])
    init = [int(scale * u + 0.5) for u in t]  # round half up, independent of banker's rounding
    for k in range(1, num_cores):  # strictly increasing
        init[k] = max(init[k], init[k - 1] + 1)
    for k in reversed(range(num_cores)):  # init[k] <= N - K + k leaves room for the cores after k
        cap = num_steps - num_cores + k
        init[k] = min(init[k], cap if k == num_cores - 1 else min(cap, init[k + 1] - 1))
    assert init[0] == 0 and all(a < b for a, b in zip(init, init[1:])) and init[-1] < num_steps
    return init


def validate_init(init: Sequence[int], num_steps: int, num_cores: int | None = None) -> list[int]:
    """Check an initialisation sequence; return it as a list of ints. ValueError says the fix."""
    init = init.tolist() if hasattr(init, "tolist") else list(init)   # a tensor, an array
    k = num_cores if num_cores is not None else len(init)
    hint = ""
    if 1 <= k <= num_steps:
        default = init_sequence(k, num_steps)
        hint = f" For K={k}, N={num_steps} the default is init_sequence({k}, {num_steps}) = {default}."
    if not init:
        raise ValueError(f"init is empty; give one start index per core.{hint}")
    if any(not isinstance(i, numbers.Integral) or isinstance(i, bool) for i in init):
        raise ValueError(f"init must hold integer grid indices; got {init}.{hint}")
    init = [int(i) for i in init]
    if num_cores is not None and len(init) != num_cores:
        raise ValueError(
            f"init has {len(init)} start indices but there are K={num_cores} cores; "
            f"give exactly one per core.{hint}"
        )
    if init[0] != 0:
        raise ValueError(
            f"init must start at 0 (core 0 runs the sequential solve from the noise); got {init}.{hint}"
        )
    for a, b in zip(init, init[1:]):
        if b <= a:
            raise ValueError(f"init must be strictly increasing; got {init} ({a} then {b}).{hint}")
    if init[-1] >= num_steps:
        raise ValueError(
            f"init's last start index must be below N={num_steps} (a core needs at least one "
            f"step to take); got {init}.{hint}"
        )
    return init


# ---------------------------------------------------------------- the static schedule


def schedule(init: Sequence[int], num_steps: int, rounds: int | None = None) -> list[list[tuple[int, int]]]:
    """For each round (round 1 first), the (core, index) pairs evaluated, cores in order.

    Core c evaluates init[c] + j in round c + 1 + j, for j = 0 .. N - init[c] - 1. Without
    `rounds` the whole run is listed: N rounds, the last of them core 0's.
    """
    last = max(c + num_steps - i for c, i in enumerate(init))  # == N, since init[c] >= c
    rounds = last if rounds is None else min(rounds, last)
    return [
        [(c, i + r - c - 1) for c, i in enumerate(init) if c + 1 <= r <= c + num_steps - i]
        for r in range(1, rounds + 1)
    ]


def core_indices(init: Sequence[int], num_steps: int, rounds: int | None = None) -> list[set[int]]:
    """The grid indices each core evaluates (in the first `rounds` rounds, or in the whole run).

    A runtime uses this to load only the Wan2.2 expert(s) a core group needs.
    """
    out: list[set[int]] = [set() for _ in init]
    for pairs in schedule(init, num_steps, rounds):
        for c, i in pairs:
            out[c].add(i)
    return out


def core_experts(init: Sequence[int], num_steps: int, rounds: int | None, high_steps: int) -> list[set[int]]:
    """The Wan2.2 experts each core evaluates: 0 (high noise) for grid indices below high_steps,
    1 (low noise) for the rest; the timesteps fall monotonically, so the index decides."""
    return [{int(i >= high_steps) for i in idx if i < num_steps} for idx in core_indices(init, num_steps, rounds)]


def hit_rounds(init: Sequence[int], num_steps: int) -> list[tuple[int, int]]:
    """(core, round) of each real hit, in the order run() yields them: fastest core first."""
    return sorted(((c, c + num_steps - i) for c, i in enumerate(init)), key=lambda h: (h[1], -h[0]))


def rounds_to_first_hit(init: Sequence[int], num_steps: int) -> int:
    """Rounds until the first real hit: (K - 1) + (N - init[K-1])."""
    return (len(init) - 1) + (num_steps - init[-1])


def count_nfe(init: Sequence[int], num_steps: int, rounds: int | None = None) -> int:
    """Network evaluations in the first `rounds` rounds (or the whole run)."""
    return sum(len(pairs) for pairs in schedule(init, num_steps, rounds))


def parse_stop(stop: int | float | None, num_cores: int) -> tuple[int, float | None]:
    """-> (real hits after which to stop, residual threshold or None)."""
    if stop is None:
        return num_cores, None
    if isinstance(stop, bool):
        raise ValueError("stop must be None, an int m (stop after the m-th real hit) or a float tau")
    if isinstance(stop, numbers.Integral):
        if not 1 <= stop <= num_cores:
            raise ValueError(
                f"stop={stop} asks for the {stop}-th real hit, but K={num_cores} cores give real "
                f"hits 1..{num_cores}; use 1 <= stop <= {num_cores}, or None for all hits."
            )
        return int(stop), None
    if isinstance(stop, numbers.Real):
        if not stop > 0:
            raise ValueError(f"stop=tau must be a positive residual threshold (paper: 4e-4); got {stop}")
        return num_cores, float(stop)
    raise ValueError(f"stop must be None, an int or a float; got {type(stop).__name__}")


def rounds_for(init: Sequence[int], num_steps: int, stop: int | float | None) -> int | None:
    """Rounds a run makes under `stop`; None for a residual threshold (data-dependent)."""
    m, tau = parse_stop(stop, len(init))
    return None if tau is not None else hit_rounds(init, num_steps)[m - 1][1]

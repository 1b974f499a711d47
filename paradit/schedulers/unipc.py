"""UniPC multistep on a flow model: the sampler of the original Wan (FlowUniPCMultistepScheduler).

Data-prediction (x0) form, B(h) = expm1(-h) ("bh2"), UniPC paper (Zhao et al. 2023), alg. 1-2.
With the flow path x = (1 - sigma) x0 + sigma * noise and v = noise - x0:
    alpha = 1 - sigma,  lambda = log(alpha) - log(sigma),  x0 = x - sigma * v.
Each step i (sigma_i -> sigma_{i+1}, h = lambda_{i+1} - lambda_i > 0):
  1. m_i = x_i - sigma_i * v(x_i)                     (x0 prediction at the model's input)
  2. UniC corrector (every step but the first): re-do the previous update from the sample it
     started at, now knowing m_i; this refined x_i is what the predictor starts from.
  3. UniP predictor of order p from m_i, m_{i-1}, ...:
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} expm1(-h) m_i - alpha_{i+1} B(h) sum_k rho_k D_k
Order bookkeeping (as diffusers and the original): p = min(order, i + 1, N - i): it warms up by
one per step and falls back to 1 on the last step (lower_order_final, applied at every N, not only
N < 15), which lands on sigma = 0 and returns m_i exactly. The corrector at step i uses the order
of step i - 1's predictor. Order 2 uses the fixed rho = 1/2 (predictor) and order 1 corrector
rho = 1/2, as the reference does; higher orders solve the small Vandermonde system.

The history is a function of the step index, so the state is just: step_index, the last `order`
x0 predictions, and the sample the last predictor started from.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import FlowScheduler, compute_dtype


def _lam(sigma: float) -> float:
    """Half log-SNR of the flow path: log(alpha / sigma) with alpha = 1 - sigma."""
    return math.log(1.0 - sigma) - math.log(sigma)


def _b_coeffs(hh: float, n: int) -> list[float]:
    """b_j = j! * hh * phi_{j+1}(hh) / B(h), j = 1..n, with phi_{k+1}(z) = (phi_k(z) - 1/k!) / z."""
    b_h = math.expm1(hh)
    g = math.expm1(hh) / hh - 1.0  # hh * phi_2(hh)
    out, fact = [], 1
    for j in range(1, n + 1):
        out.append(g * fact / b_h)
        fact *= j + 1
        g = g / hh - 1.0 / fact  # hh * phi_{j+2}(hh)
    return out


def _solve_rhos(rks: list[float], b: list[float]) -> list[float]:
    """rho with sum_k rho_k rk_k^(j-1) = b_j, j = 1..len(rks): the order conditions of UniPC."""
    r = torch.tensor([[rk**j for rk in rks] for j in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(r, torch.tensor(b, dtype=torch.float64)).tolist()


class FlowUniPCScheduler(FlowScheduler):
    """UniPC (bh2, x0-prediction, lower_order_final) for flow velocities; see the module docstring."""

    kind = "unipc"
    _sigma_below_one = True

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000, order: int = 2):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}; Wan uses 2")
        super().__init__(shift, num_train_timesteps)
        self.order = order
        self._history: list[torch.Tensor] = []  # x0 predictions m of the last `order` steps, oldest first
        self._last_sample: torch.Tensor | None = None  # the sample the last predictor started from

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "order": self.order}

    def _order_at(self, i: int) -> int:
        """Predictor order of step i: warm-up from 1, and 1 on the last step (lower_order_final)."""
        return min(self.order, i + 1, self.num_inference_steps - i)

    def step(self, v: torch.Tensor, t: int | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One UniPC step. v, x: any (same) shape; returns x_next in fp32 (fp64 if x is fp64)."""
        i = self._begin_step(t)
        dtype = compute_dtype(x)
        x = x.to(dtype)
        # 1. x0 prediction at the point the model saw (the uncorrected x)
        m = x - self._sig[i] * v.to(dtype)
        # 2. corrector; at step 0 copy instead, so that we never keep a reference to the caller's x
        x = self._correct(m, i) if i > 0 else x.clone()
        self._history = (self._history + [m])[-self.order :]
        self._last_sample = x
        # 3. predictor
        x_next = self._predict(x, i)
        self.step_index = i + 1
        return x_next

    def _update(self, x: torch.Tensor, s0: float, s1: float, h: float, m0: torch.Tensor, res: torch.Tensor | None):
        """x at s1 from x at s0: the exact first-order part plus the B(h)-weighted residual `res`."""
        e = math.expm1(-h)  # h*phi_1(-h) in the x0 form, and B(h) for bh2
        out = (s1 / s0) * x - ((1.0 - s1) * e) * m0
        if res is not None:
            out = out - ((1.0 - s1) * e) * res
        return out

    def _ratios(self, lam0: float, h: float, idx: list[int]) -> list[float]:
        """r_k = (lambda at sigma index idx_k - lambda_0) / h: where the older predictions sit."""
        return [(_lam(self._sig[j]) - lam0) / h for j in idx]

    def _weighted_diffs(self, rks: list[float], rhos: list[float]) -> torch.Tensor | None:
        """sum_k rho_k D_k with D_k = (m_{-(k+1)} - m_{-1}) / r_k over the history."""
        m0, res = self._history[-1], None
        for k, (rk, rho) in enumerate(zip(rks, rhos), start=1):
            term = rho * ((self._history[-(k + 1)] - m0) / rk)
            res = term if res is None else res + term
        return res

    def _predict(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """UniP-p from sigma_i to sigma_{i+1}; self._history[-1] is m_i."""
        p, s0, s1 = self._order_at(i), self._sig[i], self._sig[i + 1]
        if s1 == 0.0:
            # Last step (p == 1 by lower_order_final): alpha = 1, sigma = 0, e^{-h} = 0, so the
            # update is exactly the x0 prediction; lambda = +inf would otherwise appear.
            assert p == 1
            return self._history[-1].clone()
        lam0 = _lam(s0)
        h = _lam(s1) - lam0
        rks = self._ratios(lam0, h, [i - k for k in range(1, p)])  # older m_{i-k}, k = 1..p-1
        if p <= 2:
            rhos = [0.5] * (p - 1)  # the reference's fixed rho for order 2
        else:
            rhos = _solve_rhos(rks, _b_coeffs(-h, p - 1))
        res = self._weighted_diffs(rks, rhos)  # None when p == 1
        return self._update(x, s0, s1, h, self._history[-1], res)

    def _correct(self, m_t: torch.Tensor, i: int) -> torch.Tensor:
        """UniC-p: redo step i-1 (sigma_{i-1} -> sigma_i) from its start, now knowing m_t = m_i."""
        p, s0, s1 = self._order_at(i - 1), self._sig[i - 1], self._sig[i]
        lam0 = _lam(s0)
        h = _lam(s1) - lam0
        rks = self._ratios(lam0, h, [i - 1 - k for k in range(1, p)])
        rhos = [0.5] if p == 1 else _solve_rhos(rks + [1.0], _b_coeffs(-h, p))
        m0 = self._history[-1]  # m_{i-1}: the history does not hold m_i yet
        res = rhos[-1] * (m_t - m0)
        old = self._weighted_diffs(rks, rhos[:-1])
        if old is not None:
            res = old + res
        return self._update(self._last_sample, s0, s1, h, m0, res)

    # ---- state -------------------------------------------------------------------------------
    def _reset_history(self) -> None:
        self._history, self._last_sample = [], None

    def _history_dict(self) -> dict[str, Any]:
        return {"order": self.order, "history": list(self._history), "last_sample": self._last_sample}

    def _load_history(self, d: dict[str, Any]) -> None:
        if d["order"] != self.order:
            o = d["order"]
            raise ValueError(f"state was saved by an order-{o} UniPC; construct FlowUniPCScheduler(order={o})")
        tensors = list(d["history"]) + ([] if d["last_sample"] is None else [d["last_sample"]])
        if len(tensors) != self.num_state_tensors(self.step_index):
            raise ValueError(f"inconsistent state: {len(tensors)} tensors at step {self.step_index}")
        self._load_tensors(tensors)

    def num_state_tensors(self, step_index: int | None = None) -> int:
        """min(step_index, order) x0 predictions, plus the last sample once a step has run."""
        i = self.step_index if step_index is None else step_index
        return min(i, self.order) + (1 if i > 0 else 0)

    def state_tensors(self) -> list[torch.Tensor]:
        """[m (oldest first)..., last_sample]: each like the latent, in its compute dtype."""
        return list(self._history) + ([] if self._last_sample is None else [self._last_sample])

    def _load_tensors(self, tensors: list[torch.Tensor]) -> None:
        if self.step_index == 0:
            self._reset_history()
        else:
            self._history, self._last_sample = tensors[:-1], tensors[-1]

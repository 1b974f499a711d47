"""Per-request LoRA sets on loaded experts: apply a set where the weights are, restoring the base
weights exactly before every change.

The base value of every weight a set touches is copied to host memory before it is first merged
into; a change of set copies those back (a copy, never a subtraction, so nothing accumulates
rounding), then merges the new set with paradit.models.lora's LoraMerge: W' = (W fp32 + its deltas)
in W's dtype, the same arithmetic as a set merged at load time (generate's --lora), so a job with a
set gives the latent of a pipeline loaded with it.
"""
from __future__ import annotations

import time

import torch

from paradit.config import WanConfig
from paradit.models.lora import LoraMerge, LoraSpec, check_loras, for_expert


class LoraSets:
    """The experts of one rank (None where it loads none) and the set merged into them now."""

    def __init__(self, experts: list, cfg: WanConfig):
        self.experts, self.cfg = experts, cfg
        self.current: tuple[LoraSpec, ...] = ()
        self.base: dict[tuple[int, str], torch.Tensor] = {}   # (expert, weight) -> its base value, on the host
        self.touched: set[tuple[int, str]] = set()             # the weights the current set changed

    @torch.no_grad()
    def switch(self, specs: tuple[LoraSpec, ...]) -> float:
        """Make `specs` the merged set (in their order); the seconds it took (0 when it is already)."""
        specs = tuple(specs)
        if specs == self.current:
            return 0.0
        t0 = time.perf_counter()
        files = check_loras(specs, self.cfg, warn=False) if specs else []
        self.restore()
        for k, expert in enumerate(self.experts):
            mine = for_expert(files, k, self.cfg.num_experts)
            if expert is None or not mine:
                continue
            weights = expert.state_dict(keep_vars=True)
            with LoraMerge(mine) as merge:
                for name in merge.by_param:
                    w = weights[name]
                    if (k, name) not in self.base:
                        self.base[(k, name)] = w.detach().to("cpu", copy=True)
                    w.data.copy_(merge(name, w.data))
                    self.touched.add((k, name))
        self.current = specs
        self.sync()
        return time.perf_counter() - t0

    @torch.no_grad()
    def restore(self) -> None:
        """The base weights back, bit for bit, where the current set changed them."""
        for k, name in self.touched:
            self.experts[k].state_dict(keep_vars=True)[name].data.copy_(self.base[(k, name)])
        self.touched.clear()
        self.current = ()

    def sync(self) -> None:
        for expert in self.experts:
            if expert is not None:
                w = next(expert.parameters())
                if w.is_cuda:
                    torch.cuda.synchronize(w.device)
                return

"""Per-request LoRA sets on loaded experts: apply a set where the weights are, restoring the base
weights exactly before every change.

A change of set first puts back the base value of every weight the current set changed (a copy, never a
subtraction, so nothing accumulates rounding), then merges the new set with paradit.models.lora's
LoraMerge: W' = (W fp32 + its deltas) in W's dtype, the same arithmetic as a set merged at load time
(generate's --lora), so a job with a set gives the latent of a pipeline loaded with it.

Where the base comes from: an expert read from a checkpoint folder (with no LoRA merged at load) reads
those weights back from its safetensors files, straight into the weights, the way the load read them
(paradit.models.loading.read_tensors: the same bytes and the same cast, so the same bits); the page
cache holds them, so that costs a read of the touched bytes and no host memory. An expert with no file
to read back (a preset built in memory, a load with LoRAs merged) keeps a host copy of each weight a set
touches, taken before it is first merged into (two rank-64 A14B LoRAs touch ~54 GB of it).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from paradit.config import WanConfig
from paradit.models.lora import LoraMerge, LoraSpec, check_loras, for_expert


class LoraSets:
    """The experts of one rank (None where it loads none) and the set merged into them now.
    checkpoints: each expert's checkpoint folder where its weights are that checkpoint's as read (the
    base is read back from it), None where they are not (the base is kept in host memory)."""

    def __init__(self, experts: list, cfg: WanConfig, checkpoints: list[Path | None] | None = None):
        self.experts, self.cfg = experts, cfg
        self.checkpoints = list(checkpoints) if checkpoints is not None else [None] * len(experts)
        assert len(self.checkpoints) == len(experts), (len(self.checkpoints), len(experts))
        self.current: tuple[LoraSpec, ...] = ()
        self.base: dict[tuple[int, str], torch.Tensor] = {}   # (expert, weight) -> its base value, on the host
        self.touched: set[tuple[int, str]] = set()             # the weights the current set changed
        self.indexes: dict[int, object] = {}                   # expert -> its checkpoint's TensorIndex

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
                    if self.checkpoints[k] is None and (k, name) not in self.base:
                        self.base[(k, name)] = w.detach().to("cpu", copy=True)
                    w.data.copy_(merge(name, w.data))
                    self.touched.add((k, name))
        self.current = specs
        self.sync()
        return time.perf_counter() - t0

    @torch.no_grad()
    def restore(self) -> None:
        """The base weights back, bit for bit, where the current set changed them."""
        for k in sorted({k for k, _ in self.touched}):
            names = sorted(name for j, name in self.touched if j == k)
            weights = self.experts[k].state_dict(keep_vars=True)
            if self.checkpoints[k] is not None:
                self.read_back(k, {name: weights[name].data for name in names})
                continue
            for name in names:
                weights[name].data.copy_(self.base[(k, name)])
        self.touched.clear()
        self.current = ()

    def read_back(self, k: int, into: dict[str, torch.Tensor]) -> None:
        """Expert k's weights `into` (by name) read again from its checkpoint, straight into them."""
        from paradit.models.loading import index_checkpoint, read_tensors
        if k not in self.indexes:
            self.indexes[k] = index_checkpoint(self.checkpoints[k])
        for dtype in {t.dtype for t in into.values()}:       # one read per dtype: read_tensors casts to one
            group = {n: t for n, t in into.items() if t.dtype == dtype}
            read_tensors(self.indexes[k], list(group), dtype, next(iter(group.values())).device, out=group)

    def sync(self) -> None:
        for expert in self.experts:
            if expert is not None:
                w = next(expert.parameters())
                if w.is_cuda:
                    torch.cuda.synchronize(w.device)
                return

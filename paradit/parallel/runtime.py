"""The runtime that applies a layout to the model: token shards, the attention seam, CFG.

`parallelize(model, mesh)` returns a module with the model's own call signature whose output is
the full tensor on every rank; it binds `model`'s attention in place (see its docstring). The
engine uses the token-space path instead: `velocity()` takes and returns this rank's shard of the
patchified latent, so that a denoising step gathers nothing.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from paradit.models.attention import describe_backend, kernels, pick_backend
from paradit.models.transformer import WanTransformer, patchify, token_grid, unpatchify
from paradit.parallel.attention import SequenceParallelAttention
from paradit.parallel.collectives import Traffic, all_gather_equal, all_gather_uneven, cfg_combine, even_split, offsets
from paradit.parallel.mesh import Mesh

log = logging.getLogger("paradit")
Tensor = torch.Tensor


class Runtime:
    def __init__(self, mesh: Mesh, backend: str = "auto", dtype: torch.dtype = torch.float32):
        self.mesh = mesh
        self.traffic = Traffic()  # what this rank's collectives moved; the engine clears it per request
        # cfg=1: cond and uncond in one batch-2 forward, or one after the other (the layout's
        # cfg_mode "in-turn": about 58% of the activation memory, the same work)
        self.batch_cfg = mesh.config.cfg_mode == "batched"
        self.backend = pick_backend(mesh.device, dtype, backend)
        plain, self._with_lse = kernels(self.backend, mesh.device)
        self.sp = mesh.size("sp")
        self.attention = SequenceParallelAttention(mesh, plain, self._with_lse, self.traffic) if self.sp > 1 else plain
        self.kernel = describe_backend(self.backend, mesh.device)
        self._per_shape = getattr(plain, "__self__", None)   # auto: the PerShape whose choices ran

    def kernels_ran(self) -> dict[str, str]:
        """Local attention kernel per call shape so far (auto on GPU), else the one backend's name."""
        return dict(self._per_shape.ran) if self._per_shape is not None else {"all": self.kernel}

    def describe(self) -> str:
        layout = (self.mesh.split or self.mesh.config).describe()
        return f"{layout}; attention: {self.kernel}"

    def use_attention(self, plain, label: str, experts) -> None:
        """Replace the local self-attention kernel (FP8: paradit/models/quant.py) and rebind `experts`.
        Ring attention needs the kernel's log-sum-exp, which a plain kernel lacks: refused there."""
        assert self.mesh.size("ring") == 1, "a plain kernel cannot serve Ring attention (no log-sum-exp)"
        self.attention = (SequenceParallelAttention(self.mesh, plain, self._with_lse, self.traffic) if self.sp > 1
                          else plain)
        self.kernel, self._per_shape = label, None
        for m in experts:
            if m is not None:
                self.bind(m)

    def bind(self, model: WanTransformer) -> WanTransformer:
        model.set_attention(self.attention)
        return model

    # ------------------------------------------------------------------ token shards
    def shard_sizes(self, num_tokens: int) -> list[int]:
        return even_split(num_tokens, self.sp)

    def token_range(self, num_tokens: int) -> tuple[int, int]:
        sizes = self.shard_sizes(num_tokens)
        me = self.mesh.rank("sp")
        start = offsets(sizes)[me]
        return start, start + sizes[me]

    def gather_tokens(self, x: Tensor, num_tokens: int, dim: int = 0) -> Tensor:
        """Concatenate the sp shards of a token-space tensor along `dim`."""
        return all_gather_uneven(x, self.mesh.group("sp"), self.shard_sizes(num_tokens), dim, self.traffic)

    def forward_tokens(self, model: WanTransformer, patches: Tensor, t: Tensor, context: Tensor,
                       grid: tuple[int, int, int]) -> Tensor:
        """The model on this rank's shard: patches (B, L_me, P*C_in), t (B,) or (B, L_me)."""
        num_tokens = grid[0] * grid[1] * grid[2]
        if self.sp > 1:
            self.attention.set_split(self.shard_sizes(num_tokens))
        start, end = self.token_range(num_tokens)
        assert patches.shape[1] == end - start, (patches.shape, start, end)
        return model.forward_tokens(patches, t, context, grid, offset=start)

    # ------------------------------------------------------------------ guidance
    def velocity(self, model: WanTransformer, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor | None,
                 guidance: float, grid: tuple[int, int, int]) -> Tensor:
        """Guided flow velocity on this rank's token shard, fp32.

        x (L_me, P*C) token-space shard; t a scalar or (L_me,) per-token timesteps;
        cond / uncond (1, S, text_dim). cfg=2 runs cond and uncond on the two cfg groups and
        exchanges the velocities once; cfg=1 batches them into one forward (batch_cfg), or runs
        two forwards one after the other (cfg_mode "in-turn": less activation memory).
        """
        dtype = next(model.parameters()).dtype
        xb = x.to(dtype)[None]                                            # (1, L_me, P*C)
        tb = t.reshape(1, -1).float()                                     # (1, 1) or (1, L_me)
        if uncond is None or guidance == 1.0:
            return self.forward_tokens(model, xb, tb, cond, grid)[0].float()
        cfg_group = self.mesh.group("cfg")
        if cfg_group is not None:
            mine = cond if self.mesh.rank("cfg") == 0 else uncond
            v = self.forward_tokens(model, xb, tb, mine, grid)[0]
            v_cond, v_uncond = all_gather_equal(v, cfg_group, self.traffic)
        elif self.batch_cfg:
            both = self.forward_tokens(model, xb.expand(2, -1, -1), tb.expand(2, -1),
                                       torch.cat([cond, uncond]), grid)
            v_cond, v_uncond = both[0], both[1]
        else:
            v_cond = self.forward_tokens(model, xb, tb, cond, grid)[0]
            v_uncond = self.forward_tokens(model, xb, tb, uncond, grid)[0]
        return cfg_combine(v_cond, v_uncond, guidance)


class ParallelWan(nn.Module):
    """model(x, t, context) under a layout: the full output on every rank."""

    def __init__(self, model: WanTransformer, runtime: Runtime):
        super().__init__()
        self.model, self.runtime = runtime.bind(model), runtime

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        patch = self.model.cfg.patch
        grid = token_grid(x.shape, patch)
        patches = patchify(x, patch)                                      # (B, L, P*C)
        start, end = self.runtime.token_range(patches.shape[1])
        t_me = t[:, start:end] if t.ndim == 2 else t                      # per-token t is sharded too
        out = self.runtime.forward_tokens(self.model, patches[:, start:end], t_me, context, grid)
        out = self.runtime.gather_tokens(out, patches.shape[1], dim=1)    # (B, L, P*C_out)
        return unpatchify(out, grid, patch)


def parallelize(model: WanTransformer, mesh: Mesh, backend: str = "auto") -> ParallelWan:
    """The model under the mesh's layout. In place: `model` itself is rebound to the sequence-parallel
    attention (the weights are shared, not copied: a 14B model is not duplicated), so afterwards
    `model` runs collectives too. Call the returned module, on every rank of the mesh together;
    calling `model` directly on some ranks only waits in (or fails inside) the process group."""
    dtype = next(model.parameters()).dtype
    runtime = Runtime(mesh, backend, dtype)
    return ParallelWan(model, runtime)

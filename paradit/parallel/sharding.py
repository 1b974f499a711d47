"""Weight sharding for inference: each expert's transformer blocks sharded over a group, with FSDP2.

`apply_weight_sharding(model, mesh)` applies torch's `fully_shard` from outside the model, as
torchtitan's parallelize does (the model file stays single-device code):
  * every block is one FSDP unit over the 1-D sharding mesh (Mesh.shard_mesh: the request's
    sequence-parallel group, or its whole request group); a rank keeps 1/group of each block's
    parameters (dim 0, padded to a multiple of the group);
  * a block's parameters are all-gathered when it is called and freed after it (reshard after
    forward), and the next `prefetch` blocks' all-gathers are issued as the current block starts, so
    they run while it computes (FSDP2's explicit forward prefetch);
  * the embeddings and the head stay whole on every rank (ignored by FSDP: they are ~2% of an
    expert, and all-gathering them would only hold them whole for the whole forward anyway); the
    model itself is the FSDP root that owns the blocks, and `forward_tokens`, the runtime's entry,
    is registered as a forward method so that the root's hooks run around it.
Inference only: parameters never take gradients (the experts are loaded with requires_grad off).

Peak weight bytes on a rank: the whole embeddings and head, 1/group of every block, and a window
of 1 + prefetch blocks whole (the one running, the ones in flight): `held_bytes` predicts it from
the shapes, `weights_held` measures it from the tensors alive, and paradit.plan.sharding models it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

PREFETCH = 1   # blocks gathered ahead of the one running: one hides a block's all-gather behind a block


def apply_weight_sharding(model: nn.Module, mesh: DeviceMesh, prefetch: int = PREFETCH) -> nn.Module:
    """Shard `model`'s blocks over the 1-D `mesh` in place (collective-free; the gathers run in
    forward_tokens, on every rank of the mesh together). Returns `model`."""
    assert mesh.ndim == 1, "weights are sharded over one group"
    if prefetch < 0:
        raise ValueError(f"prefetch={prefetch}: the number of blocks gathered ahead is >= 0")
    blocks = list(model.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    whole = {p for name, p in model.named_parameters() if not name.startswith("blocks.")}
    fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=whole)
    register_fsdp_forward_method(model, "forward_tokens")
    model.set_modules_to_forward_prefetch(blocks[:prefetch])         # block 0's gather starts at the root
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + prefetch])
    return model


def is_sharded(model: nn.Module | None) -> bool:
    return model is not None and any(isinstance(p, DTensor) for p in model.parameters())


def shard_numel(shape: torch.Size, group: int) -> int:
    """Elements of one rank's shard of a tensor: dim 0 split into `group` chunks, padded."""
    return math.ceil(shape[0] / group) * math.prod(shape[1:]) if len(shape) else 1


def held_bytes(models, group: int, prefetch: int = PREFETCH) -> dict[str, int]:
    """The weight bytes a rank holding `models` (experts, single-device) sharded over `group` ranks
    holds: 'whole' (embeddings, head), 'shards' (1/group of each block, dim 0 padded to a multiple
    of the group), 'window' (1 + prefetch blocks of the running expert gathered whole, that padding
    included; one expert runs at a time) and their 'peak' sum during a forward."""
    def nbytes(params, split: int) -> int:
        return sum(shard_numel(p.shape, split) * p.element_size() for p in params)
    models = [models] if isinstance(models, nn.Module) else list(models)
    whole = shards = window = 0
    for model in models:
        blocks = [nbytes(b.parameters(), group) for b in model.blocks]     # one rank's shard of each
        whole += nbytes((p for n, p in model.named_parameters() if not n.startswith("blocks.")), 1)
        shards += sum(blocks)
        window = max(window, group * sum(sorted(blocks, reverse=True)[:1 + prefetch]))
    return {"whole": whole, "shards": shards, "window": window, "peak": whole + shards + window}


def weights_held(model: nn.Module) -> int:
    """The weight bytes alive on this rank now, measured from the tensors themselves: every
    parameter's storage as set on the modules, each FSDP unit's shard, its gathered parameters
    (freed storages count 0) and an all-gather still in flight (a prefetch). Each storage once."""
    tensors = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    for module in model.modules():
        state = fully_shard.state(module) if hasattr(module, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", ()):
            for fp in group.fsdp_params:
                tensors += [fp._sharded_param_data, *fp.all_gather_outputs]
            if group._all_gather_result is not None:
                tensors.append(group._all_gather_result.all_gather_output)
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    return sum(n for ptr, n in storages.items() if n)


class PeakWeights:
    """The largest sum of weights_held over `models` seen as any of their blocks starts (after FSDP
    has gathered it and issued its prefetch: the fullest moment of the window). A context manager."""

    def __init__(self, *models: nn.Module):
        self.models, self.peak, self._handles = [m for m in models if m is not None], 0, []

    def _sample(self, module=None, args=None):
        self.peak = max(self.peak, sum(weights_held(m) for m in self.models))

    def __enter__(self) -> "PeakWeights":
        self._sample()
        self._handles = [b.register_forward_pre_hook(self._sample) for m in self.models for b in m.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


"""Building modules without allocating them, and assigning their weights, under one lock.

Building a module and assigning its parameters run under one process-wide lock (`BUILD_LOCK`),
while the reads of the weights run outside it, concurrently. Libraries patch module construction
for the whole process while they build: diffusers' from_pretrained, with accelerate installed,
builds under accelerate's `init_empty_weights`, which replaces nn.Module.register_parameter for
every thread, so a module another thread builds or assigns meanwhile gets meta parameters that
nothing fills. paradit builds all its components itself (`build_on_meta`, `assign_weights`), and any
other code that builds models beside a paradit load should hold the lock too.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from paradit.errors import CheckpointError

# Held while any module is built or has parameters assigned; never while weights are read.
BUILD_LOCK = threading.RLock()


def build_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """factory() on the meta device (no allocation), under BUILD_LOCK."""
    with BUILD_LOCK, torch.device("meta"):
        return factory()


def assign_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """Assign `tensors` to a model built on the meta device (under BUILD_LOCK); missing entries may only
    be tied weights, which model.tie_weights() (transformers' models) then ties. Nothing may stay on
    the meta device."""
    with BUILD_LOCK:
        result = model.load_state_dict(tensors, strict=False, assign=True)
        if result.missing_keys and hasattr(model, "tie_weights"):
            model.tie_weights()
    if result.unexpected_keys:
        raise CheckpointError(f"{where} holds tensors the model does not have: {result.unexpected_keys[:5]}")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise CheckpointError(f"{where} lacks tensors the model needs: {meta[:5]}"
                              f"{' ...' if len(meta) > 5 else ''}")
    return model.eval().requires_grad_(False)



"""Per-request LoRA sets (paradit.models.lora_sets): switching between sets on loaded experts gives
the weights of a load with that set, and the base weights back bit for bit (fp32, CPU)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from paradit.components import tiny_components
from paradit.config import WanConfig
from paradit.models.lora import LoraSpec, apply_loras, check_loras, for_expert
from paradit.models.lora_sets import LoraSets
from test_lora import random_lora

TINY = WanConfig.preset("tiny")


def weights(experts) -> list[dict]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in experts]


def loaded_with(specs) -> list[dict]:
    """What a load with `specs` merged holds (generate's --lora path)."""
    experts = tiny_components(TINY, "cpu", torch.float32)[0]
    files = check_loras(specs, TINY, warn=False)
    for k, m in enumerate(experts):
        apply_loras(m, for_expert(files, k, TINY.num_experts))
    return weights(experts)


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_switching_sets_restores_the_base_exactly(tmp_path):
    paths = []
    for seed in (1, 2):
        tensors, meta = random_lora(TINY, "kohya", seed)
        paths.append(tmp_path / f"l{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, paths[-1], metadata=meta)
    a = (LoraSpec(paths[0], 0.3, "all"),)
    b = (LoraSpec(paths[1], 0.5, "high"), LoraSpec(paths[0], 0.2, "low"))
    experts = tiny_components(TINY, "cpu", torch.float32)[0]
    base = weights(experts)
    sets = LoraSets(experts, TINY)
    for specs in (a, b, a, (), b, ()):
        assert sets.switch(specs) >= 0
        want = base if not specs else loaded_with(specs)
        assert same(weights(experts), want), specs
    assert not same(loaded_with(a), base) and not same(loaded_with(a), loaded_with(b))   # the sets do change them
    assert sets.switch(()) == 0.0 and sets.current == ()

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
    a, b = lora_specs(tmp_path)
    experts = tiny_components(TINY, "cpu", torch.float32)[0]
    base = weights(experts)
    sets = LoraSets(experts, TINY)
    for specs in (a, b, a, (), b, ()):
        assert sets.switch(specs) >= 0
        want = base if not specs else loaded_with(specs)
        assert same(weights(experts), want), specs
    assert not same(loaded_with(a), base) and not same(loaded_with(a), loaded_with(b))   # the sets do change them
    assert sets.switch(()) == 0.0 and sets.current == ()


def test_experts_read_from_a_checkpoint_get_their_base_back_from_it(tmp_path):
    """No host copies where the weights are a checkpoint's as read: a change of set reads the touched
    weights back from the files (a sharded diffusers folder; one expert stored in bf16, so that the
    read-back casts as the load did), and the base is the load's bit for bit."""
    from types import SimpleNamespace

    from paradit.checkpoint import save_diffusers_layout
    from paradit.models.loading import load_transformer
    from paradit.serve.cli import lora_base
    specs, folders = lora_specs(tmp_path), [tmp_path / "transformer", tmp_path / "transformer_2"]
    for k, m in enumerate(tiny_components(TINY, "cpu", torch.float32)[0]):
        save_diffusers_layout(m.to(torch.bfloat16) if k else m, folders[k], max_shard_bytes=20_000)

    def load(loras=()):
        return [load_transformer(f, torch.float32, "cpu", TINY, loras=loras, expert=("high", "low")[k])
                for k, f in enumerate(folders)]
    experts = load()
    base = weights(experts)
    sets = LoraSets(experts, TINY, folders)
    for s in (specs[0], specs[1], specs[0], (), specs[1], ()):
        assert sets.switch(s) >= 0
        assert same(weights(experts), base if not s else weights(load(s))), s
    assert sets.base == {} and not same(weights(load(specs[0])), base)   # nothing copied; the sets change them
    # the service reads the base back from a checkpoint folder it loaded as is; never from a preset, nor
    # where --lora merged LoRAs into the weights at load
    (tmp_path / "model_index.json").write_text("{}")
    for part in ("text_encoder", "tokenizer", "vae"):   # locate's check of a diffusers folder's other parts
        (tmp_path / part).mkdir()
    assert lora_base(SimpleNamespace(build=SimpleNamespace(model=str(tmp_path), components=None, loras=()))) == \
        folders
    assert lora_base(SimpleNamespace(build=SimpleNamespace(model=str(tmp_path), components=None,
                                                           loras=specs[0]))) is None
    assert lora_base(SimpleNamespace(build=SimpleNamespace(model="demo", components=None, loras=()))) is None


def lora_specs(folder) -> tuple:
    """Two sets over two random LoRA files: one on every expert, one per expert."""
    paths = []
    for seed in (1, 2):
        tensors, meta = random_lora(TINY, "kohya", seed)
        paths.append(folder / f"l{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, paths[-1], metadata=meta)
    return ((LoraSpec(paths[0], 0.3, "all"),),
            (LoraSpec(paths[1], 0.5, "high"), LoraSpec(paths[0], 0.2, "low")))

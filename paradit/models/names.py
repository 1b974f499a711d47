"""Parameter names: diffusers' WanTransformer3DModel names <-> the original Wan code's (wan/modules/model.py).
Plain Python (no torch): the loader, the LoRA reader and the benchmarks rename through one table."""
from __future__ import annotations

import re

# (diffusers, original Wan) parameter-name prefixes, one table read both ways: a name
# is renamed by the first pair whose side is a prefix of it (inside a block: of what follows
# `blocks.N.`), and left as it is when none is.
_TOP_NAMES = [
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
]
_BLOCK_NAMES = [
    ("scale_shift_table", "modulation"),
    ("attn1.to_out.0.", "self_attn.o."),
    ("attn2.to_out.0.", "cross_attn.o."),
    *[(f"attn{i}.to_{p}.", f"{attn}.{p}.") for i, attn in ((1, "self_attn"), (2, "cross_attn")) for p in "qkv"],
    ("attn1.norm_", "self_attn.norm_"),
    ("attn2.norm_", "cross_attn.norm_"),
    ("norm2.", "norm3."),  # diffusers' norm2 is the affine cross-attn norm
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
]
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def _rename(name: str, src: int) -> str:
    """src 0: diffusers -> original Wan name; src 1: the other way."""
    block = re.match(r"blocks\.\d+\.", name)
    head = block.group() if block else ""
    for pair in _BLOCK_NAMES if block else _TOP_NAMES:
        if name.startswith(pair[src], len(head)):
            return head + pair[1 - src] + name[len(head) + len(pair[src]):]
    return name


def to_original_name(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return _rename(name, 0)


def to_diffusers_name(name: str) -> str:
    return _rename(name, 1)



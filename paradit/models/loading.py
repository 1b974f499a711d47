"""Checkpoint loading: diffusers and original Wan layouts, via safetensors, onto the meta device.

The model is built on the meta device (no allocation), each tensor is read from the safetensors
mmap, converted to the target dtype on the target device, and assigned. A missing, unexpected or
wrongly shaped tensor is an error naming it (and the file it came from).

Modules are built and assigned under paradit.models.build's lock (why: its docstring); parameter
names are renamed between the layouts by paradit.models.names.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from paradit.config import PRESETS, WanConfig
from paradit.errors import CheckpointError
from paradit.models.build import BUILD_LOCK, assign_weights, build_on_meta  # noqa: F401 (re-exported)
from paradit.models.names import _PREFIXES, to_diffusers_name, to_original_name  # noqa: F401 (re-exported)
from paradit.models.transformer import WanTransformer

# Parameters of the Wan2.1 I2V image branch, which paradit does not implement.
_UNSUPPORTED = re.compile(r"(add_[kv]_proj|norm_added_k|image_embedder|img_emb|k_img|v_img|norm_k_img)")


@dataclass
class TensorIndex:
    """Where each tensor lives: file and stored name, by its original-layout name (index_checkpoint)
    or by the stored name itself (index_folder, layout "stored")."""
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
    config: dict | None = None
    layout: str = "original"  # "diffusers" | "original" | "stored"

    @property
    def names(self) -> list[str]:
        return list(self.files)


def _weight_files(path: Path) -> list[Path]:
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            lost = [k for k, f in weight_map.items() if path / f in missing]
            raise CheckpointError(f"checkpoint {path} is incomplete: the index {indexes[0].name} names "
                                  f"shard(s) that do not exist: {', '.join(map(str, missing))}, holding "
                                  f"{len(lost)} tensor(s) such as {', '.join(lost[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} is not a checkpoint: it has no *.safetensors files "
                              f"(expected config.json + safetensors, sharded with an index or single)")
    return files


def index_folder(path: str | Path) -> TensorIndex:
    """Every tensor of a safetensors folder (sharded with an index, or not) under its stored name."""
    index = TensorIndex(layout="stored")
    for file in _weight_files(Path(path)):
        with safe_open(file, framework="pt") as f:
            index.files.update({key: (file, key) for key in f.keys()})
    return index


def index_checkpoint(path: str | Path) -> TensorIndex:
    """Find every tensor of a transformer checkpoint (a folder, or one .safetensors file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    files = [path] if path.is_file() else _weight_files(path)
    cfg_file = (path.parent if path.is_file() else path) / "config.json"
    index = TensorIndex(config=json.loads(cfg_file.read_text()) if cfg_file.exists() else None)
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"cannot read {file}: {err}") from err
        for key in keys:
            name = to_original_name(key)
            if name != key and not key.startswith(_PREFIXES):
                index.layout = "diffusers"
            if name in index.files:  # e.g. a variant file (.fp16.safetensors) beside the main one
                raise CheckpointError(f"tensor {name!r} is stored twice, as {index.files[name][1]!r} in "
                                      f"{index.files[name][0]} and as {key!r} in {file}; keep one copy")
            index.files[name] = (file, key)
    return index


def config_from_checkpoint(index: TensorIndex, base: WanConfig | None = None) -> WanConfig:
    """The architecture from config.json (diffusers or original), else inferred from shapes."""
    c = index.config or {}
    unsupported = sorted(n for n in index.files if _UNSUPPORTED.search(n))
    if c.get("image_dim") or c.get("added_kv_proj_dim") or unsupported:
        raise CheckpointError("this is a Wan2.1 I2V checkpoint with a CLIP image branch, which paradit "
                              "does not support; Wan2.2 I2V-A14B (36 input channels, no CLIP) is supported"
                              + (f" (image-branch tensors: {', '.join(unsupported[:4])})" if unsupported else ""))
    if "num_attention_heads" in c:  # diffusers
        arch = dict(dim=c["num_attention_heads"] * c["attention_head_dim"], num_heads=c["num_attention_heads"],
                    ffn_dim=c["ffn_dim"], num_layers=c["num_layers"], in_channels=c["in_channels"],
                    out_channels=c.get("out_channels") or c["in_channels"], patch=tuple(c["patch_size"]),
                    freq_dim=c["freq_dim"], text_dim=c["text_dim"], eps=c.get("eps", 1e-6),
                    cross_attn_norm=c.get("cross_attn_norm", True))
    elif "num_heads" in c:  # original Wan config.json
        arch = dict(dim=c["dim"], num_heads=c["num_heads"], ffn_dim=c["ffn_dim"], num_layers=c["num_layers"],
                    in_channels=c["in_dim"], out_channels=c["out_dim"], patch=tuple(c.get("patch_size", (1, 2, 2))),
                    freq_dim=c.get("freq_dim", 256), text_dim=c.get("text_dim", 4096), eps=c.get("eps", 1e-6),
                    cross_attn_norm=c.get("cross_attn_norm", True))
    else:
        arch = _infer_arch(index)
    for key in ("patch_embedding.weight", "head.head.weight"):
        if key not in index.files:
            raise CheckpointError(f"checkpoint has no tensor {key!r}: not a Wan transformer")
    if "num_heads" not in arch:  # tensor shapes do not tell the head count: (D, D) either way
        arch["num_heads"] = _infer_num_heads(arch["dim"], base)
    if base is None:
        base = next((p for p in PRESETS.values() if (p.dim, p.num_layers, p.in_channels) ==
                     (arch["dim"], arch["num_layers"], arch["in_channels"])), None)
        base = base or WanConfig(name="custom", **arch)
    return base.replace(**arch)


def _infer_num_heads(dim: int, given: WanConfig | None) -> int:
    """The caller's config.num_heads, else head_dim 128 (every released Wan model); never a guess."""
    if given is not None:
        if dim % given.num_heads:
            raise CheckpointError(f"config {given.name!r} has {given.num_heads} heads, which do not divide "
                                  f"the checkpoint's dim {dim}")
        return given.num_heads
    if dim % 128 == 0:
        return dim // 128
    raise CheckpointError(f"checkpoint has no config.json and dim {dim} is not a multiple of 128, so its "
                          f"head count cannot be inferred; pass config= with the right num_heads")


def _infer_arch(index: TensorIndex) -> dict:
    shape = _shape_reader(index)
    try:
        pe = shape("patch_embedding.weight")                       # (D, C, pt, ph, pw)
        dim, layers = pe[0], 1 + max(int(n.split(".")[1]) for n in index.files if n.startswith("blocks."))
        patch = tuple(pe[2:])
        return dict(dim=dim, ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_layers=layers,
                    in_channels=pe[1], out_channels=shape("head.head.weight")[0] // math.prod(patch), patch=patch,
                    freq_dim=shape("time_embedding.0.weight")[1], text_dim=shape("text_embedding.0.weight")[1],
                    cross_attn_norm="blocks.0.norm3.weight" in index.files)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint has no config.json and its tensors do not describe a Wan "
                              f"transformer ({err})") from err


def _shape_reader(index: TensorIndex) -> Callable[[str], tuple[int, ...]]:
    def shape(name: str) -> tuple[int, ...]:
        file, key = index.files[name]
        with safe_open(file, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())
    return shape


def read_tensors(index: TensorIndex, names: list[str], dtype: torch.dtype, device, threads: int = 8,
                 stats: dict | None = None, keep_fp32: Callable[[str], bool] | None = None,
                 shared=None, reader=None, out: dict | None = None, transform=None) -> dict[str, torch.Tensor]:
    """Read `names` from the page cache onto device, floating ones converted to dtype
    (paradit.models.reader: several threads; on CUDA pinned staging and the cast on the device).
    keep_fp32(name): floating tensors that stay fp32 whatever dtype is. shared: a
    paradit.parallel.weights.SharedRead when the ranks of one node that all need these tensors read
    them once between them (each a share; the rest arrives by broadcast). reader: a
    paradit.models.reader.Reader whose threads and staging serve this read (default: one of `threads`
    threads for this read alone). out: destinations allocated by the caller (pinned host memory of
    an offloaded module), by name. transform: applied to its `names` as they are read (LoraMerge)."""
    from paradit.models.reader import _into, header, read_entries
    headers = {file: header(file) for file in {index.files[n][0] for n in names}}
    entries = {n: headers[index.files[n][0]][index.files[n][1]] for n in names}
    dtypes = {n: (torch.float32 if keep_fp32 and keep_fp32(n) else dtype) if e.dtype.is_floating_point
              else e.dtype for n, e in entries.items()}
    if shared is None:
        return read_entries(entries, dtypes, device, threads, stats, reader, out, transform)
    tensors = shared.read(entries, dtypes, device, threads, stats, reader)   # then as a plain read would
    changed = transform.names if transform is not None else ()
    return {n: _into((out or {}).get(n, t), transform(n, t) if n in changed else t) for n, t in tensors.items()}


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu",
                     config: WanConfig | None = None, stats: dict | None = None, loras=(),
                     expert: str | None = None, shared=None, reader=None,
                     host: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None) -> WanTransformer:
    """Load a Wan transformer from a diffusers-layout or original-layout checkpoint.

    loras: LoraSpec entries (paradit.models.lora), merged into the weights as they load (each tensor
    as it is read, on `device`); each is checked against the checkpoint's shapes before any weight is
    read. expert: "high" or "low" when this is one expert of a Wan2.2 pair, so that specs with
    target="high" / "low" pick theirs. shared: a paradit.parallel.weights.SharedRead when the ranks of
    one node loading the same transformer read its files once between them. reader: the Reader
    (threads, pinned staging) shared by the loads running beside this one. host: for a transformer
    kept in host memory (offload): host(model) gives the meta-built model its (pinned) host tensors
    and returns them by name; the weights are read straight into them (a tensor that needs the GPU,
    for a LoRA merge or a cast, passes through `device` on the way)."""
    loras = _loras_for(loras, expert)
    index = index_checkpoint(path)
    cfg = config_from_checkpoint(index, config)
    model = build_on_meta(lambda: WanTransformer(cfg))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(index.files))
    unexpected = sorted(set(index.files) - set(expected))
    if missing or unexpected:
        unexpected = [index.files[n][1] for n in unexpected]  # as stored, so it can be found in the file
        raise CheckpointError(f"{path} does not match the {cfg.name} architecture: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} (original Wan names) "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    shapes = {n: tuple(p.shape) for n, p in expected.items()}
    _check_shapes(index, shapes, cfg.name)
    lora_files = _read_loras(loras, shapes, cfg.name)
    from paradit.models.lora import LoraMerge
    with LoraMerge(lora_files) as merge:
        if host is not None:
            with BUILD_LOCK:
                model = model.to(dtype)         # still on the meta device: the host tensors' dtype
        into = host(model) if host is not None else None
        tensors = read_tensors(index, list(expected), dtype, device, stats=stats, shared=shared, reader=reader,
                               out=into, transform=merge if lora_files else None)
    if lora_files and stats is not None:
        stats["lora"] = merge.stats()
    return assign_weights(model, tensors, str(path))


def _loras_for(loras, expert: str | None) -> list:
    """The LoRAs (LoraSpec, or LoraFile from paradit.models.lora.check_loras) this transformer gets."""
    from paradit.models.lora import LoraError, LoraFile, LoraSpec
    if expert not in (None, "high", "low"):
        raise ValueError(f"load_transformer(expert={expert!r}): give 'high', 'low' or None")
    out = []
    for item in loras or ():
        spec = item.spec if isinstance(item, LoraFile) else item
        if not isinstance(spec, LoraSpec):
            raise LoraError(f"loras=[...] takes LoraSpec(path, scale, target) entries, not {item!r}")
        if spec.target != "all" and expert is None:
            raise LoraError(f"{spec}: load_transformer loads one transformer; pass expert='high' or 'low' to say "
                            f"which one it is, or give the LoRA target='all'")
        if spec.target in ("all", expert):
            out.append(item)
    return out


def _read_loras(loras: list, shapes: dict, arch: str) -> list:
    """Each LoRA checked against the model's shapes (headers only); LoraFile entries are checked already."""
    from paradit.models.lora import LoraFile, read_lora, warn_skipped
    out = []
    for item in loras:
        if not isinstance(item, LoraFile):
            item = read_lora(item, shapes, arch)
            warn_skipped(item, arch)
        out.append(item)
    return out


def _check_shapes(index: TensorIndex, expected: dict[str, tuple[int, ...]], arch: str) -> None:
    """Compare stored shapes (from the safetensors headers) before any tensor is read."""
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(index.files[name][0], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                key = index.files[name][1]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[name]:
                    alias = f" ({name} in the original layout)" if key != name else ""
                    raise CheckpointError(f"tensor {key!r}{alias} in {file} has shape {shape}, "
                                          f"expected {expected[name]} for {arch}")


def save_original_layout(model: WanTransformer, folder: str | Path) -> None:
    """Write a transformer in the original Wan layout (config.json + one safetensors file)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    (folder / "config.json").write_text(json.dumps(dict(
        model_type=c.task, dim=c.dim, ffn_dim=c.ffn_dim, num_heads=c.num_heads, num_layers=c.num_layers,
        in_dim=c.in_channels, out_dim=c.out_channels, patch_size=list(c.patch), freq_dim=c.freq_dim,
        text_dim=c.text_dim, text_len=c.text_len, eps=c.eps, cross_attn_norm=c.cross_attn_norm), indent=1))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")

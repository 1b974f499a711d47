"""LoRAs, merged into the transformer weights once, at load time (nothing changes at run time).

A LoRA file (safetensors) is read in any of the layouts people publish for Wan:
  * diffusers / PEFT names: `transformer.blocks.N.attn1.to_q.lora_A.weight` and `.lora_B.weight`
    (and `.lora_B.bias`); an alpha, if any, in the `lora_adapter_metadata` that diffusers writes;
  * the original Wan names (`diffusion_model.blocks.N.self_attn.q.`) with kohya-style
    `lora_down.weight` / `lora_up.weight` and a per-module `alpha`, or with `lora_A` / `lora_B`;
  * full-weight deltas beside them: `.diff` (a weight, e.g. a norm's) and `.diff_b` (a bias).
Names go through the diffusers <-> original renaming table of paradit.models.loading.

Each LoRA changes W by  scale * alpha / rank * (up @ down)  (alpha / rank = 1 where the file gives
no alpha); `diff` / `diff_b` tensors add  scale * diff.  The sum over all LoRAs of a weight is
formed in fp32 on the weight's device and added in fp32; the result is cast to the weight's dtype.
`LoraMerge` does it one weight at a time, so that the checkpoint reader merges each weight on the
GPU as it is read (paradit.models.reader), offloaded experts' included; its checks refuse NaN and
infinite LoRA tensors, a strength x alpha / rank beyond MAX_EFFECT and merged weights that overflow.

A file is checked against the model's shapes from its safetensors header alone, before any weight
is read: a tensor whose shape does not fit is an error (naming the key and both shapes), a LoRA
that names no weight of the model is an error, one that names only some gets a warning listing
what it skips.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from paradit.config import WanConfig
from paradit.models.names import to_original_name

log = logging.getLogger("paradit")

TARGETS = ("all", "high", "low")           # every expert, the high-noise one, the low-noise one
FLAGS = {"all": "--lora", "high": "--lora-high", "low": "--lora-low"}
# tensor-name suffix -> its role in a module's change
_ROLES = {".lora_A.weight": "down", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_up.weight": "up",
          ".lora_B.bias": "up_bias", ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b"}
_PREFIXES = ("transformer.", "base_model.model.")   # diffusers' pipeline component, PEFT's wrapper
_UNSUPPORTED = {"dora_scale": "DoRA (dora_scale)", "lora_magnitude_vector": "DoRA", "hada_": "LoHa",
                "lokr_": "LoKr", "lora_mid": "LoCon with a mid weight"}
_METADATA_KEY = "lora_adapter_metadata"   # diffusers' save_lora_weights: a PEFT LoraConfig as JSON


class LoraError(ValueError):
    """A LoRA file that is missing, not a LoRA, or does not fit the model."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to merge: the file, its strength, and the expert(s) it is for."""
    path: str | Path
    scale: float = 1.0
    target: str = "all"   # "all" (every expert), "high" / "low" (one Wan2.2 expert)

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path).strip():
            raise LoraError(f"LoraSpec(path={self.path!r}): give the .safetensors file's path")
        if self.target not in TARGETS:
            raise LoraError(f"LoraSpec(target={self.target!r}): choose one of {', '.join(TARGETS)}")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise LoraError(f"LoraSpec(scale={self.scale!r}) for {self.path}: give a finite number")

    def __str__(self) -> str:
        return f"{FLAGS[self.target]} {self.path}:{self.scale:g} (target={self.target!r})"


def parse_lora(text: str, target: str = "all") -> LoraSpec:
    """A --lora / --lora-high / --lora-low value, PATH or PATH:SCALE."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return LoraSpec(path, float(tail), target)
        except ValueError:
            if not Path(text).exists():
                raise LoraError(f"{FLAGS[target]} {text!r}: write PATH or PATH:SCALE with a finite number SCALE, "
                                f"e.g. lora.safetensors:0.8") from None
    return LoraSpec(text, 1.0, target)


def lora_specs(every: list[str] | None = None, high: list[str] | None = None,
               low: list[str] | None = None) -> list[LoraSpec]:
    """The specs of the CLI's repeatable --lora, --lora-high and --lora-low values, in that order."""
    return [parse_lora(text, target) for target, texts in (("all", every), ("high", high), ("low", low))
            for text in texts or ()]


# ----------------------------------------------------------------------------- checking (headers only)
@dataclass(frozen=True)
class Patch:
    """One change to one model tensor: (up, down) of a LoRA, or a full delta."""
    param: str                 # the model's name (original Wan layout)
    keys: tuple[str, ...]      # (up, down) | (up_bias,) | (diff,) | (diff_b,) as stored in the file
    rank: int | None = None    # LoRA rank (None for a full delta)
    alpha_key: str | None = None
    alpha: float | None = None  # from the file's metadata, where it has no alpha tensor


@dataclass(frozen=True)
class LoraFile:
    """A LoRA checked against a model: what it changes, and what it names that the model lacks."""
    spec: LoraSpec
    patches: tuple[Patch, ...]
    skipped: tuple[str, ...]   # keys naming no tensor of the model

    @property
    def path(self) -> Path:
        return Path(self.spec.path)


@lru_cache(maxsize=8)
def model_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the architecture by its original Wan name, built on the meta device."""
    from paradit.models.build import build_on_meta
    from paradit.models.transformer import WanTransformer
    model = build_on_meta(lambda: WanTransformer(cfg))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_loras(specs, cfg: WanConfig, warn: bool = True) -> list[LoraFile]:
    """Check every LoRA against the architecture (headers only; every rank the same); warn about
    names the model lacks (warn=False where the same specs are checked again later). Errors name
    the flag / LoraSpec, the key and the shapes."""
    files, errors = [], []
    for spec in specs or ():
        try:
            files.append(_check_one(spec, cfg))
        except LoraError as err:  # every bad LoRA is named at once
            errors.append(str(err))
    if errors:
        raise LoraError(errors[0] if len(errors) == 1 else
                        f"{len(errors)} LoRAs cannot be used: " + " | ".join(f"({i + 1}) {e}" for i, e in enumerate(errors)))
    for lf in files if warn else ():
        warn_skipped(lf, cfg.name)
    return files


def _check_one(spec, cfg: WanConfig) -> "LoraFile":
    if not isinstance(spec, LoraSpec):
        raise LoraError(f"loras=[...] takes LoraSpec(path, scale, target) entries, not {spec!r}")
    if spec.target != "all" and cfg.num_experts == 1:
        raise LoraError(f"{spec}: {cfg.name} has one expert, so there is no high- or low-noise expert to "
                        f"choose; give the LoRA with --lora (target='all')")
    return read_lora(spec, model_shapes(cfg), cfg.name)


def warn_skipped(lf: "LoraFile", arch: str) -> None:
    if lf.skipped:
        modules = list(dict.fromkeys(_module_of(k) for k in lf.skipped))
        log.warning("LoRA %s: %d of its tensors (%d modules) name nothing in %s and are skipped: %s%s", lf.path,
                    len(lf.skipped), len(modules), arch, ", ".join(modules[:10]), " ..." if len(modules) > 10 else "")


def _module_of(key: str) -> str:
    return next((key[:-len(s)] for s in _ROLES if key.endswith(s)), key)


def for_expert(files: list[LoraFile], expert: int, num_experts: int) -> list[LoraFile]:
    """The LoRAs expert `expert` (0 = high-noise or only, 1 = low-noise) gets."""
    name = ("high", "low")[expert] if num_experts == 2 else None
    return [lf for lf in files if lf.spec.target in ("all", name)]


def read_lora(spec: LoraSpec, shapes: dict[str, tuple[int, ...]], arch: str) -> LoraFile:
    """Match a LoRA file's names and header shapes to the model's tensors; read no tensor."""
    path = Path(spec.path)
    if not path.is_file():
        raise LoraError(f"{spec}: no such file" + (" (it is a folder; name the .safetensors file)"
                                                   if path.is_dir() else ""))
    try:
        with safe_open(path, framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a file that is not one
        raise LoraError(f"{spec}: not a safetensors LoRA file ({err})") from None
    modules, unknown = _group(stored)
    if not modules:
        raise LoraError(f"{spec}: not a LoRA: none of its {len(stored)} tensors ({', '.join(list(stored)[:3])}"
                        f"{', ...' if len(stored) > 3 else ''}) ends in lora_A/lora_B.weight, lora_down/lora_up"
                        f".weight, alpha, diff or diff_b")
    if unknown:
        kinds = sorted({name for part, name in _UNSUPPORTED.items() for k in unknown if part in k})
        raise LoraError(f"{spec}: {len(unknown)} tensor(s) paradit cannot merge"
                        f"{' (' + ', '.join(kinds) + ')' if kinds else ''}: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}; paradit merges plain LoRAs (lora_A/lora_B, "
                        f"lora_down/lora_up with alpha) and diff/diff_b deltas")
    alpha = _metadata_alpha(metadata, spec)
    patches, skipped, errors = [], [], []
    for module, roles in modules.items():
        _match(module, roles, stored, shapes, alpha, patches, skipped, errors)
    if errors:
        raise LoraError(f"{spec} does not fit {arch}: " + "; ".join(errors[:3])
                        + (f"; and {len(errors) - 3} more" if len(errors) > 3 else ""))
    if not patches:
        raise LoraError(f"{spec} changes nothing in {arch}: none of its {len(stored)} tensors names a weight of "
                        f"the model (e.g. {', '.join(skipped[:3])}); is it a LoRA for another model?")
    return LoraFile(spec, tuple(patches), tuple(skipped))


def _group(stored: dict[str, tuple]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module: {role: key}} of the LoRA tensors, and the keys with no known role."""
    modules, unknown = {}, []
    for key in stored:
        suffix = next((s for s in _ROLES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        module = key[:-len(suffix)]
        module = next((module[len(p):] for p in _PREFIXES if module.startswith(p)), module)
        roles = modules.setdefault(module, {})
        if _ROLES[suffix] in roles:
            raise LoraError(f"LoRA tensors {roles[_ROLES[suffix]]!r} and {key!r} are the same "
                            f"{_ROLES[suffix]} of {module!r}: keep one")
        roles[_ROLES[suffix]] = key
    return modules, unknown


def _metadata_alpha(metadata: dict, spec: LoraSpec) -> float | None:
    """lora_alpha of diffusers' saved PEFT config (keys prefixed `transformer.`), if any."""
    if _METADATA_KEY not in metadata:
        return None
    try:
        config = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise LoraError(f"{spec}: its {_METADATA_KEY} is not JSON ({err})") from None
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    for key in ("alpha_pattern", "use_rslora", "use_dora"):
        if config.get(key):
            raise LoraError(f"{spec}: its PEFT config sets {key}={config[key]!r}, which paradit does not merge")
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None


def _match(module, roles, stored, shapes, meta_alpha, patches, skipped, errors) -> None:
    """Append the module's patches (or its keys to skipped, or the misfits to errors)."""
    weight = to_original_name(module + ".weight")
    bias = to_original_name(module + ".bias")
    if "down" in roles or "up" in roles or "up_bias" in roles:
        missing = [r for r in ("down", "up") if r not in roles]
        if missing:
            have = " and ".join(roles[r] for r in ("down", "up", "up_bias") if r in roles)
            errors.append(f"{have} has no {' or '.join(missing)} matrix beside it (down: lora_A / lora_down, "
                          f"up: lora_B / lora_up)")
            return
    elif "alpha" in roles:
        errors.append(f"{roles['alpha']} is an alpha with no lora_down/lora_up beside it")
        return
    if weight not in shapes and "diff" in roles and to_original_name(module) in shapes:
        weight = to_original_name(module)      # a bare parameter, e.g. blocks.N.modulation
    if weight not in shapes and bias not in shapes:
        skipped.extend(roles.values())
        return
    if "down" in roles:
        up, down = stored[roles["up"]], stored[roles["down"]]
        want, rank = shapes.get(weight), down[0] if down else 0
        fits = (want is not None and len(want) >= 2 and len(up) >= 2 and up[0] == want[0] and up[1] == rank
                and math.prod(up[2:]) == 1 and down[1:] == want[1:] and rank > 0)
        if not fits:
            errors.append(f"{roles['up']} {up} @ {roles['down']} {down} (up @ down) does not make {weight} "
                          f"{want} (up: (out, rank), down: (rank, in))")
        alpha_key = roles.get("alpha")
        if alpha_key is not None and math.prod(stored[alpha_key]) != 1:
            errors.append(f"{alpha_key} has shape {stored[alpha_key]}, expected one number")
        alpha = meta_alpha if alpha_key is None else None
        if fits:
            patches.append(Patch(weight, (roles["up"], roles["down"]), rank, alpha_key, alpha))
        if "up_bias" in roles:
            _full(bias, roles["up_bias"], stored, shapes, patches, errors, rank, alpha_key, alpha)
    if "diff" in roles:
        _full(weight, roles["diff"], stored, shapes, patches, errors)
    if "diff_b" in roles:
        _full(bias, roles["diff_b"], stored, shapes, patches, errors)


def _full(param, key, stored, shapes, patches, errors, rank=None, alpha_key=None, alpha=None) -> None:
    if stored[key] != shapes.get(param):
        errors.append(f"{key} has shape {stored[key]}, expected {shapes.get(param)} for {param}"
                      if param in shapes else f"{key} names {param}, which the model does not have")
        return
    patches.append(Patch(param, (key,), rank, alpha_key, alpha))


# ----------------------------------------------------------------------------- merging
# |strength x alpha / rank| beyond this is no LoRA anyone means: the merged weights, finite as they
# may be (1e30 x a delta fits fp32 and bf16), overflow the activations and the video comes out black.
MAX_EFFECT = 1e4


class LoraMerge:
    """The LoRAs of one transformer, merged one tensor at a time wherever the tensor is (the GPU as
    the weights pass through it: paradit.models.reader applies it per tensor). `names`: the tensors
    it changes. Safe to call from several threads. Refuses, naming the file and the tensor, a LoRA
    tensor that is not finite, a strength x alpha / rank that is not finite or beyond MAX_EFFECT,
    and a merged weight that is not finite."""

    def __init__(self, files: list[LoraFile]):
        self.files = files
        self.by_param: dict[str, list[tuple[int, Patch]]] = {}
        for i, lf in enumerate(files):
            for p in lf.patches:
                self.by_param.setdefault(p.param, []).append((i, p))
        self.names = frozenset(self.by_param)
        self._stack = ExitStack()
        self.handles = [self._stack.enter_context(safe_open(lf.path, framework="pt", device="cpu")) for lf in files]
        self._lock = threading.Lock()
        self.bytes, self.seconds, self.merged = 0, 0.0, 0

    def __call__(self, param: str, w: torch.Tensor) -> torch.Tensor:
        """(W fp32 + the sum of its fp32 deltas) cast to W's dtype, on W's device: a new tensor (W
        may be a read-only view of a checkpoint's mmap)."""
        t0 = time.perf_counter()
        merged = w.float()
        if merged is w:
            merged = w.clone()
        nbytes = 0
        for i, p in self.by_param[param]:
            with self._lock:                                 # one reader of each file at a time
                parts = [self.handles[i].get_tensor(k) for k in p.keys]
                scale = _scale(self.files[i].spec, p, self.handles[i])
            self._check(i, p, parts, scale)
            parts = [t.to(w.device, torch.float32) for t in parts]
            nbytes += sum(t.numel() * t.element_size() for t in parts)
            merged += scale * _delta(parts, w.shape)
        out = merged.to(w.dtype)
        if not bool(torch.isfinite(out).all()):
            names = ", ".join(f"{self.files[i].path} ({p.keys[0]})" for i, p in self.by_param[param])
            raise LoraError(f"merging {names} into {param} gives values that are not finite in {w.dtype} "
                            f"(an overflow): lower the LoRA's strength")
        with self._lock:
            self.bytes, self.seconds, self.merged = (self.bytes + nbytes, self.seconds + time.perf_counter() - t0,
                                                     self.merged + 1)
        return out

    def _check(self, i: int, p: Patch, parts: list[torch.Tensor], scale: float) -> None:
        spec = self.files[i].spec
        for key, t in zip(p.keys, parts):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LoraError(f"{spec}: its tensor {key} holds NaN or infinite values")
        if not math.isfinite(scale) or abs(scale) > MAX_EFFECT:
            alpha = f"alpha {self.handles[i].get_tensor(p.alpha_key).item() if p.alpha_key else p.alpha} " \
                    f"({p.alpha_key or 'metadata'}), rank {p.rank}, " if p.rank else ""
            why = "not finite" if not math.isfinite(scale) else "beyond any useful strength"
            raise LoraError(f"{spec}: strength x alpha / rank = {scale:g} for {p.keys[0]} ({alpha}strength "
                            f"{spec.scale:g}) is {why} (|..| <= {MAX_EFFECT:g}): the merged weights would "
                            f"overflow the activations")

    def stats(self) -> dict:
        return dict(files=[str(lf.path) for lf in self.files], tensors=self.merged, bytes=self.bytes,
                    seconds=self.seconds)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_loras(tensors: dict[str, torch.Tensor], files: list[LoraFile], stats: dict | None = None) -> None:
    """Replace each tensor the LoRAs change by its merge (LoraMerge), on the tensor's device."""
    with LoraMerge(files) as merge:
        for param in merge.by_param:
            tensors[param] = merge(param, tensors[param])
    if stats is not None:
        stats.update(merge.stats())


def _scale(spec: LoraSpec, p: Patch, handle) -> float:
    """strength x alpha / rank (alpha / rank = 1 without an alpha; 1 for a full delta)."""
    alpha = handle.get_tensor(p.alpha_key).float().item() if p.alpha_key else p.alpha
    return spec.scale * (alpha / p.rank if alpha is not None and p.rank else 1.0)


def _delta(parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    if len(parts) == 1:                                     # diff / diff_b / lora_B.bias
        return parts[0]
    up, down = parts                                        # (out, r, 1...), (r, in...)
    return (up.flatten(1) @ down.flatten(1)).view(shape)   # (out, in...)


def apply_loras(model: torch.nn.Module, files: list[LoraFile], stats: dict | None = None) -> None:
    """Merge into a model already in memory (the tiny and demo presets)."""
    if not files:
        return
    tensors = dict(model.state_dict())
    names = {p.param for lf in files for p in lf.patches}
    merge_loras(tensors, files, stats)
    model.load_state_dict({n: tensors[n] for n in names}, strict=False)

"""Pipeline checkpoints: where the parts are, what model they are, and a lean, concurrent load.

Two layouts are read:
  * diffusers: model_index.json, transformer/ (high-noise expert), transformer_2/ (low-noise
    expert; absent for one-expert models), text_encoder/ (umT5), tokenizer/, vae/, scheduler/;
  * original: high_noise_model/ and low_noise_model/ (or one transformer folder) of safetensors.
    Its text encoder and VAE are .pth pickles that paradit does not read: they come from a
    diffusers-layout folder named by `components=` (CLI `--components PATH`), e.g. the matching
    Wan-AI/Wan2.2-*-Diffusers download; its text_encoder/, tokenizer/ and vae/ are used.
`components=` also overrides the text encoder and VAE of a diffusers-layout folder.

The model kind comes from the configs alone (no tensor is read): input channels 16 / 36 / 48,
one expert or two, the VAE's z_dim. Sampling defaults (steps, shift, guidance pair, boundary, fps,
negative prompt) come from the kind's preset in paradit.config; the boundary from model_index.json's
boundary_ratio where it has one. Architecture fields come from the checkpoint.

Loading is per rank and lean: a rank reads only the experts it runs (`experts_needed`, indices
0 = high-noise or only expert, 1 = low-noise), straight from the safetensors mmap to its device in
the target dtype; only the first rank of a request loads the text encoder (it encodes and
broadcasts), and only ranks that encode images or decode videos load the VAE. The experts, the
text encoder and the VAE are read concurrently in threads, each built on the meta device and
assigned under paradit.models.loading.BUILD_LOCK (no library's process-wide construction patch can
reach a module another thread builds). The experts share one paradit.models.reader.Reader: its
threads read the page cache straight into pinned staging slots (allocated once) and copy them to
the GPU, casting there. LoRAs (`loras=`, paradit/models/lora.py) are checked from their headers
with the configs, and merged into each weight as it is read, on the GPU. Experts (and the text
encoder) that the offload mode keeps in host memory are read straight into their page-locked host
buffers (paradit.offload.offload_on_load), a weight with a LoRA passing through the GPU for its
merge. Phase timings land in `pipe.startup`, bytes read per component in `pipe.load_stats` ("bytes"
from the files, "received_bytes" from peers).

Once per node (`read_once`, paradit.parallel.weights): the ranks of one node that load the same
expert read its files once between them, each a share, the rest by broadcast. Who shares what
follows from each rank's experts_needed, gathered over the world. Default (None): on where the
experts go to a GPU and at least two ranks of a node load the same expert; PARADIT_READ_ONCE=0 / 1
in the environment turns it off / on; off on the CPU (gloo over loopback TCP is slower than each
rank reading the page cache). Pipeline.from_pretrained(read_once=...) passes it on. With weight
sharding (the layout's shard_weights) each rank reads only its shards of the blocks instead
(paradit.parallel.shard_read); with LoRAs, merged per whole weight, it reads whole and shards after.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import torch

from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.events import phase, timed
from paradit.models.loading import (CheckpointError, TensorIndex, config_from_checkpoint, index_checkpoint,
                                    load_transformer, to_diffusers_name)

log = logging.getLogger("paradit")

EXPERT_DIRS = {"diffusers": ("transformer", "transformer_2"), "original": ("high_noise_model", "low_noise_model")}
COMPONENT_DIRS = ("text_encoder", "tokenizer", "vae")
ARCH_FIELDS = ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "patch",
               "freq_dim", "text_dim", "eps", "cross_attn_norm")


@dataclass(frozen=True)
class Checkpoint:
    """Where the parts of a checkpoint are; nothing is read but directory listings."""
    root: Path
    layout: str                  # "diffusers" | "original" | "transformer" (one bare transformer folder)
    experts: tuple[Path, ...]    # high-noise expert first
    components: Path | None      # the diffusers-layout folder holding text_encoder/, tokenizer/, vae/

    def component(self, name: str) -> Path:
        if self.components is None:
            raise CheckpointError(
                f"{self.root} holds transformer weights only ({self.layout} layout; the original layout's text "
                f"encoder and VAE are .pth files paradit does not read): pass components= (CLI --components "
                f"PATH) naming a diffusers-layout folder of the same model (e.g. Wan2.2-T2V-A14B-Diffusers); "
                f"its text_encoder/, tokenizer/ and vae/ are used")
        return self.components / name


def locate(path: str | Path, components: str | Path | None = None) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise ParameterError("model", str(path), f"not a preset name and not a checkpoint folder (presets: "
                             f"{', '.join(WanConfig.names())})")
    layout, experts = None, []
    for name, (high, low) in EXPERT_DIRS.items():
        if (path / high).is_dir():
            layout, experts = name, [path / high] + ([path / low] if (path / low).is_dir() else [])
            break
    if layout is None and (path / "config.json").exists() and any(path.glob("*.safetensors*")):
        layout, experts = "transformer", [path]
    if layout is None:
        raise ParameterError("model", str(path), "not a Wan checkpoint: expected model_index.json with transformer/ "
                             "(and transformer_2/), or high_noise_model/ and low_noise_model/")
    index = _read_json(path / "model_index.json")
    if layout == "diffusers" and (index.get("transformer_2") or [None])[0] and len(experts) == 1:
        raise CheckpointError(f"{path / 'model_index.json'} lists transformer_2 (the low-noise expert), but "
                              f"{path / 'transformer_2'} does not exist: the download is incomplete")
    if components is None and layout == "diffusers":
        components = path
    if components is not None:
        components = Path(components)
        missing = [d for d in COMPONENT_DIRS if not (components / d).is_dir()]
        if missing:
            raise CheckpointError(f"{components} has no {', '.join(d + '/' for d in missing)} folder: the text "
                                  f"encoder, tokenizer and VAE come from a diffusers-layout folder")
    return Checkpoint(path, layout, tuple(experts), components)


def _read_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON ({err})") from None


def expert_folders(path: str | Path) -> list[Path]:
    """The transformer folder(s) of a checkpoint, high-noise expert first."""
    return list(locate(path).experts)


# ----------------------------------------------------------------------------- the model kind
def expert_config(folder: Path) -> WanConfig:
    """A transformer folder's architecture from its config.json alone (no weight file is opened);
    from the safetensors headers where there is no config.json."""
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        return config_from_checkpoint(index_checkpoint(folder))
    # config_from_checkpoint needs only the config here; the two names stand in for the index,
    # which is checked against the model when (and only where) the weights are read.
    stub = TensorIndex(files={n: (cfg_file, n) for n in ("patch_embedding.weight", "head.head.weight")},
                       config=_read_json(cfg_file))
    return config_from_checkpoint(stub)


def _kind(arch: WanConfig, experts: int, z_dim: int, expand_timesteps: bool, where: str, vae_file: Path) -> str:
    """The preset whose sampling defaults fit: from input channels, expert count and VAE z_dim."""
    i, o = arch.in_channels, arch.out_channels
    found = (f"{where} has in_channels {i} (input dim of patch_embedding.weight) and out_channels {o} "
             f"(proj_out.weight); {vae_file} has z_dim {z_dim}")
    if i == 48 or z_dim == 48 or expand_timesteps:
        if (i, o, z_dim) != (48, 48, 48) or experts != 1:
            raise CheckpointError(f"mismatched checkpoint: TI2V-5B needs in_channels = out_channels = VAE z_dim "
                                  f"= 48 and one transformer; {found}, {experts} transformer(s)")
        return "wan2.2-ti2v-5b"
    if z_dim != 16 or o != 16 or i not in (16, 36):
        raise CheckpointError(f"not a Wan model kind paradit knows (16 input channels: T2V, 36: I2V-A14B, 48: "
                              f"TI2V-5B, with a z_dim 16 VAE except TI2V): {found}")
    if i == 36:
        return "wan2.2-i2v-a14b"
    if experts == 2:
        return "wan2.2-t2v-a14b"
    return "wan2.1-t2v-1.3b" if arch.dim == 1536 else "wan2.1-t2v-14b"


# Wan2.1 T2V-1.3B's width, the smallest released Wan model: a narrower checkpoint is a test or toy
# model, whose default video is the tiny preset's (64x64, 9 frames), not its kind's (1280x720x81).
SMALLEST_WAN_DIM = 1536


def model_config(path: str | Path, components: str | Path | None = None) -> WanConfig:
    """Architecture and sampling defaults of a checkpoint, from its JSON configs only (cheap; the
    same on every rank)."""
    ck = path if isinstance(path, Checkpoint) else locate(path, components)
    archs = [expert_config(f) for f in ck.experts]
    arch = {k: getattr(archs[0], k) for k in ARCH_FIELDS}
    for folder, other in zip(ck.experts[1:], archs[1:]):
        diff = {k: (v, getattr(other, k)) for k, v in arch.items() if getattr(other, k) != v}
        if diff:
            raise CheckpointError(f"the two experts disagree: {ck.experts[0]}/config.json vs {folder}/config.json "
                                  f"differ in {diff}")
    vae_file, text_file = ck.component("vae") / "config.json", ck.component("text_encoder") / "config.json"
    vae_cfg, text_cfg = _read_json(vae_file), _read_json(text_file)
    if "z_dim" not in vae_cfg:
        raise CheckpointError(f"{vae_file} is missing or has no z_dim: not an AutoencoderKLWan config")
    index = _read_json(ck.root / "model_index.json")
    where = f"{ck.experts[0] / 'config.json'}"
    kind = _kind(archs[0], len(ck.experts), vae_cfg["z_dim"], bool(index.get("expand_timesteps")), where, vae_file)
    if text_cfg.get("d_model") != arch["text_dim"]:
        raise CheckpointError(f"{text_file} has d_model {text_cfg.get('d_model')}, but {where} expects "
                              f"text_dim {arch['text_dim']} (input dim of text_embedding.0.weight): mismatched "
                              f"text encoder")
    base = WanConfig.preset(kind)
    spatial = vae_cfg.get("scale_factor_spatial") or 8
    boundary = (index.get("boundary_ratio") or base.boundary) if len(ck.experts) == 2 else None
    text_len = _read_json(ck.experts[0] / "config.json").get("text_len", base.text_len)  # original configs say
    evidence = (f"{where}: in_channels {arch['in_channels']} (input dim of patch_embedding.weight), "
                f"{len(ck.experts)} expert(s); {vae_file}: z_dim {vae_cfg['z_dim']}")
    video = {}
    if arch["dim"] < SMALLEST_WAN_DIM:  # a test-sized model: a test-sized default video, not 1280x720x81
        tiny = WanConfig.preset("tiny")
        video = dict(size=tiny.size, frames=tiny.frames)
    return base.replace(**arch, **video, boundary=boundary, z_dim=vae_cfg["z_dim"], text_len=text_len,
                        vae="wan2.2" if vae_cfg["z_dim"] == 48 else "wan2.1",
                        vae_stride=(vae_cfg.get("scale_factor_temporal") or 4, spatial, spatial),
                        extra=dict(checkpoint=str(ck.root), layout=ck.layout, evidence=evidence,
                                   components=str(ck.components) if ck.components else None))


# ----------------------------------------------------------------------------- loading
def _normalise_needed(needed, num_experts: int) -> list[int]:
    if needed is None:
        return list(range(num_experts))
    names = {"high": 0, "low": 1}
    out = sorted({names.get(k, k) for k in needed})
    bad = [k for k in out if k not in range(num_experts)]
    if bad:
        raise ValueError(f"experts_needed={sorted(needed, key=str)}: this model has {num_experts} expert(s), "
                         f"numbered 0 (high-noise{' or only' if num_experts == 1 else ''})"
                         f"{' and 1 (low-noise)' if num_experts == 2 else ''}")
    return out


def reader_threads(node_size: int) -> int:
    """Reading threads per rank: the node's cores shared by its ranks, 4 to 16."""
    return max(4, min(16, (os.cpu_count() or 8) // max(1, node_size)))


def load_components(spec, mesh):
    """The components of a checkpoint folder (spec: paradit.runspec.BuildSpec) under `mesh`: configs
    and LoRA headers first (every error before any weight is read), then this rank's share of the
    weights, concurrently, LoRAs merged as they load. Components that the offload mode keeps in host
    memory (paradit.residency) are read into host memory, not onto the device. spec.read_once: the
    ranks of one node that load the same expert read its files once between them (None: where the
    experts go to a GPU, or as PARADIT_READ_ONCE says; see the module docstring)."""
    from paradit.models.lora import check_loras
    from paradit.models.reader import Reader, quick_gil_handoff
    from paradit.parallel.weights import InTurn, SharedRead, node_read_groups
    from paradit.residency import experts_on_host
    from paradit.models.attention import build_kernels_ahead, pick_backend
    from paradit.parallel.attention import local_heads
    startup: dict[str, float] = {}   # the phases' seconds (paradit.events), then finish_startup's figures
    with phase("config", startup):   # the configs, the offload mode, the read-once groups
        ck, device = locate(spec.model, spec.components), mesh.device
        cfg = model_config(ck)
        needed = _normalise_needed(spec.experts_needed, cfg.num_experts)
        dtype = spec.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        mode = spec.offload   # concrete: build_spec resolved "auto"
        on_host = experts_on_host(mode, len(needed))              # read straight into pinned host buffers
        groups, node_size = node_read_groups(needed, torch.device("cpu") if on_host else device, spec.read_once)
        turns = InTurn(sorted(groups))
        shared = {k: SharedRead(group, turns.turn(k)) for k, group in groups.items()}
    with phase("lora_check", startup if spec.loras else None):   # LoRA headers against the model's shapes
        lora_files = check_loras(spec.loras, cfg)   # every expert's, on every rank: the same errors everywhere
    stats: dict[str, dict] = {}
    experts: list = [None] * cfg.num_experts
    reader = Reader(device, threads=reader_threads(node_size))
    with phase("load", startup), reader, quick_gil_handoff(), ThreadPoolExecutor(max_workers=len(needed) + 4) as pool:
        with phase("weights", startup):   # the experts, loaded side by side
            jobs = {k: pool.submit(*expert_load(ck, k, mesh, dtype, cfg, stats, reader, lora_files, shared, on_host))
                    for k in needed}
            text_job, warm_job, vae_job = component_jobs(pool, ck, cfg, mesh.roles.components, dtype, device,
                                                         mode, stats, startup)
            kernel_job = pool.submit(timed, "attention_kernel", startup, build_kernels_ahead,  # flash-attn-4's build
                                     pick_backend(device, dtype, spec.attention), device,
                                     local_heads(mesh, cfg.num_heads), cfg.head_dim, dtype)
            try:
                for k, job in jobs.items():
                    experts[k] = job.result()
            except BaseException:
                turns.cancel()
                raise
        text, _, vae = (job.result() if job else None for job in (text_job, warm_job, vae_job))
        kernel_job.result()
    finish_startup(startup, [experts[k] for k in needed] if on_host else [], bool(lora_files), reader, stats)
    log_startup(startup, [ck.experts[k].name for k in needed], stats, reader.threads, len(groups), len(lora_files))
    from paradit.components import Components
    return Components(cfg, experts, text, vae, startup, stats)


def expert_load(ck, k: int, mesh, dtype, cfg, stats: dict, reader, lora_files, shared: dict, on_host: bool) -> tuple:
    """(function, *args) that loads expert k: its shards where its blocks are sharded (paradit.parallel.
    shard_read), else whole with its LoRAs merged as they are read (read once per node where shared;
    into host buffers, page-locked once filled, where the experts are offloaded)."""
    from paradit.models.lora import for_expert
    from paradit.offload import offload_on_load, then_pinned
    from paradit.parallel.shard_read import load_sharded_expert
    name, loras = ck.experts[k].name, for_expert(lora_files, k, cfg.num_experts)
    if mesh.shard_mesh is not None and not lora_files:   # sharded weights: each rank reads its shards
        return load_sharded_expert, ck.experts[k], mesh.shard_mesh, dtype, mesh.device, cfg, \
            stats.setdefault(name, {}), reader
    if mesh.shard_mesh is not None:
        log.info("weight sharding with LoRAs: %s is read whole and merged, then sharded", name)
    host = offload_on_load(mesh.device, pin=bool(loras)) if on_host else None
    return then_pinned, partial(load_transformer, dtype=dtype, device=mesh.device, config=cfg,
                                stats=stats.setdefault(name, {}), loras=loras, reader=reader, shared=shared.get(k),
                                host=host, expert=("high", "low")[k] if cfg.num_experts == 2 else None), ck.experts[k]


def component_jobs(pool, ck, cfg, parts, dtype, device, mode: str, stats: dict, startup: dict) -> tuple:
    """The text encoder's load, its warm-up and the VAE's load, submitted to `pool` where this rank
    needs them (parts), timed into startup (0 s where it needs none); the text encoder into host
    memory where `mode` offloads it. The warm-up (TextEncoder.warm_up: the default negative prompt
    encoded and cached, the first call's costs paid) runs once the text encoder is on the device; an
    offloaded one is not warmed (that would copy it to the GPU at start-up)."""
    from paradit.models.text_encoder import TextEncoder
    from paradit.models.vae import VideoVAE
    from paradit.offload import offload_on_load, text_encoder_chunks, then_pinned
    from paradit.residency import offloads_text_encoder
    on_host = offloads_text_encoder(mode)
    startup.update(text_encoder_s=0.0, text_encoder_warmup_s=0.0, vae_s=0.0)
    text_job = pool.submit(timed, "text_encoder", startup, then_pinned, TextEncoder.from_pretrained,
                           ck.component("text_encoder"), ck.component("tokenizer"), cfg.text_len, dtype=dtype,
                           device="cpu" if on_host else device, stats=stats.setdefault("text_encoder", {}),
                           host=offload_on_load(device, text_encoder_chunks) if on_host else None) \
        if "text_encoder" in parts else None
    warm_job = pool.submit(_warm_up, text_job, cfg.negative_prompt, startup) if text_job and not on_host else None
    vae_job = pool.submit(timed, "vae", startup, VideoVAE.from_pretrained, ck.component("vae"), device,
                          stats=stats.setdefault("vae", {})) if "vae" in parts else None
    return text_job, warm_job, vae_job


def _warm_up(text_job, prompt: str, startup: dict) -> None:
    """The text encoder's first call, once its load is done, as the phase text_encoder_warmup."""
    text = text_job.result()
    with phase("text_encoder_warmup", startup):
        text.warm_up(prompt)


def finish_startup(startup: dict, on_host: list, merged: bool, reader, stats: dict) -> None:
    """The start-up figures read after the loads: staging, host buffers (on_host: the experts read into
    host memory), the LoRA merge (summed over this rank's experts)."""
    from paradit.offload import host_weights_of
    startup["staging_s"] = reader.stats["staging_s"]       # pinning the experts' staging slots (inside weights_s)
    if on_host:   # the offloaded experts' host buffers: allocated, page-locked once read into (inside weights_s)
        startup["host_buffers_s"] = sum(host_weights_of(m).setup_s for m in on_host)
    if merged:  # merged inside each expert's load (part of weights_s)
        startup["lora_merge_s"] = sum(s["lora"]["seconds"] for s in stats.values() if "lora" in s)


def log_startup(startup: dict, names: list[str], stats: dict, threads: int, groups: int, loras: int) -> None:
    once = f"; read once per node with {groups} group(s)" if groups else ""
    log.info("start-up: config %.2f s; weights %.2f s (%s), text encoder %.2f s (+ warm-up %.2f s), VAE %.2f s; "
             "%.2f s in all, concurrently; read %.1f MB on this rank (%d threads%s)", startup["config_s"],
             startup["weights_s"], ", ".join(names), startup["text_encoder_s"], startup["text_encoder_warmup_s"],
             startup["vae_s"], startup["load_s"],
             sum(s.get("bytes", 0) for s in stats.values()) / 1e6, threads, once)
    if loras:
        log.info("LoRAs: %d file(s) checked in %.2f s, merged into %s in %.2f s", loras, startup["lora_check_s"],
                 ", ".join(names), startup["lora_merge_s"])


# ----------------------------------------------------------------------------- writing
def save_diffusers_layout(model, folder: str | Path, max_shard_bytes: int | None = None,
                          config_only: bool = False) -> None:
    """Write a paradit WanTransformer as diffusers writes WanTransformer3DModel: config.json and
    safetensors with diffusers' names, sharded with an index when max_shard_bytes is given
    (config_only: config.json alone, e.g. for a model on the meta device)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": c.head_dim,
        "cross_attn_norm": c.cross_attn_norm, "eps": c.eps, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim,
        "image_dim": None, "in_channels": c.in_channels, "num_attention_heads": c.num_heads,
        "num_layers": c.num_layers, "out_channels": c.out_channels, "patch_size": list(c.patch),
        "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
        "text_dim": c.text_dim}, indent=1))
    if config_only:
        return
    state = {to_diffusers_name(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "diffusion_pytorch_model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

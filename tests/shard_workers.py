"""Functions that run inside spawned gloo ranks for tests/test_sharding.py (module-level for spawn)."""
from __future__ import annotations

import torch

from paradit.models import WanTransformer
from paradit.parallel import init_parallel, parallelize
from paradit.parallel.sharding import PeakWeights, apply_weight_sharding, held_bytes, weights_held
from paradit.pipeline import Pipeline, tiny_components
from paradit.plan import ParallelConfig
from workers import NEGATIVE, PIPE_KW, PROMPT, model_inputs, tiny_config

LAYERS = 5   # more blocks than the window (1 + prefetch), so that a rank never holds them all whole


def sharded_config(heads: int):
    return tiny_config(heads).replace(num_layers=LAYERS)


def _bytes(models) -> int:
    return sum(p.numel() * p.element_size() for m in models if m is not None for p in m.parameters())


def model_run(heads: int, grid, layout: dict) -> dict:
    """The tiny expert's output under a layout with sharded weights, and its weight bytes: measured
    at the fullest moment of the forward, predicted from the shapes, and whole."""
    cfg = sharded_config(heads)
    torch.manual_seed(1)
    model = WanTransformer(cfg).eval().requires_grad_(False)
    x, t, ctx = model_inputs(cfg, grid)
    mesh = init_parallel(ParallelConfig(**layout), num_heads=cfg.num_heads)
    group = mesh.shard_mesh.size()
    expected, whole = held_bytes(model, group), _bytes([model])
    apply_weight_sharding(model, mesh.shard_mesh)
    with torch.no_grad(), PeakWeights(model) as peak:
        out = parallelize(model, mesh)(x, t, ctx)
    return dict(out=out, peak=peak.peak, expected=expected, whole=whole, group=group,
                after=weights_held(model))


def pipeline_run(heads: int, layout: dict, chords_cores: int | None = None) -> dict:
    """The tiny two-expert pipeline's final latent (None where the request does not finish) with
    sharded weights, and this rank's measured and predicted peak weight bytes."""
    from paradit.settings import ChordsSettings
    cfg = sharded_config(heads)
    pc = ParallelConfig(**layout)
    mesh = init_parallel(pc, num_heads=cfg.num_heads)
    needed = {mesh.coords["stage"]} if pc.stages else None
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32, needed=needed)
    expected = held_bytes([m for m in experts if m is not None], mesh.shard_mesh.size())
    pipe = Pipeline(cfg, experts, text if mesh.coords["stage"] == 0 else None, None, mesh=mesh)
    chords = ChordsSettings(chords_cores, None, 1) if chords_cores else None
    kw = PIPE_KW | (dict(steps=8) if chords else {})
    with PeakWeights(*experts) as peak:
        latent = pipe(PROMPT, negative_prompt=NEGATIVE, output="latent", chords=chords, **kw)
    return dict(latent=latent, peak=peak.peak, expected=expected, whole=_bytes(experts))


def chords_reference(heads: int, cores: int):
    """The single-process CHORDS latent of the same request (CHORDS approximates the sequential one)."""
    from paradit.settings import ChordsSettings
    cfg = sharded_config(heads)
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32)
    pipe = Pipeline(cfg, experts, text, None)
    return pipe(PROMPT, negative_prompt=NEGATIVE, output="latent", chords=ChordsSettings(cores, None, 1),
                **(PIPE_KW | dict(steps=8)))


def table_run(model_rows, split_rows, chords_rows) -> dict:
    """Every check of one world: {name: (model_run or None, pipeline_run)}."""
    out = {}
    for name, layout, heads, grid in model_rows:
        out[name] = model_run(heads, grid, layout), pipeline_run(heads, layout)
    for name, layout, heads in split_rows:
        out[name] = None, pipeline_run(heads, layout)
    for name, layout, heads, cores in chords_rows:
        out[name] = None, pipeline_run(heads, layout, cores)
    return out


def bad_sharding_on_every_rank(layout: dict) -> str:
    """init_parallel with a sharding the layout cannot run: the error every rank sees, as text."""
    try:
        init_parallel(ParallelConfig(**layout), num_heads=2)
    except ValueError as err:
        return str(err)
    return "no error"


def layers_run(heads: int, layout: dict | None, chords_cores: int | None = None) -> dict:
    """The tiny pipeline's final latent with offload="layers", and the device bytes of its experts'
    weights at the fullest moment (sampled as each block starts, after its copy and the next ones
    were issued), with what LayerResidency.window_bytes predicts."""
    from paradit.settings import ChordsSettings
    from paradit.streaming import weights_on_device
    cfg = sharded_config(heads)
    pc = ParallelConfig(**(layout or {}))
    mesh = init_parallel(pc, num_heads=cfg.num_heads) if layout else None
    stage = mesh.coords["stage"] if mesh is not None else 0
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32, needed={stage} if pc.stages else None)
    pipe = Pipeline(cfg, experts, text if stage == 0 else None, None, mesh=mesh)
    pipe.apply_offload("layers")
    res, peak = pipe.residency, [0]

    def sample(module, args):
        peak[0] = max(peak[0], sum(weights_on_device(experts[k], res.weights[k]) for k in res.held))
    hooks = [b.register_forward_pre_hook(sample) for m in experts if m is not None for b in m.blocks]
    chords = ChordsSettings(chords_cores, None, 1) if chords_cores else None
    latent = pipe(PROMPT, negative_prompt=NEGATIVE, output="latent", chords=chords,
                  **(PIPE_KW | (dict(steps=8) if chords else {})))
    for h in hooks:
        h.remove()
    after = sum(weights_on_device(experts[k], res.weights[k]) for k in res.held)
    return dict(latent=latent, peak=peak[0], window=max(res.window_bytes(k) for k in res.held), after=after,
                expert=_bytes(experts) / len(res.held), streamed=[e for e, op in res.log if op == "stream"])


def layers_table(rows) -> dict:
    return {name: layers_run(heads, layout, cores) for name, layout, heads, cores in rows}


def sharded_checkpoint_ranks(root: str, layout: dict) -> dict:
    """A checkpoint folder (diffusers and original layouts) loaded with sharded weights: each rank's
    latent, the bytes it read per expert, and the bytes of its local shards and whole tensors."""
    from pathlib import Path

    from ckpt_workers import RUN, SIZE
    from torch.distributed.tensor import DTensor
    from paradit.parallel.sharding import is_sharded
    out = {}
    for name, kw in (("diffusers", {}), ("original", dict(components=root))):
        path = root if name == "diffusers" else str(Path(root) / "original")
        pipe = Pipeline.from_pretrained(path, parallel=ParallelConfig(**layout), **kw)
        held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                   for m in pipe.experts for p in m.parameters())
        read = sum(s.get("bytes", 0) for k, s in pipe.load_stats.items() if k not in ("text_encoder", "vae"))
        out[name] = dict(latent=pipe(PROMPT, output="latent", **SIZE["t2v"], **RUN), held=held, read=read,
                         sharded=all(is_sharded(m) for m in pipe.experts))
    return out

"""Functions that run inside spawned gloo ranks (module-level so that spawn can import them)."""
from __future__ import annotations

import torch

from paradit.config import WanConfig
from paradit.models import WanTransformer
from paradit.parallel import init_parallel, parallelize
from paradit.pipeline import Pipeline, tiny_components
from paradit.plan import ParallelConfig

PROMPT, NEGATIVE = "a red circle moving left", "blurry"


def tiny_config(heads: int, head_dim: int = 8) -> WanConfig:
    return WanConfig.preset("tiny").replace(num_heads=heads, dim=heads * head_dim)


def model_inputs(cfg: WanConfig, grid, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    x = torch.randn(2, cfg.in_channels, f, 2 * h, 2 * w, generator=g)
    t = torch.tensor([999.0, 421.0])
    ctx = torch.randn(2, 7, cfg.text_dim, generator=g)
    return x, t, ctx


def model_output(cfg: WanConfig, grid, layout: dict | None):
    """The tiny model's output on fixed random inputs, under a layout (None: this process alone)."""
    torch.manual_seed(1)
    model = WanTransformer(cfg).eval()
    x, t, ctx = model_inputs(cfg, grid)
    with torch.no_grad():
        if layout is None:
            return model(x, t, ctx)
        mesh = init_parallel(ParallelConfig(**layout), num_heads=cfg.num_heads)
        return parallelize(model, mesh)(x, t, ctx)


PIPE_KW = dict(width=80, height=48, frames=9, steps=4, seed=7, progress=False)  # 45 tokens: divides nothing


def pipeline_latent(cfg: WanConfig, layout: dict | None, prompt: str = PROMPT, **kw):
    mesh = init_parallel(ParallelConfig(**(layout or {})), num_heads=cfg.num_heads) if layout else None
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32)
    pipe = Pipeline(cfg, experts, text, None, mesh=mesh)
    return pipe(prompt, negative_prompt=NEGATIVE, output="latent", **(PIPE_KW | kw))


def run_layout_table(rows):
    """rows: [(name, layout, heads, grid)] -> {name: (model output, pipeline latent)}."""
    out = {}
    for name, layout, heads, grid in rows:
        cfg = tiny_config(heads)
        out[name] = (model_output(cfg, grid, layout), pipeline_latent(cfg, layout))
    return out


def collectives_checks():
    """Round trips and ring attention with uneven shards, in a world of any size."""
    import torch.distributed as dist

    from paradit.models.attention import math_attention_lse
    from paradit.parallel.attention import ring_attention
    from paradit.parallel.collectives import even_split, heads_to_seq, offsets, seq_to_heads

    world, me = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    total, heads, d = 4 * world + 3, 2 * world + 1, 4           # neither divides by the world
    full = torch.randn(3, 2, total, heads, d, generator=g)       # (qkv, B, L, H, D), same on all ranks
    seq = even_split(total, world)
    start = offsets(seq)[me]
    mine = full[:, :, start:start + seq[me]]
    hs = even_split(heads, world)
    h0 = offsets(hs)[me]
    gathered = seq_to_heads(mine.contiguous(), dist.group.WORLD, seq, hs)
    back = heads_to_seq(gathered[0].contiguous(), dist.group.WORLD, seq, hs)
    ring_out = ring_attention(*mine.unbind(0), dist.group.WORLD, seq, math_attention_lse)
    ref_out = math_attention_lse(*full.unbind(0))[0][:, start:start + seq[me]]
    return dict(gathered_ok=torch.equal(gathered, full[:, :, :, h0:h0 + hs[me]]),
                round_trip_ok=torch.equal(back, mine[0]),
                ring_err=((ring_out - ref_out).norm() / ref_out.norm()).item())


def chords_hits(cfg_kw: dict, layout: dict | None, cores: int, stop, needed_per_core=None, init=None):
    """Every CHORDS hit (core, round, preview, latent) of the tiny pipeline under a layout."""
    from paradit.settings import ChordsSettings
    cfg = tiny_config(**cfg_kw)
    pc = ParallelConfig(**(layout or {}))
    mesh = init_parallel(pc, num_heads=cfg.num_heads) if layout else None
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    needed = needed_per_core[pc.coords(rank)["chords"]] if needed_per_core else None
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32, needed=needed)
    pipe = Pipeline(cfg, experts, text, None, mesh=mesh)
    hits = []
    pipe(PROMPT, negative_prompt=NEGATIVE, output="latent", chords=ChordsSettings(cores, init, stop),
         on_hit=lambda h, lat: hits.append((h.core, h.round, h.preview, lat)), **(PIPE_KW | dict(steps=8)))
    loaded = [m is not None for m in experts]
    return hits, loaded


def chords_hits_per_stop(cfg_kw: dict, layout: dict | None, cores: int, stops: list):
    """chords_hits' hits for each stop rule, in one world."""
    return [chords_hits(cfg_kw, layout, cores, stop)[0] for stop in stops]


SPLIT_PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]


def split_run(heads: int, stages, steps: int = 12):
    """Three prompts through split expert stages: (latents by request, loaded experts, spans)."""
    import torch.distributed as dist

    from paradit.pipeline import VideoSettings
    cfg = tiny_config(heads)
    pc = ParallelConfig(experts="split", stages=stages)
    mesh = init_parallel(pc, num_heads=cfg.num_heads)
    stage = mesh.coords["stage"]
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32, needed={stage})
    pipe = Pipeline(cfg, experts, text if stage == 0 else None, None, mesh=mesh)
    kw = {k: v for k, v in (PIPE_KW | dict(steps=steps)).items() if k != "progress"}
    s = VideoSettings.resolve(cfg, **kw)
    done = {}
    spans = pipe.stream([(p, NEGATIVE, s) for p in SPLIT_PROMPTS],
                        on_done=lambda i, lat, latency: done.__setitem__(i, lat), progress=False)
    return dict(rank=dist.get_rank(), stage=stage, latents=done, loaded=[m is not None for m in experts],
                spans=spans.spans)


def bad_layout_on_every_rank(layout: dict):
    """init_parallel with a layout that does not fit: the error every rank sees, as text."""
    try:
        init_parallel(ParallelConfig(**layout), num_heads=2)
    except ValueError as err:
        return str(err)
    return None


def demo_judged(layout: dict, prompts: list[str], chords_cores: int | None = None):
    """Judge the demo model's videos under a layout: {prompt: {"final": judge's Verdict,
    "first_hit": ... (CHORDS only)}} on the output rank, None elsewhere."""
    from paradit.demo.judge import judge
    from paradit.settings import ChordsSettings
    pipe = Pipeline.from_pretrained("demo", parallel=ParallelConfig(**layout))
    out = {}
    for i, p in enumerate(prompts):
        hits = []
        chords = ChordsSettings(chords_cores, stop=None) if chords_cores else None
        latent = pipe(p, seed=i, output="latent", progress=False, chords=chords,
                      on_hit=lambda h, lat: hits.append((h, lat)))
        if not pipe.mesh.is_output_rank:
            continue
        out[p] = {"final": judge(pipe.vae.decode(latent), p)}
        if chords:
            first_real = next(lat for h, lat in hits if not h.preview)
            out[p]["first_hit"] = judge(pipe.vae.decode(first_real), p)
    return out if pipe.mesh.is_output_rank else None


def compiled_against_eager(layout: dict, heads: int = 4):
    """The pipeline's latent under a layout, eager and with compiled blocks (warmed up first), and
    how many graphs the compiled run built after its warm-up (it must build none)."""
    from torch._dynamo.utils import counters

    from paradit.compile import compile_blocks

    cfg = tiny_config(heads)
    eager = pipeline_latent(cfg, layout, steps=3)
    mesh = init_parallel(ParallelConfig(**layout), num_heads=cfg.num_heads)
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32)
    pipe = Pipeline(cfg, experts, text, None, mesh=mesh)
    torch._dynamo.reset()
    compile_blocks(pipe.experts)
    kw = PIPE_KW | dict(steps=3)
    pipe.warmup(**{k: kw[k] for k in ("width", "height", "frames", "steps")})
    graphs = counters["stats"]["unique_graphs"]
    out = pipe(PROMPT, negative_prompt=NEGATIVE, output="latent", **kw)
    return eager, out, counters["stats"]["unique_graphs"] - graphs


def mesh_roles(layouts: list[dict]) -> list[tuple]:
    """Per layout: this rank's (encodes, decodes, writes) as the built mesh holds them, and
    (first of its request group in the first stage, first of its sp group) from the groups built."""
    import torch.distributed as dist
    from paradit.parallel.requests import decode_group
    out = []
    for layout in layouts:
        mesh = init_parallel(ParallelConfig(**layout))
        first = {k: mesh.group(k) is None or dist.get_rank(mesh.group(k)) == 0 for k in ("request", "sp")}
        out.append(((mesh.roles.encodes, decode_group(mesh)[0], mesh.is_output_rank),
                    (first["request"] and mesh.coords["stage"] == 0, first["sp"])))
    return out


def preset_latents(name: str, layouts: dict[str, dict], prompt: str, kw: dict):
    """A preset's final latent under each layout ({label: layout}), as every rank returns it; kw:
    the call's settings."""
    out = {}
    for label, layout in layouts.items():
        pipe = Pipeline.from_pretrained(name, parallel=ParallelConfig(**layout))
        out[label] = pipe(prompt, output="latent", progress=False, **kw)
    return out

"""prompt -> text embeddings -> seeded noise -> denoising loop -> VAE decode -> uint8 frames.

The loop runs in token space: the patchified latent is sharded along the sequence exactly like
the transformer's tokens (Runtime.token_range), so a step gathers nothing; only the final latent
is gathered for the decode. On one process the shard is the whole sequence.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from paradit import conditioning
from paradit.config import WanConfig
from paradit.settings import SAMPLER_NAMES, VideoSettings
from paradit.launch import init_distributed
from paradit.launch.faults import maybe_fail
from paradit.models.lora import apply_loras, check_loras, for_expert
from paradit.models.quant import check_quant, fp8_attention, quantize_experts
from paradit.models.text_encoder import TextEncoder
from paradit.models.transformer import WanTransformer, patchify, token_grid, unpatchify
from paradit.models.vae import VideoVAE
from paradit.parallel.collectives import TRAFFIC, broadcast_from_first
from paradit.parallel.mesh import Mesh, init_parallel
from paradit.parallel.requests import decode_group, is_encoder_rank, request_group
from paradit.parallel.runtime import Runtime
from paradit.plan.layout import ParallelConfig
from paradit.schedulers import FlowEulerScheduler, FlowUniPCScheduler
from paradit.residency import check_offload, offloads_experts, offloads_text_encoder
from paradit.schedulers.schedule import expert_at, wan_timestep_list

log = logging.getLogger("paradit")
SAMPLERS = {"unipc": FlowUniPCScheduler, "euler": FlowEulerScheduler}
assert tuple(SAMPLERS) == SAMPLER_NAMES


@dataclass
class RunRecord:
    """What one call did: the expert and guidance of every step, phase timings, traffic."""
    trace: list[tuple[int, int, float]] = field(default_factory=list)  # (timestep, expert, guidance)
    timings: dict[str, float] = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)  # each sequential denoising step (device-synchronised)
    traffic: dict[str, list[int]] = field(default_factory=dict)
    residency: list[tuple[int, ...]] = field(default_factory=list)  # experts on the GPU at each evaluation
    chords: object = None  # a ChordsReport when CHORDS ran


class Pipeline:
    def __init__(self, cfg: WanConfig, experts: list[WanTransformer], text_encoder: TextEncoder,
                 vae: VideoVAE | None, parallel: ParallelConfig | None = None, mesh: Mesh | None = None,
                 backend: str = "auto"):
        if len(experts) != cfg.num_experts:
            raise ValueError(f"{cfg.name} needs {cfg.num_experts} expert(s), got {len(experts)}")
        if all(m is None for m in experts):
            raise ValueError("a pipeline needs at least one loaded expert")
        self.cfg, self.experts, self.text_encoder, self.vae = cfg, experts, text_encoder, vae
        self.mesh = mesh or init_parallel(parallel or ParallelConfig(), num_heads=cfg.num_heads)
        dtype = next(m for m in experts if m is not None).parameters().__next__().dtype
        self.runtime = Runtime(self.mesh, backend, dtype)
        for m in experts:
            if m is not None:  # None: an expert this rank never runs (CHORDS cores, split stages)
                self.runtime.bind(m)
        self.record = RunRecord()
        self.check_finite = False  # the optional per-step NaN/Inf guard
        self.on_step = None        # on_step(step index, seconds) after each sampler step (the server's progress)
        self.request_group = request_group(self.mesh)  # collective: every rank builds its pipeline together
        self.condition = None                          # the image condition of the running request
        self.startup: dict[str, float] = {}            # start-up phase timings (checkpoint.py, compile.py)
        self.load_stats: dict[str, dict] = {}          # bytes read per component on this rank
        self.offload, self.residency, self.text_residency = "none", None, None
        self.quant = {"mode": "none", "linears": None, "attention": None, "kept": None}  # from_pretrained's FP8
        log.info("layout: %s", self.runtime.describe())

    def apply_offload(self, mode: str, settings: VideoSettings | None = None) -> str:
        """Keep components in host memory per `mode` (paradit.residency); 'auto' asks the planner,
        for `settings` (default: the preset's video). Returns the mode applied. Once per pipeline."""
        from paradit.offload import ExpertResidency, TextEncoderResidency, resolve_offload
        assert self.offload == "none" and self.residency is None, "offload is applied once"
        mode = resolve_offload(mode, self.cfg, self.mesh, settings)
        if offloads_experts(mode):
            self.residency = ExpertResidency(self.experts, self.mesh.device)
            if not self.residency.active:
                log.info("offload: this rank holds one expert; it stays on the %s", self.mesh.device.type)
        if offloads_text_encoder(mode) and self.text_encoder is not None:
            self.text_residency = TextEncoderResidency(self.text_encoder, self.mesh.device)
        self.offload = mode
        log.info("offload: %s", mode)
        return mode

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, parallel: ParallelConfig | None = None, device=None,
                        dtype: torch.dtype | None = None, backend: str = "auto", seed: int = 0,
                        experts_needed: set[int] | None = None, components=None,
                        compile: bool = False, loras=(), offload: str = "none", quant: str = "none") -> "Pipeline":
        """'tiny' (random weights, built locally) or a checkpoint folder. The layout is validated
        against the world before any weights are built or read.

        experts_needed: the experts this rank runs (0 = high-noise or only, 1 = low-noise); others
        are never read. components: a diffusers-layout folder for the text encoder, tokenizer and
        VAE (needed by original-layout checkpoints; see paradit/checkpoint.py). compile: regional
        torch.compile of the transformer blocks (paradit/compile.py); then warm up with pipe.warmup.
        loras: LoraSpec(path, scale, target="all"|"high"|"low") entries (paradit/models/lora.py),
        checked before any weight is read and merged into the weights of the experts this rank loads.
        offload: "none" | "text-encoder" | "experts" | "all" | "auto" (paradit/residency.py): which
        components live in host memory and are copied to the GPU when used.
        quant: "none" | "fp8" | "fp8-attention" | "fp8-all" (paradit/models/quant.py), refused before
        any weight is read where FP8 cannot run."""
        check_offload(offload)
        check_quant(quant, init_distributed(device).device, offload, parallel)
        pipe = cls._build(name_or_path, parallel, device, dtype, backend, seed, experts_needed, components,
                          loras, offload)
        pipe.quant = quantize_experts(pipe.experts, quant)  # after the LoRA merge, before compile
        if pipe.quant["attention"]:
            pipe.runtime.use_attention(fp8_attention(), pipe.quant["attention"], pipe.experts)
        t0 = time.perf_counter()
        pipe.apply_offload(offload)
        pipe.startup["offload_s"] = time.perf_counter() - t0     # pinning the host copies
        if compile:
            from paradit.compile import compile_blocks
            compile_blocks(pipe.experts)
        return pipe

    def warmup(self, image: bool = False, **settings) -> float:
        """Build every compiled graph (one step per expert) at the shapes of a call with `settings`
        (width, height, frames, steps, shift, guidance, sampler); every rank calls it together."""
        from paradit.compile import warmup
        keys = ("width", "height", "frames", "steps", "shift", "guidance")
        s = VideoSettings.resolve(self.cfg, **{k: settings.get(k) for k in keys},
                                  sampler=settings.get("sampler", "unipc"))
        self.startup["compile_s"] = warmup(self, s, image)
        log.info("warm-up: one step per expert at %dx%dx%d in %.2f s", s.width, s.height, s.frames,
                 self.startup["compile_s"])
        return self.startup["compile_s"]

    @classmethod
    def _build(cls, name_or_path, parallel, device, dtype, backend, seed, experts_needed, components, loras,
               offload: str = "none"):
        info = init_distributed(device)
        parallel = parallel or ParallelConfig()
        if name_or_path in ("tiny", "demo"):  # built locally: random weights, or the shipped demo model
            cfg = WanConfig.preset(name_or_path)
            t0 = time.perf_counter()
            lora_files = check_loras(loras, cfg)
            checked = time.perf_counter() - t0
            mesh = init_parallel(parallel, info.device, num_heads=cfg.num_heads)
            if name_or_path == "tiny":
                parts = tiny_components(cfg, info.device, dtype or torch.float32, seed, experts_needed)
            else:
                from paradit.demo import demo_components
                parts = demo_components(cfg, info.device)
            t1 = time.perf_counter()
            for k, expert in enumerate(parts[0]):
                if expert is not None:
                    apply_loras(expert, for_expert(lora_files, k, cfg.num_experts))
            merged = time.perf_counter() - t1
            pipe = cls(cfg, *parts, mesh=mesh, backend=backend)
            if lora_files:
                pipe.startup.update(lora_check_s=checked, lora_merge_s=merged)
            return pipe
        from paradit.checkpoint import load_pipeline_components  # real checkpoints (folders)
        return load_pipeline_components(cls, name_or_path, parallel, info, dtype, backend, experts_needed,
                                        components, loras, offload)

    # ------------------------------------------------------------------ generation
    def expert_for(self, t: int) -> int:
        """0 = high-noise expert (t >= boundary * 1000), 1 = low-noise expert."""
        return expert_at(self.cfg.boundary, t)

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, frames: int | None = None, steps: int | None = None,
                 shift: float | None = None, guidance=None, seed: int = 0, output: str = "video",
                 sampler: str = "unipc", progress: bool = True, chords=None, on_hit=None, image=None):
        """Generate one video. chords: a ChordsSettings to solve with CHORDS (Euler steps) instead of
        the sequential sampler; on_hit(hit, latent) then sees every CHORDS hit as it arrives.
        image: the first frame (a path or a PIL image) for I2V-A14B and TI2V-5B; without a size the
        video takes the image's shape at the preset's area, as the original code does.
        negative_prompt: None takes the model's default (the original Wan's for Wan checkpoints)."""
        if output not in ("video", "latent"):
            raise ValueError(f"output={output!r}: choose 'video' or 'latent'")
        conditioning.check_task(self.cfg, image)
        if image is not None:
            image = conditioning.load_image(image) if not hasattr(image, "convert") else image.convert("RGB")
            if chords is not None and self.cfg.task == "ti2v":
                raise ValueError("CHORDS with a TI2V image is not supported (its first frame is reset after "
                                 "every sequential step); run TI2V image-to-video without --chords")
            if width is None and height is None:
                width, height = conditioning.size_for_image(self.cfg, image.width, image.height)
        s = VideoSettings.resolve(self.cfg, width, height, frames, steps, shift, guidance, seed, sampler)
        self.record = rec = RunRecord()
        TRAFFIC.clear()
        if self.residency is not None:  # checked, and the first expert's copy started, before the encode
            self.residency.begin(self.evaluation_experts(s, chords))
        try:
            t0 = time.perf_counter()
            cond, uncond = self.encode_prompts(prompt, negative_prompt, s.guidance)
            rec.timings["text_encoder_s"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            condition = self.prepare_condition(image, s) if image is not None else None
            rec.timings["image_encode_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            latent = self.denoise(s, cond, uncond, progress, chords, on_hit, condition)
            rec.timings["denoise_s"] = time.perf_counter() - t0
        finally:
            if self.residency is not None:
                self.residency.end()
        rec.traffic = {k: list(v) for k, v in TRAFFIC.items()}
        if output == "latent":
            return latent
        t0 = time.perf_counter()
        video = self.decode(latent)
        rec.timings["vae_decode_s"] = time.perf_counter() - t0
        return video

    def encode_prompts(self, prompt: str, negative_prompt: str | None, guidance: tuple[float, float]):
        """(cond, uncond or None), each (1, text_len, text_dim): encoded once, on the request's first
        rank, and broadcast over the request group."""
        need_uncond = any(g != 1.0 for g in guidance)
        negative = self.cfg.negative_prompt if negative_prompt is None else negative_prompt
        prompts = [prompt, negative] if need_uncond else [prompt]
        emb = None
        if is_encoder_rank(self.mesh):
            if self.text_encoder is None:
                raise ValueError("this rank encodes the prompts but has no text encoder")
            with self.text_residency.on_device() if self.text_residency else contextlib.nullcontext():
                emb = self.text_encoder.encode(prompts)                   # (1 or 2, text_len, text_dim)
        emb = broadcast_from_first(emb, (len(prompts), self.cfg.text_len, self.cfg.text_dim), torch.float32,
                                   self.mesh.device, self.request_group).to(self.mesh.device)
        return emb[:1], (emb[1:] if need_uncond else None)

    def prepare_condition(self, image, s: VideoSettings) -> conditioning.Condition:
        """The image's latent condition, VAE-encoded once on the request's first rank and broadcast;
        returns this rank's token shard of it."""
        shape = conditioning.condition_shape(self.cfg, s.width, s.height, s.frames)
        y = None
        if is_encoder_rank(self.mesh):
            if self.vae is None:
                raise ValueError("this rank encodes the image but has no VAE")
            y = conditioning.encode_condition(self.cfg, self.vae, image, s.width, s.height, s.frames)
        y = broadcast_from_first(y, shape, torch.float32, self.mesh.device, self.request_group).cpu()
        latent_shape = self.cfg.latent_shape(s.width, s.height, s.frames)
        start, end = self.runtime.token_range(self.cfg.num_tokens(s.width, s.height, s.frames))
        return conditioning.shard_condition(self.cfg, y, latent_shape, start, end, self.mesh.device)

    def decode(self, latent: torch.Tensor) -> torch.Tensor | None:
        """uint8 frames (F, H, W, 3) on the output rank, None elsewhere. Every rank calls it: the
        VAE's tiles are spread over the output rank's sequence-parallel group."""
        member, group = decode_group(self.mesh)
        if not member or self.vae is None:
            return None
        if isinstance(self.vae, VideoVAE):
            from paradit.parallel.vae import spread_decode
            video = spread_decode(self.vae, latent, group)
        else:  # another codec (the demo's): decoded on the output rank alone
            video = self.vae.decode(latent) if self.mesh.is_output_rank else None
        return video if self.mesh.is_output_rank else None

    def initial_noise(self, s: VideoSettings) -> torch.Tensor:
        """[C, F, H, W] fp32 from a seeded CPU generator: the same on every rank and layout."""
        shape = self.cfg.latent_shape(s.width, s.height, s.frames)
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s.seed), dtype=torch.float32)

    def token_space(self, s: VideoSettings) -> "TokenSpace":
        """The token space of a video with settings s (no noise is drawn)."""
        return TokenSpace(self, token_grid(self.cfg.latent_shape(s.width, s.height, s.frames), self.cfg.patch))

    def initial_tokens(self, s: VideoSettings) -> tuple[torch.Tensor, "TokenSpace"]:
        """This rank's shard of the patchified noise, and the token space it lives in."""
        space = self.token_space(s)
        tokens = patchify(self.initial_noise(s)[None], self.cfg.patch)[0]   # (L, P*C)
        start, end = self.runtime.token_range(space.num_tokens)
        x = conditioning.after_step(tokens[start:end].to(self.mesh.device), self.condition)  # TI2V: frame 0
        return x, space

    def scheduler(self, s: VideoSettings):
        sched = SAMPLERS[s.sampler](shift=s.shift)
        sched.set_timesteps(s.steps)
        return sched

    def run_steps(self, s: VideoSettings, x: torch.Tensor, sched, space: "TokenSpace", cond, uncond,
                  steps: range, progress: bool = True) -> torch.Tensor:
        """Sampler steps `steps` (indices into the schedule) on this rank's token shard x."""
        timesteps = sched.timesteps.tolist()
        bar = tqdm(steps, desc="denoise", unit="step", disable=not (progress and self.mesh.is_output_rank))
        for i in bar:
            maybe_fail(f"step{i}")
            t0 = time.perf_counter()
            x = sched.step(self.velocity(s, x, timesteps[i], cond, uncond, space.grid, f"step {i}"),
                           timesteps[i], x)
            x = conditioning.after_step(x, self.condition)               # TI2V: frame 0 stays the image
            if x.is_cuda:  # the step's kernels, not just their launch, belong to its time
                torch.cuda.synchronize(x.device)
            self.record.step_s.append(time.perf_counter() - t0)
            self.startup.setdefault("first_step_s", self.record.step_s[-1])
            if self.on_step is not None:
                self.on_step(i, self.record.step_s[-1])
        return x

    def evaluation_experts(self, s: VideoSettings, chords=None) -> list[int]:
        """The expert of each evaluation this rank makes for one request, in order: from the
        timesteps, or with CHORDS from the static schedule of this rank's core (every core in
        turn when the cores share the ranks)."""
        if chords is None:
            return [self.expert_for(t) for t in self.scheduler(s).timesteps.tolist()]
        ts = wan_timestep_list(s.steps, s.shift)
        from paradit.schedulers.chords import Chords
        from paradit.schedulers.sigmas import wan_sigmas
        ch = Chords(wan_sigmas(s.steps, s.shift), chords.resolve_init(s.steps))
        me = self.mesh.rank("chords") if self.mesh.size("chords") > 1 else None
        return [self.expert_for(ts[i]) for pairs in ch.schedule(ch.rounds_for(chords.stop))
                for core, i in pairs if me is None or core == me]

    def velocity(self, s: VideoSettings, x: torch.Tensor, t: int, cond, uncond, grid, where: str):
        """The guided velocity at timestep t with the expert and guidance t belongs to."""
        k = self.expert_for(t)
        g = s.guidance[k]
        self.record.trace.append((int(t), k, g))
        tt = conditioning.timesteps(torch.tensor(float(t), device=x.device), self.condition)
        if self.residency is not None:   # the plan's prefetches and releases around this evaluation
            self.residency.before(k)
            self.record.residency.append(tuple(sorted(self.residency.resident)))
        try:
            v = self.runtime.velocity(self.experts[k], conditioning.model_input(x, self.condition), tt,
                                      cond, uncond if g != 1.0 else None, g, grid)
        finally:
            if self.residency is not None:
                self.residency.after(k)
        if self.check_finite and not torch.isfinite(v).all():
            expert = ["high-noise", "low-noise"][k] if self.cfg.num_experts == 2 else "the"
            raise FloatingPointError(f"non-finite velocity at {where} (t={t}) from {expert} expert")
        return v

    def denoise(self, s: VideoSettings, cond, uncond, progress: bool = True, chords=None,
                on_hit=None, condition: conditioning.Condition | None = None) -> torch.Tensor:
        """The sampler loop on this rank's token shard; returns the full latent [C, F, H, W] fp32.
        condition: this rank's shard of an image condition (prepare_condition)."""
        self.condition = condition
        try:
            return self._denoise(s, cond, uncond, progress, chords, on_hit)
        finally:
            self.condition = None

    def _denoise(self, s: VideoSettings, cond, uncond, progress: bool, chords, on_hit) -> torch.Tensor:
        x, space = self.initial_tokens(s)
        if chords is not None:
            from paradit.parallel.chords import chords_denoise
            hook = None if on_hit is None else (lambda hit, shard: on_hit(hit, space.to_latent(shard)))
            x, self.record.chords = chords_denoise(self, chords, s, x, cond, uncond, space.grid, hook)
            return space.to_latent(x)
        sched = self.scheduler(s)
        x = self.run_steps(s, x, sched, space, cond, uncond, range(s.steps), progress)
        return space.to_latent(x)


@dataclass(frozen=True)
class TokenSpace:
    """The patch grid of one video and the way back from token shards to the latent."""
    pipe: Pipeline
    grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def to_latent(self, shard: torch.Tensor) -> torch.Tensor:
        """Gather the sp shards of a token-space tensor -> latent [C, F, H, W] fp32 on the CPU."""
        full = self.pipe.runtime.gather_tokens(shard, self.num_tokens)   # (L, P*C)
        return unpatchify(full[None].cpu().float(), self.grid, self.pipe.cfg.patch)[0]


def tiny_components(cfg: WanConfig, device, dtype, seed: int = 0, needed: set[int] | None = None):
    """Seeded random experts, a tiny umT5 and a tiny Wan VAE: identical on every rank.
    Experts not in `needed` are not built (None)."""
    experts = []
    for k in range(cfg.num_experts):
        if needed is not None and k not in needed:
            experts.append(None)
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            experts.append(WanTransformer(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False))
    text = TextEncoder.tiny(cfg.text_dim, cfg.text_len, seed=seed, device=device)
    vae = VideoVAE.tiny(cfg.z_dim, seed=seed, device=device)
    return experts, text, vae

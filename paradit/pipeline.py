"""The facade: build once, then for each request encode -> engine -> decode.

    pipe = Pipeline.from_pretrained("tiny" | folder, parallel=ParallelConfig(...))
    video = pipe(prompt, ...)                      # one request, every placement alike
    pipe.stream([(prompt, negative, settings), ...], on_done)   # many; pipelined through split stages

The Pipeline owns the components and the once-per-request work around the denoising: the prompt
encode (one rank encodes, the request group receives), the image condition, the VAE decode spread
over the output rank's group. The denoising itself is paradit.engine's: a driver (sequential,
CHORDS, split stages) runs an explicit Request on the Denoiser, which never sees the Pipeline.
The latent lives in token space, sharded along the sequence exactly like the transformer's tokens,
so a step gathers nothing; only the final latent is gathered for the decode.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import torch

from paradit import conditioning
from paradit.config import WanConfig
from paradit.engine import Denoiser, Request, RunRecord
from paradit.errors import ParameterError
from paradit.events import phase
from paradit.launch import init_distributed
from paradit.components import tiny_components
from paradit.models.quant import fp8_attention, quantize_experts
from paradit.models.text_encoder import TextEncoder
from paradit.models.transformer import WanTransformer
from paradit.models.vae import VideoVAE
from paradit.parallel.collectives import broadcast_from_first
from paradit.parallel.mesh import Mesh, init_parallel
from paradit.parallel.requests import check_same_request, decode_group, request_fields
from paradit.parallel.runtime import Runtime
from paradit.parallel.stages import HandoffSignal
from paradit.plan.layout import ParallelConfig
from paradit.prompts import check_prompt
from paradit.residency import offloads_experts, offloads_text_encoder, streams_layers
from paradit.runspec import BuildSpec, build_components, build_spec
from paradit.settings import ChordsSettings, VideoSettings

log = logging.getLogger("paradit")
__all__ = ["Pipeline", "RunRecord", "VideoSettings", "tiny_components"]


def stream_item(i: int, item) -> tuple:
    """prompts[i] of Pipeline.stream, (prompt, negative_prompt, settings[, image]) -> its four parts."""
    if not isinstance(item, (tuple, list)) or len(item) not in (3, 4) or not isinstance(item[2], VideoSettings):
        raise ParameterError(f"prompts[{i}]", item, "give (prompt, negative_prompt, settings[, image]) with settings "
                             "a paradit.settings.VideoSettings", "e.g. (\"a red circle\", None, "
                             "VideoSettings.resolve(pipe.cfg, steps=20))")
    prompt, negative, s, *image = item
    return prompt, negative, s, image[0] if image else None


class Pipeline:
    def __init__(self, cfg: WanConfig, experts: list[WanTransformer], text_encoder: TextEncoder,
                 vae: VideoVAE | None, parallel: ParallelConfig | None = None, mesh: Mesh | None = None,
                 backend: str = "auto"):
        """The components of this rank (an expert it never runs is None; so are a text encoder and
        a VAE it needs for nothing) under `mesh` (built from `parallel` when not given)."""
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
                if self.mesh.shard_mesh is not None:   # the layout's weight sharding (FSDP2)
                    from paradit.parallel.sharding import apply_weight_sharding, is_sharded
                    if not is_sharded(m):                # not read sharded (paradit.parallel.shard_read)
                        apply_weight_sharding(m, self.mesh.shard_mesh)
        self.denoiser = Denoiser(cfg, self.runtime, experts)
        self.handoff = HandoffSignal() if self.mesh.split is not None else None  # split experts' hand-offs
        self.record = RunRecord()                      # the current (or last) request's
        self.startup: dict[str, float] = {}            # start-up phase timings (checkpoint.py, warmup)
        self.load_stats: dict[str, dict] = {}          # bytes read per component on this rank
        self.offload, self.text_residency = "none", None
        self.quant = {"mode": "none", "linears": None, "attention": None, "kept": None}  # from_pretrained's FP8
        log.info("layout: %s", self.runtime.describe())

    # the denoiser's switches, settable on the pipeline
    check_finite = property(lambda self: self.denoiser.check_finite,
                            lambda self, v: setattr(self.denoiser, "check_finite", v),
                            doc="stop with FloatingPointError at a non-finite velocity")
    on_step = property(lambda self: self.denoiser.on_step, lambda self, v: setattr(self.denoiser, "on_step", v),
                       doc="on_step(index, seconds) after each sequential step or CHORDS round (the server's "
                           "progress); raising engine.Stopped stops the request there, on every rank")
    residency = property(lambda self: self.denoiser.residency, doc="the ExpertResidency, with offloaded experts")

    @property
    def request_group(self):
        """The ranks that serve this rank's requests together (paradit.parallel.requests)."""
        return self.mesh.group("request")

    def apply_offload(self, mode: str) -> str:
        """Keep components in host memory per `mode` (paradit.residency; "auto" is resolved before the
        build, by paradit.runspec.build_spec). Returns the mode applied. Once per pipeline."""
        from paradit.offload import ExpertResidency, TextEncoderResidency
        from paradit.residency import check_offload
        assert self.offload == "none" and self.residency is None, "offload is applied once"
        if check_offload(mode) == "auto":
            raise ParameterError("offload", mode, "apply_offload takes a concrete mode", "build with "
                                 "Pipeline.from_pretrained(..., offload='auto'), which asks the planner")
        if offloads_experts(mode):
            self.denoiser.residency = ExpertResidency(self.experts, self.mesh.device)
            if not self.residency.active:
                log.info("offload: this rank holds one expert; it stays on the %s", self.mesh.device.type)
        if streams_layers(mode):   # every expert in host memory, streamed block by block
            from paradit.streaming import LayerResidency
            self.denoiser.residency = LayerResidency(self.experts, self.mesh.device)
        if offloads_text_encoder(mode) and self.text_encoder is not None:
            self.text_residency = TextEncoderResidency(self.text_encoder, self.mesh.device)
        self.offload = mode
        log.info("offload: %s", mode)
        return mode

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, parallel: ParallelConfig | None = None, **options) -> "Pipeline":
        """'tiny' (random weights, built locally), 'demo' or 'demo64' (the shipped demo models) or a
        checkpoint folder: Pipeline.from_spec(paradit.runspec.build_spec(...)) of these keywords. The layout and
        every option are validated against the world before any weights are built or read.

        parallel: the layout; ParallelConfig(experts="split") without stages takes the stage sizes
        from the step split of the planned video's steps and shift (settings=, below). options: paradit.runspec.BuildSpec's fields,
        each described at its declaration there (the build options are generate's flags too:
        offload="auto" is --offload auto), e.g. loras=[LoraSpec(path, scale, target="all"|"high"|"low")]
        merged into the experts this rank loads, offload, quant, compile (then warm up with
        pipe.warmup), attention, device, experts_needed (the experts this rank runs: 0 = high-noise
        or only, 1 = low-noise; others are never read), components (a diffusers-layout folder for
        an original-layout checkpoint's text encoder, tokenizer and VAE), read_once (checkpoints: the
        ranks of a node that load the same expert read its files once between them). An unknown
        keyword is a ParameterError naming it. settings (a paradit.settings.VideoSettings) and gpu (a
        planner GPU kind): what offload="auto" and shard_weights="auto" are planned for, and an offload
        mode's pinned copies held to the host at (default: the model's video on this device's kind;
        generate and the service pass their run's video and --gpu); planned: paradit.plan.plan(...).choice
        of this layout at that video and kind, whose offload mode is taken rather than planned again."""
        return cls.from_spec(build_spec(name_or_path, parallel, **options))

    @classmethod
    def from_spec(cls, spec: BuildSpec) -> "Pipeline":
        """Build this rank's pipeline of a validated BuildSpec: the mesh (every group), this rank's
        components (paradit.components: presets and checkpoints alike), then FP8, offload, compile."""
        info = init_distributed(spec.device)
        mesh = init_parallel(spec.layout, info.device, num_heads=spec.cfg.num_heads)
        parts = build_components(spec, mesh)
        pipe = cls(parts.cfg, parts.experts, parts.text_encoder, parts.vae, mesh=mesh, backend=spec.attention)
        pipe.startup.update(parts.startup)
        pipe.load_stats = parts.load_stats
        pipe.quant = quantize_experts(pipe.experts, spec.quant)  # after the LoRA merge, before compile
        if pipe.quant["attention"]:
            pipe.runtime.use_attention(fp8_attention(), pipe.quant["attention"], pipe.experts)
        with phase("offload", pipe.startup):                    # pinning the host copies
            pipe.apply_offload(spec.offload)
        if spec.compile:
            from paradit.compile import compile_blocks
            compile_blocks(pipe.experts)
        return pipe

    def warmup(self, image: bool = False, **settings) -> float:
        """Build every compiled graph (one step per expert) at the shapes of a call with `settings`
        (width, height, frames, steps, shift, guidance, sampler); every rank calls it together."""
        from paradit.engine.warmup import warmup
        keys = ("width", "height", "frames", "steps", "shift", "guidance")
        s = VideoSettings.resolve(self.cfg, **{k: settings.get(k) for k in keys},
                                  sampler=settings.get("sampler", "unipc"))
        with phase("compile", self.startup):
            warmup(self.denoiser, s, image)
        log.info("warm-up: one step per expert at %dx%dx%d in %.2f s", s.width, s.height, s.frames,
                 self.startup["compile_s"])
        return self.startup["compile_s"]

    # ------------------------------------------------------------------ generation
    def expert_for(self, t: int) -> int:
        """0 = high-noise expert (t >= boundary * 1000), 1 = low-noise expert."""
        return self.denoiser.expert_for(t)

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, frames: int | None = None, steps: int | None = None,
                 shift: float | None = None, guidance=None, seed: int = 0, output: str = "video",
                 sampler: str = "unipc", progress: bool = True, chords: ChordsSettings | None = None,
                 on_hit=None, image=None, cache=None):
        """Generate one video: uint8 frames (F, H, W, 3) on the output rank (None on the others), or
        with output="latent" the final latent [C, F, H, W] fp32 on every rank that finishes the
        request (all of its replica; the low-noise stage with split experts, None on the high one).

        chords: a ChordsSettings to solve with CHORDS (Euler steps) instead of the sequential
        sampler; on_hit(hit, latent) then sees every CHORDS hit as it arrives, on every rank.
        image: the first frame (a path or a PIL image) for I2V-A14B and TI2V-5B; without a size the
        video takes the image's shape at the preset's area, as the original code does.
        negative_prompt: None takes the model's default (the original Wan's for Wan checkpoints).
        cache: the step cache, "METHOD[:THRESHOLD[:WARMUP]]" (e.g. "easy:0.05") or a CacheSettings;
        None computes every step. What it skipped is in self.record.cache."""
        if output not in ("video", "latent"):
            raise ParameterError("output", output, "choose 'video' or 'latent'")
        conditioning.check_task(self.cfg, image)
        if image is not None:
            image = conditioning.load_image(image)
            if width is None and height is None:
                width, height = conditioning.video_size_for_image(self.cfg, image.width, image.height)
        s = VideoSettings.resolve(self.cfg, width, height, frames, steps, shift, guidance, seed, sampler, cache)
        latent = self.run(prompt, s, negative_prompt, image=image, chords=chords, on_hit=on_hit, progress=progress)
        if output == "latent":
            return latent
        with self.record.phase("vae_decode"):
            return self.decode(latent)

    def run(self, prompt: str, s: VideoSettings, negative_prompt: str | None = None, image=None,
            chords: ChordsSettings | None = None, on_hit=None, progress: bool = True) -> torch.Tensor | None:
        """One request with validated settings `s` (and a loaded PIL image): its final latent where
        the request finishes (see __call__), None elsewhere. The record is left in self.record.
        Every rank of the request group passes the same request: checked first, refused otherwise."""
        check_same_request(request_fields(prompt, negative_prompt, s, image, chords), self.request_group,
                           self.mesh.device)
        self.check_request(prompt, negative_prompt, s, image, chords)
        if self.mesh.split is not None:
            done = []
            self.stream([(prompt, negative_prompt, s)], lambda i, latent, _: done.append(latent), progress)
            return done[0] if done else None
        residency = self.residency
        if residency is not None:  # checked, and the first expert's copy started, before the encode
            residency.begin(self.denoiser.evaluation_experts(s, chords))
        try:
            req = self.request(prompt, negative_prompt, s, image)
            with req.record.phase("denoise"):
                latent = self.drive(req, chords, on_hit, progress)
        finally:
            if residency is not None:
                residency.end()
        self.finish_record(req)
        return latent

    def stream(self, prompts: Iterable[tuple[str, str | None, VideoSettings]],
               on_done: Callable[[int, torch.Tensor, float], None] | None = None, progress: bool = True,
               chords: ChordsSettings | None = None):
        """Generate every (prompt, negative_prompt, settings) of `prompts`, in order, the same on every
        rank; on_done(i, latent, seconds) where request i finishes (self.record is then its record).
        chords: every request solved with CHORDS (colocated experts).
        With split experts the requests pipeline through the two stages (paradit.engine.split):
        `prompts` may be a generator fed as requests arrive. Returns this rank's StageTimes."""
        from paradit.engine.split import StageTimes, run_split
        if self.mesh.split is None:
            times = StageTimes()
            for i, item in enumerate(prompts):
                prompt, negative, s, image = stream_item(i, item)
                t0 = time.time()
                latent = self.run(prompt, s, negative, image=image, chords=chords, progress=progress)
                times.spans.append((i, 0, t0, time.time()))
                if on_done is not None:
                    on_done(i, latent, time.time() - t0)
            return times

        def requests():
            for i, item in enumerate(prompts):
                prompt, negative, s, image = stream_item(i, item)
                self.check_request(prompt, negative, s, image, chords)
                yield self.request(prompt, negative, s) if self.mesh.coords["stage"] == 0 else self.new_request(s)

        def finished(i, req, latent, seconds):
            self.finish_record(req)
            if on_done is not None:
                on_done(i, latent, seconds)
        return run_split(self.denoiser, requests(), self.handoff, finished, progress)

    def check_request(self, prompt, negative_prompt, s: VideoSettings, image, chords) -> None:
        """What this pipeline cannot run, refused before any work (the same on every rank)."""
        check_prompt("prompt", prompt)
        if negative_prompt is not None:
            check_prompt("negative_prompt", negative_prompt, empty_ok=True)
        if self.mesh.split is not None and (image is not None or chords is not None):
            raise ParameterError("image" if image is not None else "chords", "given", "split experts run "
                                 "text-to-video requests with the sequential sampler only, for now",
                                 "use colocated experts (experts='colocated')")
        if image is not None and chords is not None and self.cfg.task == "ti2v":
            raise ParameterError("chords", chords.cores, "CHORDS with a TI2V image is not supported (its first "
                                 "frame is reset after every sequential step)", "run TI2V image-to-video "
                                 "without CHORDS")
        if chords is not None:
            chords.validate(s.steps, self.mesh.size("chords"))

    def new_request(self, s: VideoSettings) -> Request:
        """An empty request for settings s; it becomes the pipeline's current record."""
        req = Request(s)
        self.record = req.record
        self.runtime.traffic.clear()
        return req

    def request(self, prompt: str, negative_prompt: str | None, s: VideoSettings, image=None) -> Request:
        """The request of one prompt: its embeddings and image condition, encoded once on the
        request's first rank and broadcast over its group."""
        req = self.new_request(s)
        with req.record.phase("text_encoder"):
            req.cond, req.uncond = self.encode_prompts(prompt, negative_prompt, s.guidance)
        with req.record.phase("image_encode"):
            req.condition = self.prepare_condition(image, s) if image is not None else None
        return req

    def finish_record(self, req: Request) -> None:
        req.record.traffic = self.runtime.traffic.snapshot()
        if req.record.step_s:
            self.startup.setdefault("first_step_s", req.record.step_s[0])

    def encode_prompts(self, prompt: str, negative_prompt: str | None, guidance: tuple[float, float]):
        """(cond, uncond or None), each (1, text_len, text_dim): encoded once, on the request's first
        rank, and broadcast over the request group. A prompt encoded lately (the default negative
        prompt: at start-up, checkpoint.py) comes from the text encoder's cache (TextEncoder.embed)."""
        need_uncond = any(g != 1.0 for g in guidance)
        negative = self.cfg.negative_prompt if negative_prompt is None else negative_prompt
        prompts = [prompt, negative] if need_uncond else [prompt]
        emb = None
        if self.mesh.roles.encodes:
            if self.text_encoder is None:
                raise ValueError("this rank encodes the prompts but has no text encoder")
            on_device = self.text_residency.on_device if self.text_residency else contextlib.nullcontext
            emb = self.text_encoder.embed(prompts, on_device)              # (1 or 2, text_len, text_dim)
        emb = broadcast_from_first(emb, (len(prompts), self.cfg.text_len, self.cfg.text_dim), torch.float32,
                                   self.mesh.device, self.request_group, self.runtime.traffic).to(self.mesh.device)
        return emb[:1], (emb[1:] if need_uncond else None)

    def prepare_condition(self, image, s: VideoSettings) -> conditioning.Condition:
        """The image's latent condition, VAE-encoded once on the request's first rank and broadcast;
        returns this rank's token shard of it."""
        shape = conditioning.condition_shape(self.cfg, s.width, s.height, s.frames)
        y = None
        if self.mesh.roles.encodes:
            if self.vae is None:
                raise ValueError("this rank encodes the image but has no VAE")
            y = conditioning.encode_condition(self.cfg, self.vae, image, s.width, s.height, s.frames)
        y = broadcast_from_first(y, shape, torch.float32, self.mesh.device, self.request_group,
                                 self.runtime.traffic).cpu()
        latent_shape = self.cfg.latent_shape(s.width, s.height, s.frames)
        start, end = self.runtime.token_range(self.cfg.num_tokens(s.width, s.height, s.frames))
        return conditioning.shard_condition(self.cfg, y, latent_shape, start, end, self.mesh.device)

    def decode(self, latent: torch.Tensor | None, on_frames=None) -> torch.Tensor | None:
        """uint8 frames (F, H, W, 3) on the output rank, None elsewhere. Every rank calls it: the
        VAE's tiles are spread over the output rank's sequence-parallel group. on_frames (the output
        rank): each run of frames handed to it as it is decoded (paradit.outputs.VideoStream: the
        mp4 encoded while the decode runs), in time order, and None returned."""
        member, group = decode_group(self.mesh)
        if not member or self.vae is None:
            return None
        if isinstance(self.vae, VideoVAE):
            from paradit.parallel.vae import spread_decode
            video = spread_decode(self.vae, latent, group, on_frames)
        else:  # another codec (the demo's): decoded on the output rank alone
            video = self.vae.decode(latent) if self.mesh.is_output_rank else None
            if video is not None and on_frames is not None:
                video = on_frames(video)
        return video if self.mesh.is_output_rank else None

    def denoise(self, s: VideoSettings, cond, uncond, progress: bool = True, chords=None) -> torch.Tensor:
        """The denoising of one request from given prompt embeddings (benchmarks): its latent."""
        req = self.new_request(s)
        req.cond, req.uncond = cond, uncond
        return self.drive(req, chords, None, progress)

    def drive(self, req: Request, chords: ChordsSettings | None, on_hit, progress: bool) -> torch.Tensor:
        """The engine's driver for a colocated request: CHORDS, or the sequential sampler."""
        if chords is not None:
            from paradit.engine.chords import chords_denoise
            return chords_denoise(self.denoiser, req, chords, on_hit)
        from paradit.engine.sequential import denoise
        return denoise(self.denoiser, req, progress)

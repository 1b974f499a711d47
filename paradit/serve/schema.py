"""The request body of POST /v1/videos, its checks against the model, and the video object.

Three layers: `parse_body` (paradit.serve.body) reads the body as UTF-8 JSON and refuses numbers too long for any field
(400); pydantic rejects unknown fields and wrong types (422); `resolve` then bounds the text
fields' lengths (before any tokenizer sees them) and checks the values against the model being
served (size a multiple of its stride, frames of the form stride*k+1, steps in range, prompts that
fit the text encoder), answering 400 naming the field and what would be valid. Every layer names
the field in `error.param`, in the OpenAI error shape.
"""
from __future__ import annotations

import math
import re
import secrets
import threading
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.prompts import clean_prompt
from paradit.settings import MAX_FRAMES, MAX_SEED, SAMPLER_NAMES, VideoSettings, resolve_cache

Guidance = Annotated[list[float], Field(min_length=2, max_length=2)]
MAX_LORAS = 8            # LoRAs a request may list
MAX_LORA_SCALE = 10.0    # |scale| beyond this is no useful strength (the merge refuses larger effects too)


class LoraItem(BaseModel):
    """One LoRA of a request: a name from the server's --lora-dir, its strength, its expert(s)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=200)
    scale: float = 1.0
    expert: Literal["high", "low", "all"] = "all"
# the library's parameter -> the request field that sets it (ParameterErrors come out naming the field)
PARAM_FIELDS = {"width": "size", "height": "size", "frames": "num_frames", "steps": "num_inference_steps",
                "guidance": "guidance_scale", "seed": "seed", "sampler": "sampler", "cache": "cache"}


class VideoRequest(BaseModel):
    """POST /v1/videos. strict: "4" is not a number and 4.0 is not a frame count."""
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    model: str | None = None                      # optional; must name the served model
    size: str | None = None                       # "WxH"
    num_frames: int | None = None
    seconds: float | str | None = None            # at the model's fps; OpenAI clients send "4"
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = None
    guidance_scale: float | Guidance | None = None
    sampler: Literal[SAMPLER_NAMES] | None = None
    input_reference: str | None = None            # the first frame, base64 (paradit.serve.images)
    loras: list[LoraItem] | None = Field(None, max_length=MAX_LORAS)   # from the server's --lora-dir
    cache: str | None = None                      # the step cache, "easy:0.05"; "off"; default: the server's --cache


FIELDS = tuple(VideoRequest.model_fields)
# characters a text field may have, checked before tokenizing: a prompt the text encoder takes whole
# (512 tokens for Wan, at about 4-5 characters a token) is well within 4096
TEXT_CHARS = {"prompt": 4096, "negative_prompt": 4096, "model": 256, "size": 32, "seconds": 32}
MAX_DIGITS = 20  # an integer longer than this is beyond every field's range (seeds end at 2**64 - 1)
HINTS = {  # what a valid value looks like, for fields whose type errors are unions or formats
    "guidance_scale": "give one number >= 0, or a list of two [high-noise, low-noise], e.g. [4.0, 3.0]",
    "seconds": "give a number of seconds, e.g. 1 or \"1\"",
    "sampler": f"choose one of {', '.join(SAMPLER_NAMES)}",
}


class ApiError(Exception):
    """An error answer: HTTP status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Limits:
    """The largest request the service takes (--max-steps, --max-video-tokens)."""
    max_steps: int
    max_video_tokens: int

    @staticmethod
    def default_video_tokens(cfg: WanConfig, s: VideoSettings) -> int:
        """4x the model's default video or the default request's (s: the server's --size and --frames),
        whichever is larger, in transformer tokens."""
        return 4 * max(cfg.num_tokens(*cfg.size, cfg.frames), cfg.num_tokens(s.width, s.height, s.frames))


class Checker:
    """Checks requests against the served model. `tokenizer` counts prompt tokens: a copy of the
    engine's, used under a lock (a fast tokenizer must not be used by two threads at once)."""

    def __init__(self, cfg: WanConfig, model: str, tokenizer, limits: Limits, defaults: VideoSettings,
                 cache: str | None = None, chords=None, layout=None):
        self.cfg, self.model, self.tokenizer, self.limits = cfg, model, tokenizer, limits
        # the server's default request (its --steps, --size, ...): the settings its ranks were built for
        self.defaults = defaults
        self.cache = cache   # the step cache of requests that give none (the server's --cache)
        self.chords, self.layout = chords, layout   # --chords: every job is solved with CHORDS on this layout
        self.state_dir = None                       # where accepted first frames are stored (serve.cli sets it)
        self.lora_names: frozenset | None = None    # the LoRAs of --lora-dir (None: no --lora-dir)
        self.negative: str | None = None            # and its --negative-prompt
        self.lock = threading.Lock()

    def resolve(self, body: VideoRequest, image=None) -> dict:
        """The job's stored request: prompts and the resolved settings; ApiError(400) if invalid.
        image: the decoded input_reference (PIL), whose shape sizes a video that gives no size."""
        cfg = self.cfg
        check_lengths(body)
        self.check_image(image)
        if body.model is not None and body.model != self.model:
            raise ApiError(400, f"model {body.model!r}: this service runs {self.model!r}; leave model out or "
                                f"give {self.model!r}", "model")
        self.check_prompt(body.prompt, "prompt")
        if body.negative_prompt is not None:
            self.check_prompt(body.negative_prompt, "negative_prompt", empty_ok=True)
        width, height = self.size(body.size) if image is None or body.size is not None else \
            self.image_size(image)
        d = self.defaults
        frames = self.frames(body.num_frames, body.seconds)
        frames = d.frames if frames is None else frames
        steps = d.steps if body.num_inference_steps is None else body.num_inference_steps
        if not 1 <= steps <= self.limits.max_steps:
            raise ApiError(400, f"num_inference_steps {steps} is out of range: give 1 to {self.limits.max_steps} "
                                f"(this service's --max-steps)", "num_inference_steps")
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        try:
            s = VideoSettings.resolve(cfg, width, height, frames, steps, d.shift, d.guidance if body.guidance_scale
                                      is None else body.guidance_scale, seed, body.sampler or d.sampler,
                                      self.cache if body.cache is None else body.cache)
        except ParameterError as err:
            raise ApiError(400, in_field_terms(err, width, height), PARAM_FIELDS.get(err.param)) from None
        tokens, limit = cfg.num_tokens(s.width, s.height, s.frames), self.limits.max_video_tokens
        if tokens > limit:
            raise ApiError(400, f"a {s.width}x{s.height} video of {s.frames} frames is {tokens} tokens; this service "
                                f"takes at most {limit} (--max-video-tokens): make it smaller or shorter",
                           "size" if body.size is not None else "seconds" if body.seconds is not None else "num_frames")
        if self.chords is not None:
            self.check_chords(s, body.sampler)
        loras = self.check_loras(body.loras)
        negative = self.negative if body.negative_prompt is None else body.negative_prompt
        return {"prompt": body.prompt, "negative_prompt": negative, **asdict(s),
                **({"loras": loras} if loras else {})}

    def check_loras(self, items) -> list[list]:
        """A request's LoRAs: names of --lora-dir, finite scales within MAX_LORA_SCALE, experts the
        model has; [[name, scale, expert], ...] in the request's order (the order they merge in)."""
        if not items:
            return []
        if self.lora_names is None:
            raise ApiError(400, "loras: this service has no --lora-dir, so it takes no per-request LoRAs", "loras")
        for i, item in enumerate(items):
            if item.name not in self.lora_names:
                known = ", ".join(sorted(self.lora_names)[:20]) or "none"
                raise ApiError(400, f"loras[{i}].name {item.name!r}: no such LoRA in --lora-dir (it has: {known})",
                               f"loras[{i}].name")
            if not (math.isfinite(item.scale) and 0 < abs(item.scale) <= MAX_LORA_SCALE):
                raise ApiError(400, f"loras[{i}].scale {item.scale!r}: give a finite number, not 0, at most "
                                    f"{MAX_LORA_SCALE:g} in size", f"loras[{i}].scale")
            if item.expert != "all" and self.cfg.num_experts != 2:
                raise ApiError(400, f"loras[{i}].expert {item.expert!r}: {self.model} has one expert; give \"all\"",
                               f"loras[{i}].expert")
        return [[item.name, item.scale, item.expert] for item in items]

    def check_image(self, image) -> None:
        """A first frame where the model and the layout take one, and one where the model needs it."""
        task, field = self.cfg.task, "input_reference"
        if image is not None and task == "t2v":
            raise ApiError(400, f"{field}: this service runs a text-to-video model ({self.model}); send no image",
                           field)
        if image is None and task == "i2v":
            raise ApiError(400, f"{field}: required; this service runs an image-to-video model, whose first frame "
                                f"is the image (a multipart upload, or base64 in JSON)", field)
        if image is not None and self.layout is not None and self.layout.stages:
            raise ApiError(400, f"{field}: split experts run text-to-video requests only, for now", field)
        if image is not None and self.chords is not None and task == "ti2v":
            raise ApiError(400, f"{field}: CHORDS with a TI2V image is not supported (its first frame is reset "
                                f"after every sequential step); this service runs CHORDS", field)

    def image_size(self, image) -> tuple[int, int]:
        """The video's size for an image when the request gives none: its shape at the model's area."""
        from paradit.conditioning import video_size_for_image
        try:
            return video_size_for_image(self.cfg, image.width, image.height)
        except ParameterError as err:
            raise ApiError(400, f"input_reference: {err.reason}; {err.fix}", "input_reference") from None

    def check_chords(self, s: VideoSettings, sampler: str | None) -> None:
        """A CHORDS server's request: Euler steps, enough of them for the cores, and no expert that a
        rank did not load (each rank loaded those its core runs at the server's --steps: the same
        function, on the same settings, as the ranks' own resolve)."""
        from paradit.cli.layout import experts_needed
        if sampler == "unipc":
            raise ApiError(400, "sampler unipc: this service solves with CHORDS (Euler steps, --chords); leave "
                                "sampler out or give \"euler\"", "sampler")
        try:
            self.chords.validate(s.steps, self.layout.chords)
        except ParameterError as err:
            raise ApiError(400, f"num_inference_steps {s.steps}: {err.reason} (this service runs CHORDS with "
                                f"{self.chords.cores} cores)", "num_inference_steps") from None
        served = self.defaults
        for rank in range(self.layout.world_size):
            have = experts_needed(self.cfg, self.layout, served, self.chords, rank)
            need = experts_needed(self.cfg, self.layout, s, self.chords, rank)
            if have is not None and (need is None or not need <= have):
                missing = " and ".join(["high-noise", "low-noise"][k] for k in sorted((need or {0, 1}) - have))
                raise ApiError(400, f"num_inference_steps {s.steps}: CHORDS core "
                                    f"{self.layout.coords(rank)['chords']} would run the {missing} expert, which "
                                    f"its ranks did not load (they loaded the experts of this service's --steps "
                                    f"{served.steps}); give {served.steps} or leave num_inference_steps out, or "
                                    f"serve with --steps {s.steps}", "num_inference_steps")

    def check_prompt(self, text: str, param: str, empty_ok: bool = False) -> None:
        cleaned = clean_prompt(text)
        if not cleaned and not empty_ok:
            raise ApiError(400, f"{param}: empty after removing whitespace; describe the video", param)
        with self.lock:
            n = len(self.tokenizer(cleaned, add_special_tokens=True).input_ids)
        if n > self.cfg.text_len:
            raise ApiError(400, f"{param} is {n} tokens long; the text encoder takes at most {self.cfg.text_len} "
                                f"(end-of-text included): shorten it", param)

    def size(self, size: str | None) -> tuple[int, int]:
        """The text "WxH" as two integers (their values are the library's to check)."""
        if size is None:
            return self.defaults.width, self.defaults.height
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
        if not m:
            raise ApiError(400, f"size {size!r}: write it as WIDTHxHEIGHT, e.g. "
                                f"\"{self.cfg.size[0]}x{self.cfg.size[1]}\"", "size")
        return int(m[1]), int(m[2])

    def frames(self, num_frames: int | None, seconds) -> int | None:
        """num_frames, or the frames of `seconds` at the model's fps (the nearest stride*k+1)."""
        if num_frames is not None and seconds is not None:
            raise ApiError(400, "give num_frames or seconds, not both", "seconds")
        if seconds is None:
            return num_frames
        try:
            value = float(seconds)
        except ValueError:
            raise ApiError(400, f"seconds={seconds!r}: {HINTS['seconds']}", "seconds") from None
        if not (math.isfinite(value) and value > 0):
            raise ApiError(400, f"seconds={seconds!r}: give a positive number", "seconds")
        stride, fps = self.cfg.vae_stride[0], self.cfg.fps
        longest = (MAX_FRAMES - 1) // stride * stride + 1
        if value * fps > longest + stride / 2:  # before round(): 1e308 * fps is inf
            raise ApiError(400, f"seconds={seconds!r}: at most {longest / fps:g} s ({longest} frames at {fps} fps)",
                           "seconds")
        return stride * max(1, round(value * fps / stride)) + 1

    def recheck(self, request: dict) -> str | None:
        """A stored request against the model and limits of this start (after a restart): the
        problem, or None."""
        try:
            fields = {k: request[k] for k in ("width", "height", "frames", "steps", "shift", "guidance",
                                              "seed", "sampler")}
            VideoSettings.resolve(self.cfg, **fields, cache=request.get("cache"))
            self.check_prompt(request["prompt"], "prompt")
            if request["steps"] > self.limits.max_steps or \
                    self.cfg.num_tokens(request["width"], request["height"], request["frames"]) > \
                    self.limits.max_video_tokens:
                return "larger than this service's limits (--max-steps, --max-video-tokens) after a restart"
            missing = [name for name, *_ in request.get("loras") or () if name not in (self.lora_names or ())]
            if missing:
                return f"its LoRAs {', '.join(missing)} are not in this start's --lora-dir"
            if request.get("image") and self.state_dir is not None and \
                    not (self.state_dir / request["image"]).is_file():
                return f"its first frame {request['image']} is missing from the state directory"
        except (KeyError, TypeError) as err:
            return f"its stored request is unreadable ({type(err).__name__}: {err})"
        except (ValueError, ApiError) as err:  # ParameterError is a ValueError
            return f"no longer valid for this service: {err}"
        return None


def check_lengths(body: VideoRequest) -> None:
    """Every text field within TEXT_CHARS, before a tokenizer or a parser reads it."""
    for name, most in TEXT_CHARS.items():
        value = getattr(body, name)
        if isinstance(value, str) and len(value) > most:
            raise ApiError(400, f"{name} is {len(value)} characters long; this service takes at most {most}",
                           name)


def in_field_terms(err: ParameterError, width: int, height: int) -> str:
    """A library ParameterError worded in request fields (`num_frames 8: ...`, `size 17x16: ...`)."""
    def name(param, value):
        if param in ("width", "height"):
            return f"size {width}x{height} ({param} {value})"
        return f"{PARAM_FIELDS.get(param, param)} {value}"
    return err.render(name, lambda alt: ", ".join(f"{PARAM_FIELDS.get(k, k)} {v}" for k, v in alt.items()))


def settings_of(request: dict) -> VideoSettings:
    """The stored request's settings, as the pipeline takes them."""
    fields = {k: request[k] for k in ("width", "height", "frames", "steps", "shift", "seed", "sampler")}
    return VideoSettings(guidance=tuple(request["guidance"]), cache=resolve_cache(request.get("cache")), **fields)


def video_object(job, progress: int) -> dict:
    """The OpenAI-style video object of a job (paradit.serve.jobs.Job)."""
    r = job.request  # {} when the stored request was unreadable (the job has failed, saying so)
    return {
        "id": job.id, "object": "video", "status": job.status,
        "progress": 100 if job.status == "completed" else progress,
        "created_at": int(job.created_at),
        "completed_at": None if job.completed_at is None else int(job.completed_at),
        "model": job.model, "size": f"{r['width']}x{r['height']}" if r else None, "num_frames": r.get("frames"),
        "seed": r.get("seed"), "prompt": r.get("prompt"), "num_inference_steps": r.get("steps"),
        "guidance_scale": list(r["guidance"]) if r else None,
        "sampler": r.get("sampler"), "cache": r.get("cache"),
        "loras": [dict(name=n, scale=s, expert=e) for n, s, e in r.get("loras") or ()],
        "error": None if job.error is None else {"message": job.error},
        "timings": job.timings,
    }

"""The request body of POST /v1/videos, its checks against the model, and the video object.

Two layers: pydantic rejects unknown fields and wrong types (422); `resolve` then checks the values
against the model being served (size a multiple of its stride, frames of the form stride*k+1,
steps in range, prompts that fit the text encoder) and answers 400 naming the field and what
would be valid. Both name the field in `error.param`, in the OpenAI error shape.
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
from paradit.settings import MAX_SEED, SAMPLER_NAMES, VideoSettings

Guidance = Annotated[list[float], Field(min_length=2, max_length=2)]
# the library's parameter -> the request field that sets it (ParameterErrors come out naming the field)
PARAM_FIELDS = {"width": "size", "height": "size", "frames": "num_frames", "steps": "num_inference_steps",
                "guidance": "guidance_scale", "seed": "seed", "sampler": "sampler"}


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


FIELDS = tuple(VideoRequest.model_fields)
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


def validation_error(errors: list[dict], content_type: str = "application/json") -> ApiError:
    """pydantic's errors -> one 422 naming each field, with what would be valid."""
    if "json" not in content_type and any(e["loc"][:1] == ("body",) for e in errors):
        return ApiError(422, f"the body must be JSON, sent with the header Content-Type: application/json "
                             f"(this request said {content_type or 'no Content-Type'!r})", "body")
    lines, first = [], None
    for e in errors:
        loc = [str(p) for p in e["loc"][1:]] if e["loc"][:1] in (("body",), ("query",)) else [str(p) for p in e["loc"]]
        param = loc[0] if loc and e["type"] != "json_invalid" else "body"
        first = first or param
        if e["type"] == "extra_forbidden":
            lines.append(f"{param}: unknown field; the fields are {', '.join(FIELDS)}")
        elif e["type"] == "missing":
            lines.append(f"{param}: required")
        elif e["type"] == "json_invalid":
            lines.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
        elif param in HINTS:
            lines.append(f"{param}: {HINTS[param]}")
        elif param == "body":
            lines.append('the body must be a JSON object with a prompt, e.g. {"prompt": "a red circle moving left"}')
        else:
            lines.append(f"{param}: {e['msg'][0].lower()}{e['msg'][1:]}")
    return ApiError(422, "; ".join(dict.fromkeys(lines)), first)


@dataclass(frozen=True)
class Limits:
    """The largest request the service takes (--max-steps, --max-video-tokens)."""
    max_steps: int
    max_video_tokens: int

    @staticmethod
    def default_video_tokens(cfg: WanConfig) -> int:
        """4x the model's default video, in transformer tokens."""
        return 4 * cfg.num_tokens(*cfg.size, cfg.frames)


class Checker:
    """Checks requests against the served model. `tokenizer` counts prompt tokens: a copy of the
    engine's, used under a lock (a fast tokenizer must not be used by two threads at once)."""

    def __init__(self, cfg: WanConfig, model: str, tokenizer, limits: Limits):
        self.cfg, self.model, self.tokenizer, self.limits = cfg, model, tokenizer, limits
        self.lock = threading.Lock()

    def resolve(self, body: VideoRequest) -> dict:
        """The job's stored request: prompts and the resolved settings; ApiError(400) if invalid."""
        cfg = self.cfg
        if body.model is not None and body.model != self.model:
            raise ApiError(400, f"model {body.model!r}: this service runs {self.model!r}; leave model out or "
                                f"give {self.model!r}", "model")
        self.check_prompt(body.prompt, "prompt")
        if body.negative_prompt is not None:
            self.check_prompt(body.negative_prompt, "negative_prompt", empty_ok=True)
        width, height = self.size(body.size)
        frames = self.frames(body.num_frames, body.seconds)
        steps = cfg.steps if body.num_inference_steps is None else body.num_inference_steps
        if not 1 <= steps <= self.limits.max_steps:
            raise ApiError(400, f"num_inference_steps {steps} is out of range: give 1 to {self.limits.max_steps} "
                                f"(this service's --max-steps)", "num_inference_steps")
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        try:
            s = VideoSettings.resolve(cfg, width, height, frames, steps, None, body.guidance_scale, seed,
                                      body.sampler or "unipc")
        except ParameterError as err:
            raise ApiError(400, in_field_terms(err, width, height), PARAM_FIELDS.get(err.param)) from None
        tokens, limit = cfg.num_tokens(s.width, s.height, s.frames), self.limits.max_video_tokens
        if tokens > limit:
            raise ApiError(400, f"a {s.width}x{s.height} video of {s.frames} frames is {tokens} tokens; this service "
                                f"takes at most {limit} (--max-video-tokens): make it smaller or shorter",
                           "num_frames" if body.size is None else "size")
        return {"prompt": body.prompt, "negative_prompt": body.negative_prompt, **asdict(s)}

    def check_prompt(self, text: str, param: str, empty_ok: bool = False) -> None:
        from paradit.models.text_encoder import clean_prompt
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
            return self.cfg.size
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
        stride = self.cfg.vae_stride[0]
        return stride * max(1, round(value * self.cfg.fps / stride)) + 1

    def recheck(self, request: dict) -> str | None:
        """A stored request against the model and limits of this start (after a restart): the
        problem, or None."""
        try:
            fields = {k: request[k] for k in ("width", "height", "frames", "steps", "shift", "guidance",
                                              "seed", "sampler")}
            VideoSettings.resolve(self.cfg, **fields)
            self.check_prompt(request["prompt"], "prompt")
            if request["steps"] > self.limits.max_steps or \
                    self.cfg.num_tokens(request["width"], request["height"], request["frames"]) > \
                    self.limits.max_video_tokens:
                return "larger than this service's limits (--max-steps, --max-video-tokens) after a restart"
        except (KeyError, TypeError) as err:
            return f"its stored request is unreadable ({type(err).__name__}: {err})"
        except (ValueError, ApiError) as err:  # ParameterError is a ValueError
            return f"no longer valid for this service: {err}"
        return None


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
    return VideoSettings(guidance=tuple(request["guidance"]), **fields)


def video_object(job, progress: int) -> dict:
    """The OpenAI-style video object of a job (paradit.serve.jobs.Job)."""
    r = job.request
    return {
        "id": job.id, "object": "video", "status": job.status,
        "progress": 100 if job.status == "completed" else progress,
        "created_at": int(job.created_at),
        "completed_at": None if job.completed_at is None else int(job.completed_at),
        "model": job.model, "size": f"{r['width']}x{r['height']}", "num_frames": r["frames"], "seed": r["seed"],
        "prompt": r["prompt"], "num_inference_steps": r["steps"], "guidance_scale": list(r["guidance"]),
        "sampler": r["sampler"], "error": None if job.error is None else {"message": job.error},
        "timings": job.timings,
    }

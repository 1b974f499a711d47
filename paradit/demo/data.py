"""Synthetic text-to-video clips: one coloured shape moving in a straight line over a plain background.

Each clip is drawn from a seeded generator, so a seed fixes the whole data stream. A clip's prompt
names its colour, shape and direction ("a red circle moving left"); its start position, size and
speed are random, so a model must read the prompt to know what to draw and where it goes.
Shapes are drawn from signed distances, anti-aliased over one pixel.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

COLOURS: dict[str, tuple[int, int, int]] = {   # the corners of the RGB cube: far apart for the judge
    "red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 80, 240),
    "yellow": (235, 225, 50), "cyan": (50, 220, 230), "magenta": (225, 50, 220),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
BACKGROUND = (24, 24, 32)
FRAMES, SIZE = 9, 16
HALF_SIZE = (2.5, 3.5)   # half the shape's extent, pixels
SPEED = (0.75, 1.0)      # pixels per frame


def prompt_for(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_prompt(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, direction) named in a prompt; None for what it does not name."""
    words = prompt.lower().split()
    pick = lambda names: next((w for w in words if w in names), None)  # noqa: E731
    return pick(COLOURS), pick(SHAPES), pick(DIRECTIONS)


def all_prompts() -> list[str]:
    return [prompt_for(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def unknown_words(prompt: str) -> list[str]:
    """The words of `prompt` that no training prompt has (the demo model knows "a COLOUR SHAPE
    moving DIRECTION" and nothing else), in order, once each; [] for a prompt it can draw."""
    known = {"a", "moving", *COLOURS, *SHAPES, *DIRECTIONS}
    words = re.findall(r"\w+", prompt.lower())  # its tokenizer's words (punctuation aside)
    return list(dict.fromkeys(w for w in words if w not in known))


def vocabulary_warning(prompt: str) -> str | None:
    """A one-line warning for a prompt with words the demo model never saw, naming them; else None."""
    unknown = unknown_words(prompt)
    if not unknown:
        return None
    return (f"the demo model does not know {', '.join(map(repr, unknown))} in {prompt!r}: it was trained on "
            f"'a COLOUR SHAPE moving DIRECTION' (colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; "
            f"directions {', '.join(DIRECTIONS)}); to it they mean nothing")


@dataclass(frozen=True)
class Clips:
    """A batch of clip descriptions: indices into COLOURS / SHAPES / DIRECTIONS, and geometry."""
    colour: Tensor     # (N,) long
    shape: Tensor      # (N,) long
    direction: Tensor  # (N,) long
    start: Tensor      # (N, 2) float: centre (x, y) of the first frame, pixels
    half: Tensor       # (N,) float
    speed: Tensor      # (N,) float

    @property
    def prompts(self) -> list[str]:
        cs, ds = list(COLOURS), list(DIRECTIONS)
        return [prompt_for(cs[c], SHAPES[s], ds[d])
                for c, s, d in zip(self.colour.tolist(), self.shape.tolist(), self.direction.tolist())]


def sample_clips(n: int, gen: torch.Generator, frames: int = FRAMES, size: int = SIZE) -> Clips:
    """Random clips whose shape stays inside the frame for the whole clip."""
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    colour = torch.randint(len(COLOURS), (n,), generator=gen)
    shape = torch.randint(len(SHAPES), (n,), generator=gen)
    direction = torch.randint(len(DIRECTIONS), (n,), generator=gen)
    half = HALF_SIZE[0] + (HALF_SIZE[1] - HALF_SIZE[0]) * u(n)
    speed = SPEED[0] + (SPEED[1] - SPEED[0]) * u(n)
    travel = speed * (frames - 1)
    vel = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)[direction]   # (N, 2)
    lo, hi = half[:, None], size - half[:, None]                                    # (N, 1) each
    room = hi - lo - travel[:, None] * vel.abs()                                    # (N, 2)
    start = lo + room * u(n, 2) + travel[:, None] * (vel < 0)                       # moving -x starts right
    return Clips(colour, shape, direction, start, half, speed)


def render(clips: Clips, frames: int = FRAMES, size: int = SIZE) -> Tensor:
    """uint8 videos (N, F, H, W, 3)."""
    n = clips.colour.shape[0]
    vel = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)[clips.direction]      # (N, 2)
    steps = torch.arange(frames, dtype=torch.float32)
    centre = clips.start[:, None] + vel[:, None] * (clips.speed[:, None, None] * steps[None, :, None])  # (N, F, 2)
    grid = torch.arange(size, dtype=torch.float32) + 0.5                                      # pixel centres
    dx = grid.view(1, 1, 1, size) - centre[..., 0, None, None]                                # (N, F, 1, W)
    dy = grid.view(1, 1, size, 1) - centre[..., 1, None, None]                                # (N, F, H, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)                                                  # (N, F, H, W)
    s = clips.half.view(n, 1, 1, 1)
    inside = torch.stack([                       # signed distance to the edge, > 0 inside, pixels
        s - torch.maximum(dx.abs(), dy.abs()),                                    # square
        s - torch.sqrt(dx**2 + dy**2),                                            # circle
        torch.minimum(s - dy, ((dy + s) / 2 - dx.abs()) * (2 / 5**0.5)),           # triangle, apex up
    ])[clips.shape, torch.arange(n)]                                                               # (N, F, H, W)
    alpha = (inside + 0.5).clamp(0, 1)[..., None]                                               # (N, F, H, W, 1)
    fg = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[clips.colour].view(n, 1, 1, 1, 3)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)
    return (bg + alpha * (fg - bg)).round().to(torch.uint8)


def make_batch(n: int, gen: torch.Generator, frames: int = FRAMES, size: int = SIZE) -> tuple[Tensor, list[str]]:
    """(uint8 videos (N, F, H, W, 3), prompts) of n random clips."""
    clips = sample_clips(n, gen, frames, size)
    return render(clips, frames, size), clips.prompts

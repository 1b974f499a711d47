"""Synthetic text-to-video clips: one coloured shape moving in a straight line over a plain background.

Each clip is drawn from a seeded generator, so a seed fixes the whole data stream. A clip's prompt
names its colour, shape and direction ("a red circle moving left"), and with a recipe of several
speeds its speed too ("a red circle moving left quickly"); its start position, size and exact speed
are random, so a model must read the prompt to know what to draw and where it goes. A Recipe holds a
model's settings: DEMO (the shipped 16x16x9 model) and DEMO64 (64x64x33, see docs/demo-model.md).
Shapes are drawn from signed distances, anti-aliased over one pixel.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import product

import torch

Tensor = torch.Tensor

COLOURS: dict[str, tuple[int, int, int]] = {   # the corners of the RGB cube: far apart for the judge
    "red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 80, 240),
    "yellow": (235, 225, 50), "cyan": (50, 220, 230), "magenta": (225, 50, 220),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down
BACKGROUND = (24, 24, 32)
SPEEDS: dict[str, tuple[float, float]] = {"slowly": (0.45, 0.65), "quickly": (0.95, 1.3)}   # pixels per frame
AREA = {"square": 4.0, "circle": math.pi, "triangle": 2.0}   # area / half**2 (triangle: base and height 2 half)


@dataclass(frozen=True)
class Recipe:
    """A demo model's data: clip size, shape sizes, speeds and which prompts training never shows."""
    frames: int
    size: int                                   # square frames, pixels
    half: tuple[float, float]                   # half the shape's extent, pixels (uniform)
    speeds: dict[str, tuple[float, float]] = field(default_factory=lambda: {"": (0.75, 1.0)})  # word: px/frame
    held_out: int = 0                           # prompts kept out of training (judged as unseen)

    def combos(self) -> list[tuple[int, int, int, int]]:
        """(colour, shape, direction, speed) indices of every prompt."""
        return list(product(range(len(COLOURS)), range(len(SHAPES)), range(len(DIRECTIONS)), range(len(self.speeds))))

    def held_out_combos(self) -> list[tuple[int, int, int, int]]:
        """Prompt i: colour i % 6, shape i % 3, direction i % 4, speed i // 12: distinct for i < 24, and
        every word stays in training (each held-out colour, say, has 24 - 4 training prompts)."""
        return [(i % len(COLOURS), i % len(SHAPES), i % len(DIRECTIONS), (i // 12) % len(self.speeds))
                for i in range(self.held_out)]

    def training_combos(self) -> list[tuple[int, int, int, int]]:
        out = set(self.held_out_combos())
        return [c for c in self.combos() if c not in out]

    def prompt(self, combo) -> str:
        c, s, d, v = combo
        return prompt_for(list(COLOURS)[c], SHAPES[s], list(DIRECTIONS)[d], list(self.speeds)[v])


DEMO = Recipe(frames=9, size=16, half=(2.5, 3.5))
DEMO64 = Recipe(frames=33, size=64, half=(5.0, 8.0), speeds=SPEEDS, held_out=24)
RECIPES = {"demo": DEMO, "demo64": DEMO64}   # by preset name (paradit/config.py)


def prompt_for(colour: str, shape: str, direction: str, speed: str = "") -> str:
    return f"a {colour} {shape} moving {direction}" + (f" {speed}" if speed else "")


def parse_prompt(prompt: str) -> tuple[str | None, str | None, str | None, str | None]:
    """(colour, shape, direction, speed) named in a prompt; None for what it does not name."""
    words = prompt.lower().split()
    pick = lambda names: next((w for w in words if w in names), None)  # noqa: E731
    return pick(COLOURS), pick(SHAPES), pick(DIRECTIONS), pick(SPEEDS)


def all_prompts(recipe: Recipe = DEMO) -> list[str]:
    return [recipe.prompt(c) for c in recipe.combos()]


def judged_prompts(model: str | Recipe, n: int | None = None) -> list[str]:
    """The prompts a demo model (a RECIPES name, or its Recipe) is judged on. n None: the honest set,
    those training never showed (Recipe.held_out), else 12 of its own. n: n prompts spread over the
    whole vocabulary (the benchmarks' sweeps), 2 per colour with shapes and motions mixed: every
    (len/12)-th, one further where there are speed words so that the odd step alternates them. A
    model that is not a demo model is a ValueError."""
    recipe = model if isinstance(model, Recipe) else RECIPES.get(model)
    if recipe is None:
        raise ValueError(f"{model!r} is not a judged demo model (those are {', '.join(RECIPES)})")
    if n is None and recipe.held_out:
        return [recipe.prompt(c) for c in recipe.held_out_combos()]
    every = all_prompts(recipe)
    step = len(every) // 12 + (len(recipe.speeds) > 1)
    return [every[(step * i) % len(every)] for i in range(12 if n is None else n)]


def unknown_words(prompt: str, recipe: Recipe = DEMO) -> list[str]:
    """The words of `prompt` that no training prompt has (the demo model knows "a COLOUR SHAPE
    moving DIRECTION [SPEED]" and nothing else), in order, once each; [] for a prompt it can draw."""
    known = {"a", "moving", *COLOURS, *SHAPES, *DIRECTIONS, *recipe.speeds} - {""}
    words = re.findall(r"\w+", prompt.lower())  # its tokenizer's words (punctuation aside)
    return list(dict.fromkeys(w for w in words if w not in known))


def vocabulary_warning(prompt: str, recipe: Recipe = DEMO) -> str | None:
    """A one-line warning for a prompt with words the demo model never saw, naming them; else None."""
    unknown = unknown_words(prompt, recipe)
    if not unknown:
        return None
    speeds = [w for w in recipe.speeds if w]
    return (f"the demo model does not know {', '.join(map(repr, unknown))} in {prompt!r}: it was trained on "
            f"'a COLOUR SHAPE moving DIRECTION{' SPEED' if speeds else ''}' (colours {', '.join(COLOURS)}; "
            f"shapes {', '.join(SHAPES)}; directions {', '.join(DIRECTIONS)}"
            + (f"; speeds {', '.join(speeds)}" if speeds else "") + "); to it they mean nothing")


@dataclass(frozen=True)
class Clips:
    """A batch of clip descriptions: indices into COLOURS / SHAPES / DIRECTIONS / the recipe's speeds,
    and geometry."""
    recipe: Recipe
    colour: Tensor     # (N,) long
    shape: Tensor      # (N,) long
    direction: Tensor  # (N,) long
    pace: Tensor       # (N,) long: the speed word
    start: Tensor      # (N, 2) float: centre (x, y) of the first frame, pixels
    half: Tensor       # (N,) float
    speed: Tensor      # (N,) float, pixels per frame

    @property
    def prompts(self) -> list[str]:
        rows = zip(self.colour.tolist(), self.shape.tolist(), self.direction.tolist(), self.pace.tolist())
        return [self.recipe.prompt(c) for c in rows]


def sample_clips(n: int, gen: torch.Generator, recipe: Recipe = DEMO) -> Clips:
    """Random clips of the recipe's training prompts whose shape stays inside the frame throughout.
    (DEMO draws its words one by one, as when the shipped weights were trained: same data stream.)"""
    if recipe.held_out or len(recipe.speeds) > 1:
        combos = torch.tensor(recipe.training_combos())                                  # (K, 4)
        colour, shape, direction, pace = combos[torch.randint(len(combos), (n,), generator=gen)].T
    else:
        colour = torch.randint(len(COLOURS), (n,), generator=gen)
        shape = torch.randint(len(SHAPES), (n,), generator=gen)
        direction = torch.randint(len(DIRECTIONS), (n,), generator=gen)
        pace = torch.zeros(n, dtype=torch.long)
    return place(recipe, colour, shape, direction, pace, gen)


def clips_for(prompts: list[str], gen: torch.Generator, recipe: Recipe = DEMO) -> Clips:
    """Random clips of the given prompts (held-out ones too): the judge's clean references."""
    index = {recipe.prompt(c): c for c in recipe.combos()}
    unknown = [p for p in prompts if p not in index]
    if unknown:
        raise ValueError(f"prompts {unknown} are not this recipe's (e.g. {recipe.prompt(recipe.combos()[0])!r})")
    colour, shape, direction, pace = torch.tensor([index[p] for p in prompts]).T
    return place(recipe, colour, shape, direction, pace, gen)


def place(recipe: Recipe, colour: Tensor, shape: Tensor, direction: Tensor, pace: Tensor,
          gen: torch.Generator) -> Clips:
    """Size, speed and start of each clip, drawn so that the shape stays inside the frame."""
    n = len(colour)
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    half = recipe.half[0] + (recipe.half[1] - recipe.half[0]) * u(n)
    lo_v, hi_v = torch.tensor(list(recipe.speeds.values())).T[:, pace]                  # (N,) each
    speed = lo_v + (hi_v - lo_v) * u(n)
    travel = speed * (recipe.frames - 1)
    vel = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)[direction]   # (N, 2)
    lo, hi = half[:, None], recipe.size - half[:, None]                             # (N, 1) each
    room = hi - lo - travel[:, None] * vel.abs()                                    # (N, 2)
    start = lo + room * u(n, 2) + travel[:, None] * (vel < 0)                       # moving -x starts right
    return Clips(recipe, colour, shape, direction, pace, start, half, speed)


def coverage(centre: Tensor, half: Tensor, shape: Tensor, size: int) -> Tensor:
    """Anti-aliased coverage (N, F, H, W) in [0, 1] of shapes (N,) centred at `centre` (N, F, 2)
    (x, y), half-extent `half` (N, F), on size x size frames."""
    grid = torch.arange(size, dtype=torch.float32, device=centre.device) + 0.5                # pixel centres
    dx = grid.view(1, 1, 1, size) - centre[..., 0, None, None]                                # (N, F, 1, W)
    dy = grid.view(1, 1, size, 1) - centre[..., 1, None, None]                                # (N, F, H, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)                                                  # (N, F, H, W)
    s = half[..., None, None]                                                                 # (N, F, 1, 1)
    inside = torch.stack([                       # signed distance to the edge, > 0 inside, pixels
        s - torch.maximum(dx.abs(), dy.abs()),                                    # square
        s - torch.sqrt(dx**2 + dy**2),                                            # circle
        torch.minimum(s - dy, ((dy + s) / 2 - dx.abs()) * (2 / 5**0.5)),           # triangle, apex up
    ])[shape.to(centre.device), torch.arange(len(shape), device=centre.device)]              # (N, F, H, W)
    return (inside + 0.5).clamp(0, 1)


def render(clips: Clips, device="cpu") -> Tensor:
    """uint8 videos (N, F, H, W, 3) on `device` (the clips are drawn on the CPU, so the same seed gives
    the same clips anywhere)."""
    n, frames = clips.colour.shape[0], clips.recipe.frames
    vel = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)[clips.direction]      # (N, 2)
    steps = torch.arange(frames, dtype=torch.float32)
    centre = clips.start[:, None] + vel[:, None] * (clips.speed[:, None, None] * steps[None, :, None])  # (N, F, 2)
    half = clips.half[:, None].expand(n, frames).to(device)
    alpha = coverage(centre.to(device), half, clips.shape, clips.recipe.size)[..., None]     # (N, F, H, W, 1)
    fg = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[clips.colour].view(n, 1, 1, 1, 3).to(device)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=device)
    return (bg + alpha * (fg - bg)).round().to(torch.uint8)


def make_batch(n: int, gen: torch.Generator, recipe: Recipe = DEMO, device="cpu") -> tuple[Tensor, list[str]]:
    """(uint8 videos (N, F, H, W, 3) on `device`, prompts) of n random training clips."""
    clips = sample_clips(n, gen, recipe)
    return render(clips, device), clips.prompts

"""The quality harness: what a demo video shows, and how far any run is from the exact one.

What it shows: `judge(video, prompt)` checks a video against its prompt ("a red circle moving left
quickly") and returns a Verdict per word: the shape's dominant colour (a vote of its pixels, see
dominant_colour) must be the prompt's; its silhouette must fit the prompt's shape best of a rendered
reference of each (see shape_of); its centroid must travel at least `min_travel` pixels, mostly along
the prompt's direction; and where the prompt names a speed, the centroid's pixels per frame must be
on that side of the midpoint between the speed words' ranges (data.SPEEDS). The background is the
median colour of the frame borders, so any plain background works.

How far from the exact run (an approximation's cost: step caching, CHORDS, FP8, fewer steps):
psnr and ssim of decoded uint8 frames, rel_err of latents. bench/cache.py, chords.py and quant.py
measure with these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from paradit.demo.data import AREA, COLOURS, DIRECTIONS, SHAPES, SPEEDS, coverage, parse_prompt

Tensor = torch.Tensor
SLOW_FAST = (SPEEDS["slowly"][1] + SPEEDS["quickly"][0]) / 2     # pixels per frame between the speed words


@dataclass(frozen=True)
class Seen:
    colour: str | None               # dominant palette colour of the foreground; None if there is none
    travel: tuple[float, float]      # centroid displacement (dx, dy), first to last frame, y down
    direction: str | None            # left / right / up / down, from the larger component of travel
    coverage: float                  # share of pixels that are foreground, over all frames
    shape: str | None = None         # the reference shape the silhouette fits best
    speed: float = 0.0               # centroid pixels per frame


class Verdict(NamedTuple):
    """Whether a video shows each thing its prompt names; speed is None for a prompt without one."""
    colour: bool
    shape: bool
    direction: bool
    speed: bool | None = None

    @property
    def ok(self) -> bool:
        return self.colour and self.shape and self.direction and self.speed is not False


def background(video: Tensor) -> Tensor:
    """(3,) float: median colour of the one-pixel border of every frame. video uint8 (F, H, W, 3)."""
    v = video.float()
    border = torch.cat([v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]], dim=1)    # (F, 2H + 2W, 3)
    return border.reshape(-1, 3).median(dim=0).values


def dominant_colour(pixels: Tensor, bg: Tensor) -> str:
    """Palette colour of most foreground pixels (N, 3), each vote weighted by its distance from bg.

    A pixel at a shape's edge is a blend bg + alpha * (c - bg), so each pixel votes for the palette
    colour c whose blend fits it best, not for the nearest colour (a dim yellow edge is nearer green).
    """
    d = pixels - bg                                                            # (N, 3)
    p = torch.tensor(list(COLOURS.values()), dtype=torch.float32) - bg         # (K, 3)
    alpha = ((d @ p.T) / (p * p).sum(-1)).clamp(0, 1)                          # (N, K)
    misfit = (d[:, None, :] - alpha[..., None] * p).norm(dim=-1)              # (N, K)
    votes = torch.zeros(len(p)).index_add_(0, misfit.argmin(dim=1), d.norm(dim=-1))
    return list(COLOURS)[int(votes.argmax())]


def shape_of(video: Tensor, colour: str, bg: Tensor, near: Tensor | None = None,
             min_area: float = 4.0) -> str | None:
    """The shape whose rendered reference best fits the silhouette, summed over frames.

    A frame's silhouette is each pixel's blend weight alpha of the colour over bg (so edges count
    partly), on the pixels `near` the shape ((F, H, W) bool; None: every pixel). analyse passes the
    foreground dilated by one pixel: anti-aliased edges count, grain elsewhere does not. (A generated
    video's background is rarely flat: the trained demo64 model leaves grain with a median distance of
    27 RGB units from the background; over 4,096 pixels a frame it outweighed the shape's own ~150,
    and squares were taken for triangles.) For each shape the reference is drawn by data.coverage with the silhouette's area
    (area = AREA[shape] half**2) at its centroid (a triangle's centroid lies half/3 below its centre),
    and the misfit is sum |alpha - reference| / area; the shape of least total misfit wins. Square,
    circle and triangle fill 100%, 79% and 50% of their bounding box, so their misfits differ clearly.
    """
    f, h, w, _ = video.shape
    c = torch.tensor(COLOURS[colour], dtype=torch.float32) - bg
    alpha = (((video.float() - bg) @ c) / (c @ c)).clamp(0, 1)                 # (F, H, W)
    if near is not None:
        alpha = alpha * near
    area = alpha.sum(dim=(1, 2))                                               # (F,)
    keep = area >= min_area
    if not keep.any():
        return None
    alpha, area = alpha[keep], area[keep]
    ys, xs = torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5
    centroid = torch.stack([(alpha.sum(1) * xs).sum(-1), (alpha.sum(2) * ys).sum(-1)], -1) / area[:, None]  # (F', 2)
    half = torch.stack([(area / AREA[s]).sqrt() for s in SHAPES])             # (3, F')
    centre = centroid.expand(len(SHAPES), -1, -1).clone()                      # (3, F', 2)
    centre[SHAPES.index("triangle"), :, 1] -= half[SHAPES.index("triangle")] / 3
    ref = coverage(centre, half, torch.arange(len(SHAPES)), h if h == w else max(h, w))[..., :h, :w]  # (3, F', H, W)
    misfit = ((alpha - ref).abs().sum(dim=(2, 3)) / area).sum(1)              # (3,)
    return SHAPES[int(misfit.argmin())]


def analyse(video: Tensor, threshold: float = 60.0) -> Seen:
    """Foreground = pixels farther than `threshold` (RGB distance, 0-255) from the background."""
    v = video.float()                                                          # (F, H, W, 3)
    f, h, w, _ = v.shape
    bg = background(video)
    dist = (v - bg).norm(dim=-1)                                               # (F, H, W)
    fg = dist > threshold
    if not fg.any():
        return Seen(None, (0.0, 0.0), None, 0.0)
    colour = dominant_colour(v[fg], bg)
    near = F.max_pool2d(fg[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0    # (F, H, W): fg and its edge
    shape = shape_of(video, colour, bg, near)
    # centroids of frames that show something, weighted by distance from the background
    wgt = (dist - threshold).clamp(min=0)                                      # (F, H, W)
    mass = wgt.sum(dim=(1, 2))                                                 # (F,)
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    cx = (wgt.sum(1) * xs).sum(-1) / mass.clamp(min=1e-6)                      # (F,)
    cy = (wgt.sum(2) * ys).sum(-1) / mass.clamp(min=1e-6)
    keep = (mass > 0).nonzero().flatten()
    if len(keep) < 2:
        return Seen(colour, (0.0, 0.0), None, float(fg.float().mean()), shape)
    # least-squares slope of the centroid over the frames, times the clip's length
    t = keep.float() - keep.float().mean()
    span = float(f - 1)
    dx = float((t * cx[keep]).sum() / (t * t).sum()) * span
    dy = float((t * cy[keep]).sum() / (t * t).sum()) * span
    if abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return Seen(colour, (dx, dy), direction, float(fg.float().mean()), shape, math.hypot(dx, dy) / span)


def judge(video: Tensor, prompt: str, min_travel: float = 3.0) -> Verdict:
    """Verdict(colour, shape, direction, speed) of a uint8 video (F, H, W, 3) against its prompt."""
    colour, shape, direction, speed = parse_prompt(prompt)
    if colour is None or shape is None or direction is None:
        raise ValueError(f"prompt {prompt!r} does not name a colour, a shape and a direction; judge needs all three "
                         f"(colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; "
                         f"directions: {', '.join(DIRECTIONS)})")
    seen = analyse(video)
    travelled = math.hypot(*seen.travel) >= min_travel
    moved = seen.direction == direction and travelled
    pace = None if speed is None else travelled and (seen.speed >= SLOW_FAST) == (speed == "quickly")
    return Verdict(seen.colour == colour, seen.shape == shape, moved, pace)


# ----------------------------------------------------------------------------- distances to the exact run
def psnr(a: Tensor, b: Tensor) -> float | None:
    """PSNR (dB) of uint8 frames a against b, over every pixel; None when identical (infinite)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: Tensor, b: Tensor) -> float:
    """Mean SSIM of uint8 frames (F, H, W, 3): per frame and channel, 11x11 Gaussian window
    (sigma 1.5, 'valid' positions only; smaller frames a window of their size), C1 = (0.01 L)^2,
    C2 = (0.03 L)^2, L = 255 (Wang et al. 2004)."""
    x = a.permute(0, 3, 1, 2).double().reshape(-1, 1, *a.shape[1:3])      # (F*3, 1, H, W)
    y = b.permute(0, 3, 1, 2).double().reshape(-1, 1, *b.shape[1:3])
    size = min(11, *a.shape[1:3])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]              # (1, 1, size, size)
    blur = lambda t: torch.nn.functional.conv2d(t, w)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean().item()


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64: a run's latent (or any tensor) against the exact one, b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

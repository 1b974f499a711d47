"""What a generated demo video shows: the colour of its moving shape and the way it moves.

`judge(video, prompt)` checks a video against its prompt ("a red circle moving left"): the shape's
dominant colour (a vote of its pixels, see dominant_colour) must be the prompt's, and
the centroid of its pixels must travel at least `min_travel` pixels, mostly along the prompt's
direction. The background is the median colour of the frame borders, so any plain background works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from paradit.demo.data import COLOURS, DIRECTIONS, parse_prompt

Tensor = torch.Tensor


@dataclass(frozen=True)
class Seen:
    colour: str | None               # dominant palette colour of the foreground; None if there is none
    travel: tuple[float, float]      # centroid displacement (dx, dy), first to last frame, y down
    direction: str | None            # left / right / up / down, from the larger component of travel
    coverage: float                  # share of pixels that are foreground, over all frames


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
    # centroids of frames that show something, weighted by distance from the background
    wgt = (dist - threshold).clamp(min=0)                                      # (F, H, W)
    mass = wgt.sum(dim=(1, 2))                                                 # (F,)
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    cx = (wgt.sum(1) * xs).sum(-1) / mass.clamp(min=1e-6)                      # (F,)
    cy = (wgt.sum(2) * ys).sum(-1) / mass.clamp(min=1e-6)
    keep = (mass > 0).nonzero().flatten()
    if len(keep) < 2:
        return Seen(colour, (0.0, 0.0), None, float(fg.float().mean()))
    # least-squares slope of the centroid over the frames, times the clip's length
    t = keep.float() - keep.float().mean()
    span = float(f - 1)
    dx = float((t * cx[keep]).sum() / (t * t).sum()) * span
    dy = float((t * cy[keep]).sum() / (t * t).sum()) * span
    if abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return Seen(colour, (dx, dy), direction, float(fg.float().mean()))


def judge(video: Tensor, prompt: str, min_travel: float = 3.0) -> tuple[bool, bool]:
    """(colour_ok, direction_ok) of a uint8 video (F, H, W, 3) against its prompt."""
    colour, _, direction = parse_prompt(prompt)
    if colour is None or direction is None:
        raise ValueError(f"prompt {prompt!r} names no colour or no direction; judge needs both "
                         f"(colours: {', '.join(COLOURS)}; directions: {', '.join(DIRECTIONS)})")
    seen = analyse(video)
    travel = (seen.travel[0] ** 2 + seen.travel[1] ** 2) ** 0.5
    return seen.colour == colour, seen.direction == direction and travel >= min_travel

"""What scripts/train_demo.py writes besides the weights: the judge's verdicts, the loss curve and
the contact sheet (a grid of frames, one row per prompt)."""
from __future__ import annotations

from pathlib import Path

import torch

from paradit.demo.data import Recipe, all_prompts
from paradit.demo.judge import judge

FIELDS = ("colour", "shape", "direction", "speed")


def judged_prompts(recipe: Recipe) -> tuple[list[str], str]:
    """The prompts a trained model is judged on: those training never showed, else 12 of its own."""
    if recipe.held_out:
        return [recipe.prompt(c) for c in recipe.held_out_combos()], "held out of training"
    return all_prompts(recipe)[::6], "12 training prompts (every colour twice)"


def evaluate(pipe, recipe: Recipe) -> dict:
    """Each judged prompt generated once (seed = its index, default settings) and judged: how many
    pass on each word and on all, and what the failures showed."""
    prompts, which = judged_prompts(recipe)
    verdicts = [judge(pipe(p, seed=i, progress=False).cpu(), p) for i, p in enumerate(prompts)]
    passed = {f: sum(bool(getattr(v, f)) for v in verdicts) for f in FIELDS if verdicts[0].speed is not None
              or f != "speed"}
    passed["all"] = sum(v.ok for v in verdicts)
    return dict(prompts=which, count=len(prompts), passed=passed,
                failures={p: v._asdict() for p, v in zip(prompts, verdicts) if not v.ok})


def sample_prompts(recipe: Recipe, count: int = 8) -> list[str]:
    """Prompts for the contact sheet: held-out ones first (what the model was never shown), then
    training ones spread over the vocabulary."""
    held = [recipe.prompt(c) for c in recipe.held_out_combos()][:count // 2]
    seen = [recipe.prompt(c) for c in (recipe.training_combos() if recipe.held_out else recipe.combos())]
    step = max(1, len(seen) // (count - len(held)))
    return held + seen[5::step][:count - len(held)]


def contact_sheet(path: Path, videos: list[torch.Tensor], prompts: list[str], columns: int = 9,
                  scale: int = 2) -> None:
    """One row per prompt: `columns` frames evenly spaced from the first to the last, left to right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, h, w, _ = videos[0].shape
    scale = max(scale, 64 // h)                                   # small frames drawn larger
    picks = torch.linspace(0, f - 1, min(columns, f)).round().long()
    fig, axes = plt.subplots(len(videos), 1, figsize=(1.1 * len(picks) * w * scale / 64, 1.25 * len(videos)))
    for ax, v, p in zip(axes, videos, prompts):
        gap = torch.full((h, 2, 3), 255, dtype=torch.uint8)
        row = torch.cat([torch.cat([v[k].cpu(), gap], dim=1) for k in picks], dim=1)   # (H, n*(W+2), 3)
        ax.imshow(row.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy(), interpolation="nearest")
        ax.set_title(f"{p}   (frames {', '.join(str(int(k)) for k in picks)})", fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss(path: Path, losses: dict, name: str, window: int = 50) -> None:
    """Smoothed loss against iteration; the experts' curves start where the shared model's ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    start = {"shared": 0, "high": len(losses["shared"]), "low": len(losses["shared"])}
    labels = {"shared": "shared model (all sigmas)", "high": "high-noise expert", "low": "low-noise expert"}
    for part, ls in losses.items():
        if not ls:
            continue
        y = torch.tensor(ls)
        w = min(window, len(y))
        smooth = y.unfold(0, w, 1).mean(1)
        ax.plot(start[part] + w - 1 + torch.arange(len(smooth)), smooth, label=labels[part])
    ax.set(xlabel="iteration", ylabel=f"flow-matching loss (mean of {window})", yscale="log",
           title=f"{name} model training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""What shows how well a trained demo model draws, made from its weights folder alone: the judge's
verdicts on the prompts training never showed (written into the folder's train.json as `judged`),
the contact sheet (frames of several prompts) and the loss curve.

    python scripts/demo_report.py paradit/assets/demo64 [--log TRAINING_LOG [--log RESUMED_LOG]] [--docs docs]

writes FOLDER/train.json's `judged`, docs/PRESET-samples.png and docs/PRESET-loss.png. The losses
come from FOLDER/losses.json (scripts/train_demo.py writes it), or else from the `iter N  loss ...`
lines of training logs (one point per 100 iterations, each the mean of the 100 before it; a log
of a run that went on from the weights of another, train_demo.py --init, follows that one's).
scripts/train_demo.py makes the same report right after training, with the same functions.
Generation runs on the CPU, one prompt after another (24 + 4 videos: minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, run as a script

from paradit.config import WanConfig  # noqa: E402
from paradit.demo.data import RECIPES, Recipe, judged_prompts  # noqa: E402
from paradit.demo.judge import judge  # noqa: E402

FIELDS = ("colour", "shape", "direction", "speed")


def evaluate(videos: list[torch.Tensor], prompts: list[str], which: str) -> dict:
    """The judge's verdicts on each video of its prompt: how many pass on each word and on all, and
    what the failures showed."""
    verdicts = [judge(v.cpu(), p) for v, p in zip(videos, prompts)]
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


def contact_sheet(path: Path, videos: list[torch.Tensor], titles: list[str], columns: int = 9,
                  scale: int = 2) -> None:
    """One row per video (its title above it): `columns` frames evenly spaced from the first to the
    last, left to right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, h, w, _ = videos[0].shape
    scale = max(scale, 64 // h)                                   # small frames drawn larger
    picks = torch.linspace(0, f - 1, min(columns, f)).round().long()
    inches = lambda pixels: pixels * scale / 100                  # noqa: E731 (drawn at 100 dpi, 1:1)
    fig, axes = plt.subplots(len(videos), 1, figsize=(inches(len(picks) * (w + 2)) + 0.2,
                                                      (inches(h) + 0.3) * len(videos)))
    for ax, v, title in zip(axes, videos, titles):
        gap = torch.full((h, 2, 3), 255, dtype=torch.uint8)
        row = torch.cat([torch.cat([v[k].cpu(), gap], dim=1) for k in picks], dim=1)   # (H, n*(W+2), 3)
        ax.imshow(row.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy(), interpolation="nearest")
        ax.set_title(f"{title}   (frames {', '.join(str(int(k)) for k in picks)})", fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss(path: Path, points: dict[str, list], name: str, source: str) -> None:
    """Loss against iteration, one line per part ([iteration, mean loss] points; the experts'
    iterations count on from the shared model's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    labels = {"shared": "shared model (all sigmas)", "high": "high-noise expert", "low": "low-noise expert"}
    for part, pts in points.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=labels[part])
    ax.set(xlabel="iteration", ylabel="flow-matching loss", yscale="log", title=f"{name} model training")
    ax.legend(loc="upper right")
    fig.text(0.01, 0.01, f"from {source}", fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


LOSSES = "losses.json"
LOG_LINE = re.compile(r"^iter\s+(\d+)\s+loss\s+(.*?)\s+\d+s$")


def loss_points(losses: dict[str, list[float]], every: int = 10) -> dict[str, list]:
    """Per-iteration losses (train_demo.train's) as [iteration, mean of the `every` before it]
    points; the experts' iterations count on from the shared stage's last."""
    start = {"shared": 0, "high": len(losses["shared"]), "low": len(losses["shared"])}
    return {part: [[start[part] + i + len(block) - 1, round(sum(block) / len(block), 5)]
                   for i in range(0, len(ls), every) for block in [ls[i:i + every]]]
            for part, ls in losses.items()}


def losses_from_log(path: Path, start: int = 0) -> dict[str, list]:
    """The points of a training log's `iter N  loss shared X` / `iter N  loss high X  low Y` lines,
    each X the mean of the (up to) 100 losses before iteration N; iterations counted from `start`."""
    points = {"shared": [], "high": [], "low": []}
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line.strip())
        for part, value in re.findall(r"(shared|high|low) ([\d.]+)", m.group(2)) if m else []:
            points[part].append([start + int(m.group(1)), float(value)])
    if not any(points.values()):
        raise SystemExit(f"--log {path}: no `iter N  loss ...` lines (scripts/train_demo.py's progress lines)")
    return points


def losses_from_logs(paths: list[Path]) -> dict[str, list]:
    """Several logs in order, each run going on from the one before (train_demo.py --init): the
    iterations of each continue the previous log's."""
    points = {"shared": [], "high": [], "low": []}
    for path in paths:
        start = 1 + max((pts[-1][0] for pts in points.values() if pts), default=-1)
        for part, pts in losses_from_log(path, start).items():
            points[part] += pts
    return points


def read_losses(folder: Path, logs: list[str] | None) -> tuple[dict[str, list] | None, str]:
    """The loss points and where they came from: FOLDER/losses.json, else --log, else none."""
    if (folder / LOSSES).is_file():
        saved = json.loads((folder / LOSSES).read_text())
        return saved["points"], f"{folder / LOSSES}: means of {saved['every']} iterations"
    if logs:
        names = " then ".join(Path(p).name for p in logs)
        return losses_from_logs([Path(p) for p in logs]), f"{names}: means of 100 iterations"
    return None, f"no {folder / LOSSES} and no --log: no loss curve"


def sampler(cfg: WanConfig, experts, text, codec, device: str):
    """A one-device pipeline of trained experts with everything on `device`; its codec decodes what
    the low-noise expert can write (paradit.demo.decode_writable), as the shipped model's does."""
    from paradit.demo import decode_writable
    from paradit.parallel.mesh import init_parallel
    from paradit.pipeline import Pipeline
    from paradit.plan.layout import ParallelConfig
    text.model.to(device)
    text.device = torch.device(device)
    return Pipeline(cfg, experts, text, decode_writable(codec, experts),
                    mesh=init_parallel(ParallelConfig(), device=device))


def write_report(pipe, folder: Path, info: dict, docs: Path | None, losses) -> dict:
    """Judge the held-out prompts (seed = index, default settings) into FOLDER/train.json's
    `judged`; with `docs`, the contact sheet and (given losses: (points, source)) the loss curve."""
    name, t0 = pipe.cfg.name, time.perf_counter()
    recipe, drawn = RECIPES[pipe.cfg.name], {}

    def draw(prompt: str, seed: int) -> torch.Tensor:       # the sheet reuses the judged videos
        if (prompt, seed) not in drawn:
            drawn[prompt, seed] = pipe(prompt, seed=seed, progress=False).cpu()
        return drawn[prompt, seed]

    prompts = judged_prompts(recipe)
    which = "held out of training" if recipe.held_out else "12 training prompts (every colour twice)"
    judged = evaluate([draw(p, i) for i, p in enumerate(prompts)], prompts, which)
    judged["by"] = (f"scripts/demo_report.py on {pipe.mesh.device.type}, torch {torch.__version__}, "
                    f"{time.perf_counter() - t0:.0f} s")
    info["judged"] = judged
    (folder / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{name}: judged on {judged['count']} prompts ({which}): passed {json.dumps(judged['passed'])}; "
          f"written into {folder / 'train.json'}")
    if docs:
        docs.mkdir(parents=True, exist_ok=True)
        sheet = sample_prompts(recipe)
        titles = [p + ("  (held out of training)" if recipe.held_out and p in prompts else "") for p in sheet]
        contact_sheet(docs / f"{name}-samples.png", [draw(p, i) for i, p in enumerate(sheet)], titles)
        print(f"wrote {docs / f'{name}-samples.png'}")
        if losses[0]:
            plot_loss(docs / f"{name}-loss.png", losses[0], name, losses[1])
            print(f"wrote {docs / f'{name}-loss.png'} ({losses[1]})")
        else:
            print(f"{losses[1]}: kept {docs / f'{name}-loss.png'} as it was")
    return judged


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/demo_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", nargs="?", default="paradit/assets/demo64",
                   help="a trained demo model's folder: high/low/text_encoder.safetensors and train.json")
    p.add_argument("--log", action="append", help="a training log to read the losses from when FOLDER has no "
                   "losses.json; again for a run that went on from it (--init), in order")
    p.add_argument("--docs", default="docs", help="folder for PRESET-samples.png and PRESET-loss.png ('' = none)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    if not (Path(args.folder) / "train.json").is_file():
        p.error(f"{args.folder}: no train.json (the folder scripts/train_demo.py --out wrote)")
    for log in args.log or []:
        if not Path(log).is_file():
            p.error(f"--log {log}: no such file")
    return args


def main(argv=None) -> None:
    from paradit.demo import demo_components
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    info = json.loads((folder / "train.json").read_text())
    cfg = WanConfig.preset(info["preset"])
    losses = read_losses(folder, args.log)
    pipe = sampler(cfg, *demo_components(cfg, "cpu", assets=folder), "cpu")
    write_report(pipe, folder, info, Path(args.docs) if args.docs else None, losses)


if __name__ == "__main__":
    main()

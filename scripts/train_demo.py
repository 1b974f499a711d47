"""Train the demo model: `python scripts/train_demo.py --out paradit/assets/demo`.

Flow matching on the shifted Wan schedule, two experts split at the preset's boundary:
    x_sigma = (1 - sigma) x0 + sigma * noise,   target v = noise - x0   (so x0 = x - sigma * v),
    u ~ U(0, 1),  sigma = shift * u / (1 + (shift - 1) * u),  t = 1000 * sigma.
Stage 1 trains one model on all sigmas; stage 2 copies it into the high-noise expert, which learns
sigma >= boundary, and the low-noise expert, sigma < boundary (the sampler's rule
t >= boundary * 1000), each from u drawn uniformly on its own part of [0, 1). Every step draws
fresh clips (data.py). The text encoder is a tiny umT5 kept frozen at its seeded random weights,
which are shipped too (a later transformers may initialise differently); a tenth of the prompts
are dropped to "" so that classifier-free guidance with negative_prompt="" has an unconditional
branch to use.

Deterministic on CPU for a given seed and thread count: AdamW, fixed seeds, no data-loader
workers. One thread by default: on a shared machine a second thread mostly waits for a busy core,
and the result does not depend on how many cores the machine has. Writes high.safetensors,
low.safetensors, text_encoder.safetensors and train.json into --out, and the loss curve and
sample frames into --docs.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when paradit is not installed

from paradit.config import WanConfig  # noqa: E402
from paradit.demo.codec import TimeToDepthCodec  # noqa: E402
from paradit.demo.data import RECIPES, all_prompts, make_batch  # noqa: E402
from paradit.models.text_encoder import TextEncoder  # noqa: E402
from paradit.models.transformer import WanTransformer  # noqa: E402

Tensor = torch.Tensor
SAMPLE_PROMPTS = ["a red circle moving right", "a green square moving left", "a blue triangle moving up",
                  "a yellow circle moving down", "a cyan triangle moving left", "a magenta square moving up"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/train_demo.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="paradit/assets/demo", help="folder for the weights")
    p.add_argument("--docs", default="docs", help="folder for demo-loss.png and demo-samples.png ('' = none)")
    p.add_argument("--shared", type=int, default=1500, help="iterations of the one model both experts start from")
    p.add_argument("--iters", type=int, default=500, help="iterations after the split; each trains both experts once")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.1, help="share of prompts replaced by ''")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cuda is for trying recipes fast; the shipped weights are from cpu")
    return p.parse_args(argv)


def sample_sigmas(n: int, shift: float, boundary: float, high: bool | None, gen: torch.Generator) -> Tensor:
    """(n,) sigmas from the shifted schedule; high=True / False keeps one expert's side of the
    boundary, None the whole range."""
    u_b = boundary / (shift - (shift - 1) * boundary)     # the u whose shifted sigma is the boundary
    lo, hi = {None: (0.0, 1.0), True: (u_b, 1.0), False: (0.0, u_b)}[high]
    u = lo + (hi - lo) * torch.rand(n, generator=gen)
    return shift * u / (1 + (shift - 1) * u)


def lr_at(it: int, iters: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth."""
    if it < warmup:
        return lr * (it + 1) / warmup
    p = (it - warmup) / max(1, iters - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


class PromptTable:
    """Every demo prompt's embedding, computed once: the text encoder is frozen."""

    def __init__(self, text: TextEncoder):
        prompts = all_prompts()
        emb = text.encode(prompts + [""])                             # (P + 1, text_len, text_dim)
        self.index = {p: i for i, p in enumerate(prompts)}
        self.emb, self.empty = emb[:-1], emb[-1]

    def __call__(self, prompts: list[str], drop: Tensor) -> Tensor:
        """(B, text_len, text_dim); rows where drop is True get the empty prompt's embedding."""
        emb = self.emb[[self.index[p] for p in prompts]]
        return torch.where(drop[:, None, None], self.empty, emb)


def train_step(model, opt, codec, table, cfg: WanConfig, high: bool | None, args, gen: torch.Generator) -> float:
    videos, prompts = make_batch(args.batch, gen, RECIPES[cfg.name])
    x0 = codec.encode(videos)                                          # (B, C, F, h, w)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = sample_sigmas(args.batch, cfg.shift, cfg.boundary, high, gen)
    drop = torch.rand(args.batch, generator=gen) < args.dropout
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    dev = args.device
    v = model(xt.to(dev), (1000 * sigma).to(dev), table(prompts, drop).to(dev))
    x0, noise = x0.to(dev), noise.to(dev)
    loss = (v - (noise - x0)).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train(cfg: WanConfig, args, log=print):
    """Stage 1: one model on all sigmas (`--shared` iterations). Stage 2: two copies of it, the
    high-noise and the low-noise expert, each on its side of the boundary (`--iters` iterations
    each), as Wan2.2's experts grow from one model. One learning-rate schedule spans both stages."""
    torch.manual_seed(args.seed)
    text = TextEncoder.tiny(cfg.text_dim, cfg.text_len, seed=args.seed)
    table, codec = PromptTable(text), TimeToDepthCodec()
    torch.manual_seed(args.seed + 1)
    base = WanTransformer(cfg).to(args.device)
    total = args.shared + args.iters
    new_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)  # noqa: E731
    losses = {"shared": [], "high": [], "low": []}
    t0 = time.perf_counter()

    def report(it: int, names) -> None:
        if it % 100 == 0 or it in (args.shared - 1, total - 1):
            parts = "  ".join(f"{n} {sum(losses[n][-100:]) / len(losses[n][-100:]):.4f}" for n in names)
            log(f"iter {it:5d}  loss {parts}  {time.perf_counter() - t0:.0f}s")

    opt, gen = new_opt(base), torch.Generator().manual_seed(args.seed + 2)
    for it in range(args.shared):
        set_lr(opt, lr_at(it, total, args.lr, args.warmup))
        losses["shared"].append(train_step(base, opt, codec, table, cfg, None, args, gen))
        report(it, ["shared"])
    experts = [copy.deepcopy(base) for _ in range(2)]                 # 0: high-noise, 1: low-noise
    opts = [new_opt(m) for m in experts]
    if args.shared:
        for o in opts:
            o.load_state_dict(opt.state_dict())                          # carry AdamW's moments on
    gens = [torch.Generator().manual_seed(args.seed + 3 + k) for k in range(2)]
    for it in range(args.shared, total):
        for k, name in enumerate(("high", "low")):
            set_lr(opts[k], lr_at(it, total, args.lr, args.warmup))
            losses[name].append(train_step(experts[k], opts[k], codec, table, cfg, k == 0, args, gens[k]))
        report(it, ["high", "low"])
    for m in experts:
        m.eval().requires_grad_(False)
    return experts, text, codec, losses, time.perf_counter() - t0


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def save(out: Path, experts, text: TextEncoder, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, m in zip(("high", "low"), experts):
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, out / f"{name}.safetensors")
    save_model(text.model, str(out / "text_encoder.safetensors"))     # handles umT5's tied embeddings
    (out / "train.json").write_text(json.dumps(info, indent=2) + "\n")


def plot_loss(path: Path, losses: dict, window: int = 50) -> None:
    """Smoothed loss against iteration; the experts' curves start where the shared model's ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    start = {"shared": 0, "high": len(losses["shared"]), "low": len(losses["shared"])}
    labels = {"shared": "shared model (all sigmas)", "high": "high-noise expert", "low": "low-noise expert"}
    for name, ls in losses.items():
        if not ls:
            continue
        y = torch.tensor(ls)
        w = min(window, len(y))
        smooth = y.unfold(0, w, 1).mean(1)
        ax.plot(start[name] + w - 1 + torch.arange(len(smooth)), smooth, label=labels[name])
    ax.set(xlabel="iteration", ylabel=f"flow-matching loss (mean of {window})", yscale="log",
           title="demo model training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_strip(path: Path, videos: list[Tensor], prompts: list[str], scale: int = 4) -> None:
    """One row per prompt, the frames left to right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(videos), 1, figsize=(9, 1.2 * len(videos)))
    for ax, v, p in zip(axes, videos, prompts):
        f, h, w, _ = v.shape
        gap = torch.full((h, 2, 3), 255, dtype=torch.uint8)
        row = torch.cat([torch.cat([fr, gap], dim=1) for fr in v], dim=1)   # (H, F*(W+2), 3)
        ax.imshow(row.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy(), interpolation="nearest")
        ax.set_title(p, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    cfg = WanConfig.preset("demo")
    experts, text, codec, losses, seconds = train(cfg, args)
    info = dict(command="python scripts/train_demo.py " + " ".join(argv or sys.argv[1:]),
                args=vars(args), preset=cfg.name, train_seconds=round(seconds, 1),
                final_loss={n: sum(ls[-100:]) / len(ls[-100:]) for n, ls in losses.items() if ls},
                torch=torch.__version__)
    save(Path(args.out), experts, text, info)
    print(f"trained in {seconds:.0f}s; weights in {args.out}")
    if args.docs:
        from paradit.pipeline import Pipeline
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        plot_loss(docs / "demo-loss.png", losses)
        pipe = Pipeline(cfg, experts, text, codec)
        videos = [pipe(p, seed=i, progress=False) for i, p in enumerate(SAMPLE_PROMPTS)]
        sample_strip(docs / "demo-samples.png", videos, SAMPLE_PROMPTS)
        print(f"wrote {docs / 'demo-loss.png'} and {docs / 'demo-samples.png'}")


if __name__ == "__main__":
    main()

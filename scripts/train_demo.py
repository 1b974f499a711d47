"""Train a demo model: `python scripts/train_demo.py` (the shipped 16x16 one, on the CPU), or
`python scripts/train_demo.py --preset demo64 --device cuda --minutes 8` (the 64x64x33 one, on a GPU).

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
low.safetensors, text_encoder.safetensors, train.json and losses.json into --out, and the loss
curve and the contact sheet (frames of several prompts) into --docs; train.json has the judge's
verdicts on the prompts training never showed (data.Recipe.held_out), or on 12 prompts for a recipe
without any. scripts/demo_report.py makes that report (judged, images) again from --out alone.

--minutes gives the training a time budget instead of --shared/--iters: after 30 warm-up steps it
times 20 more and sets both so that the whole training takes about that long, in the defaults'
ratio (3 shared iterations to 1 of the experts, each of which costs two steps). On CUDA the
matmuls run in TF32 and clips are rendered on the GPU; the run is then not bit-reproducible.

--ema DECAY keeps an exponential moving average of each expert's weights through the experts'
stage (fp32, on the device; it starts at the expert's weights when the stage begins, the given
ones with --init, and takes ema = DECAY * ema + (1 - DECAY) * weights after every optimizer step)
and saves and judges the averages instead of the raw weights (which go to OUT/raw, unjudged:
`python scripts/demo_report.py OUT/raw --docs ''` judges them).
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
from safetensors.torch import load_file, save_file, save_model
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # scripts/, repo root

from paradit.config import WanConfig  # noqa: E402
from paradit.demo.codec import TimeToDepthCodec  # noqa: E402
from paradit.demo.data import RECIPES, Recipe, all_prompts, make_batch  # noqa: E402
from paradit.models.text_encoder import TextEncoder  # noqa: E402
from paradit.models.transformer import WanTransformer  # noqa: E402

from demo_report import LOSSES, loss_points, sampler, write_report  # noqa: E402

Tensor = torch.Tensor
PROBE = (30, 50)   # --minutes: steps [30, 50) of the shared stage are timed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/train_demo.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(RECIPES), help="the model: paradit/config.py")
    p.add_argument("--out", help="folder for the weights (default: paradit/assets/PRESET)")
    p.add_argument("--docs", default="docs", help="folder for PRESET-loss.png and PRESET-samples.png ('' = none)")
    p.add_argument("--minutes", type=float, help="train for about this long: sets --shared and --iters")
    p.add_argument("--shared", type=int, default=1500, help="iterations of the one model both experts start from")
    p.add_argument("--iters", type=int, default=500, help="iterations after the split; each trains both experts once")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.1, help="share of prompts replaced by ''")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu (bit-reproducible) or cuda")
    p.add_argument("--init", help="a folder of high/low.safetensors: train these two experts on (no shared stage)")
    p.add_argument("--bf16", action="store_true", help="CUDA: forward and backward under bf16 autocast "
                   "(fp32 weights and AdamW); a small model's TF32 step is mostly fp32 attention")
    p.add_argument("--ema", type=float, metavar="DECAY", help="save an exponential moving average of each "
                   "expert's weights (updated every step of the experts' stage) instead of the raw weights; "
                   "0.999 averages over about the last 1000 steps")
    args = p.parse_args(argv)
    if args.ema is not None and not 0 < args.ema < 1:
        p.error(f"--ema {args.ema:g}: the decay must be in (0, 1), e.g. 0.999")
    args.out = args.out or f"paradit/assets/{args.preset}"
    if args.minutes is not None and args.minutes * 60 < 2 * PROBE[1]:
        p.error(f"--minutes {args.minutes:g}: give at least {2 * PROBE[1] / 60:g} (the step time is measured first)")
    if args.init:
        args.shared = 0
    if args.bf16 and not args.device.startswith("cuda"):
        p.error("--bf16 is for --device cuda (the CPU run is the bit-reproducible fp32 one)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    return args


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

    def __init__(self, text: TextEncoder, recipe: Recipe):
        prompts = all_prompts(recipe)
        emb = text.encode(prompts + [""])                             # (P + 1, text_len, text_dim)
        self.index = {p: i for i, p in enumerate(prompts)}
        self.emb, self.empty = emb[:-1], emb[-1]

    def __call__(self, prompts: list[str], drop: Tensor) -> Tensor:
        """(B, text_len, text_dim); rows where drop is True get the empty prompt's embedding."""
        emb = self.emb[[self.index[p] for p in prompts]]
        return torch.where(drop[:, None, None], self.empty, emb)


def train_step(model, opt, codec, table, recipe: Recipe, cfg: WanConfig, high: bool | None, args,
               gen: torch.Generator) -> float:
    """One AdamW step on fresh clips. On the CPU every draw comes from `gen` in a fixed order (the
    shipped weights' bits); elsewhere the clips are drawn from it but rendered and noised on the
    device (a CPU would be the bottleneck), the noise from the device's generator `args.noise_gen`."""
    dev = args.device
    videos, prompts = make_batch(args.batch, gen, recipe, dev)
    x0 = codec.encode(videos)                                          # (B, C, F, h, w)
    noise = torch.randn(x0.shape, generator=args.noise_gen or gen, device=dev)
    sigma = sample_sigmas(args.batch, cfg.shift, cfg.boundary, high, gen).to(dev)
    drop = torch.rand(args.batch, generator=gen) < args.dropout
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    with torch.autocast("cuda", torch.bfloat16, enabled=args.bf16):
        v = model(xt, 1000 * sigma, table(prompts, drop).to(dev))
    loss = (v.float() - (noise - x0)).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def plan_budget(args, step_s: float, spent_s: float, log=print) -> None:
    """Set args.shared and args.iters so that training ends about args.minutes after it began:
    steps left = (budget - spent) / step_s, split 3 : 2 between shared iterations and the experts'
    (one expert iteration is two steps); with --init (no shared stage) all go to the experts."""
    steps = max(0, (60 * args.minutes - spent_s) / step_s) + PROBE[1]
    if args.init:
        args.iters = max(PROBE[1], round(steps / 2))
    else:
        args.shared, args.iters = max(PROBE[1], round(0.6 * steps)), max(1, round(0.2 * steps))
    log(f"--minutes {args.minutes:g}: a step takes {step_s:.3f} s, so --shared {args.shared} --iters {args.iters}")


def train(cfg: WanConfig, args, log=print, recipe: Recipe | None = None):
    """Stage 1: one model on all sigmas (`--shared` iterations). Stage 2: two copies of it, the
    high-noise and the low-noise expert, each on its side of the boundary (`--iters` iterations
    each), as Wan2.2's experts grow from one model. One learning-rate schedule spans both stages.
    Returns (experts to save, text encoder, codec, losses, seconds, raw): with --ema the experts are
    the averages and raw the trained weights themselves; raw is None without it."""
    recipe = recipe or RECIPES[cfg.name]
    torch.manual_seed(args.seed)
    text = TextEncoder.tiny(cfg.text_dim, cfg.text_len, seed=args.seed)
    table, codec = PromptTable(text, recipe), TimeToDepthCodec.for_config(cfg)
    cpu = torch.device(args.device).type == "cpu"
    args.noise_gen = None if cpu else torch.Generator(args.device).manual_seed(args.seed + 5)
    torch.manual_seed(args.seed + 1)
    base = None if args.init else WanTransformer(cfg).to(args.device)   # --init: the experts are read instead
    total = args.shared + args.iters
    new_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)  # noqa: E731
    losses = {"shared": [], "high": [], "low": []}
    t0 = time.perf_counter()

    def report(it: int, names) -> None:
        if it % 100 == 0 or it in (args.shared - 1, total - 1):
            parts = "  ".join(f"{n} {sum(losses[n][-100:]) / len(losses[n][-100:]):.4f}" for n in names)
            log(f"iter {it:5d}  loss {parts}  {time.perf_counter() - t0:.0f}s")

    opt, gen = (new_opt(base) if base is not None else None), torch.Generator().manual_seed(args.seed + 2)
    probe = dict(t=None)

    def budget(it: int, steps_per_it: int) -> None:
        """--minutes: time iterations [PROBE[0], PROBE[1]) of the first stage, then set the budget."""
        if args.minutes is None:
            return
        if it == PROBE[0]:
            probe["t"] = time.perf_counter()
        elif it == PROBE[1]:
            step_s = (time.perf_counter() - probe["t"]) / ((PROBE[1] - PROBE[0]) * steps_per_it)
            plan_budget(args, step_s, time.perf_counter() - t0, log)

    it = 0
    while it < args.shared:
        budget(it, 1)
        set_lr(opt, lr_at(it, total, args.lr, args.warmup))
        losses["shared"].append(train_step(base, opt, codec, table, recipe, cfg, None, args, gen))
        report(it, ["shared"])
        it += 1
        total = args.shared + args.iters
    if args.init:                                                       # train given experts on
        experts = [load_expert(cfg, Path(args.init) / f"{name}.safetensors", args.device) for name in ("high", "low")]
    else:
        experts = [copy.deepcopy(base) for _ in range(2)]             # 0: high-noise, 1: low-noise
    opts = [new_opt(m) for m in experts]
    if args.shared:
        for o in opts:
            o.load_state_dict(opt.state_dict())                          # carry AdamW's moments on
    gens = [torch.Generator().manual_seed(args.seed + 3 + k) for k in range(2)]
    emas = [ema_of(m, args.ema) for m in experts] if args.ema else None
    it = args.shared
    while it < args.shared + args.iters:                                # --minutes may reset args.iters
        if not args.shared:
            budget(it, 2)
        total = args.shared + args.iters
        for k, name in enumerate(("high", "low")):
            set_lr(opts[k], lr_at(it, total, args.lr, args.warmup))
            losses[name].append(train_step(experts[k], opts[k], codec, table, recipe, cfg, k == 0, args, gens[k]))
            if emas:
                emas[k].update_parameters(experts[k])
        report(it, ["high", "low"])
        it += 1
    raw = None
    if emas:                                                            # the averages are what is saved
        raw, experts = experts, [e.module for e in emas]
    for m in experts + (raw or []):
        m.eval().requires_grad_(False)
    return experts, text, codec, losses, time.perf_counter() - t0, raw


def ema_of(model: WanTransformer, decay: float) -> AveragedModel:
    """An fp32 exponential moving average of `model`'s weights on its device, starting at them."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema.update_parameters(model)                                        # the first update copies the weights
    return ema


def load_expert(cfg: WanConfig, path: Path, device: str) -> WanTransformer:
    model = WanTransformer(cfg)
    model.load_state_dict(load_file(path))
    return model.to(device)


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def save(out: Path, experts, text: TextEncoder, info: dict, losses: dict[str, list[float]]) -> None:
    """The weights, train.json, and the losses (LOSSES: means of 10 iterations) that
    scripts/demo_report.py plots, so that the report can be made again from the folder alone."""
    out.mkdir(parents=True, exist_ok=True)
    for name, m in zip(("high", "low"), experts):
        save_file({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}, out / f"{name}.safetensors")
    save_model(text.model, str(out / "text_encoder.safetensors"))     # handles umT5's tied embeddings
    (out / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / LOSSES).write_text(json.dumps(dict(every=10, points=loss_points(losses, 10))) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device(args.device).type == "cpu"
    torch.use_deterministic_algorithms(cpu)            # CUDA's cuBLAS would need CUBLAS_WORKSPACE_CONFIG
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not cpu
    cfg = WanConfig.preset(args.preset)
    experts, text, codec, losses, seconds, raw = train(cfg, args)
    info = dict(command="python scripts/train_demo.py " + " ".join(argv or sys.argv[1:]),
                args={k: v for k, v in vars(args).items() if k != "noise_gen"}, preset=cfg.name,
                train_seconds=round(seconds, 1), device=torch.cuda.get_device_name() if not cpu else "cpu",
                final_loss={n: sum(ls[-100:]) / len(ls[-100:]) for n, ls in losses.items() if ls},
                torch=torch.__version__)
    save(Path(args.out), experts, text, info, losses)
    if args.ema:                         # the raw weights too, to judge against the averages if need be
        save(Path(args.out) / "raw", raw, text, dict(info, ema="none: the raw weights of this run"), losses)
    print(f"trained in {seconds:.0f}s; weights in {args.out}" + (f" (the raw ones in {args.out}/raw)" * bool(args.ema)))
    pipe = sampler(cfg, experts, text, codec, args.device)
    write_report(pipe, Path(args.out), info, Path(args.docs) if args.docs else None,
                 (loss_points(losses, 10), f"{args.out}/{LOSSES}: means of 10 iterations"))


if __name__ == "__main__":
    main()

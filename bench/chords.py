"""CHORDS: rounds, NFEs, ideal and measured speedup, and each hit's distance from the sequential solve.

    python bench/chords.py                        # demo model if its weights ship, else tiny
    python bench/chords.py --model tiny --steps 24 --cores 2,4,8
    python bench/chords.py --model demo64 --cores 2,4 --repeats 1   # 64x64x33, "... moving right slowly"
    python bench/chords.py --model wan2.2-t2v-a14b --layers 2 --size 832x480 --frames 33   # GPU, full width

Any other preset runs its full-width architecture with random bf16 weights (two experts of --layers
blocks each, seeds 0 and 1; random text embeddings; no VAE, so PSNR is null and only the latent
RMSE is reported), on CUDA when there is a GPU: the distances then show how CHORDS' hits agree
with the sequential solve on that architecture's velocity field in bf16, not image quality.

For K cores and each of a few initialisation sequences, the pure algorithm
(paradit.schedulers.chords.Chords) runs with a velocity function built from the pipeline's
runtime: grid index i is evaluated at the integer timestep t_i = int(1000 sigma_i), with the expert
and guidance the pipeline picks for t_i (Pipeline.expert_for), exactly as a sampler step would.
CHORDS takes Euler steps on wan_sigmas(steps, shift); the reference is the sequential Euler solve
on the same grid, which is also CHORDS' last hit (checked and reported).

How each number is measured (one process, one thread; CHORDS is emulated, not run on K devices):
  rounds, NFEs   from the hits the controller yields (hit.round, hit.nfe).
  ideal speedup  N / rounds: every round costs one NFE on K parallel devices.
  measured       T_seq / T_chords(hit), the median over --repeats pairs of runs made back to back
  speedup        (the machine is shared: neighbouring timings drift together). T_seq: wall time of
                 the sequential Euler solve (N NFEs and their updates). T_chords(hit): for every
                 round up to the hit, the wall time of the slowest of that round's NFEs (each NFE
                 is timed on its own), plus the controller's own wall time so far (its updates,
                 rectifications and bookkeeping run on every rank).
                 The exchange of velocities between cores is not included (free communication).
  distance       latent RMSE between the hit's latent and the sequential one (fp32, all elements);
                 PSNR of the decoded uint8 frames against the sequentially decoded ones, in dB
                 (null when the frames are identical).
  judge          a trained demo model's (demo, demo64): paradit.demo.judge's verdict on each hit's
                 video and on the sequential one (colour, shape, direction, and speed where the
                 prompt names one); the prompt is "a red circle moving right" in the model's vocabulary.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from launcher import (environment, judged_prompt, judged_recipe, machine_description, machine_tag,  # noqa: E402
                      results_path, write_json)

from paradit.demo.judge import judge, psnr  # noqa: E402
from paradit.models.transformer import patchify, token_grid, unpatchify  # noqa: E402
from paradit.plan.placement import chords_init  # noqa: E402
from paradit.schedulers import wan_sigmas, wan_timesteps  # noqa: E402
from paradit.schedulers.chords import Chords, init_sequence  # noqa: E402

PROMPT, NEGATIVE = "a red circle moving right", ""


# ----------------------------------------------------------------------------- the model
TINY_VIDEO = ((128, 128), 17)   # tiny's own 64x64x9 is 48 tokens: NFEs too short to time against the controller


def random_pipeline(name: str, layers: int, device: torch.device):
    """A preset's architecture cut to `layers` blocks, random weights (bf16 on CUDA), no text encoder
    or VAE: (pipeline, short note, full note)."""
    from paradit.config import WanConfig
    from paradit.parallel.mesh import single_device_mesh
    from paradit.pipeline import Pipeline
    from scaling_measure import build_model
    cfg = WanConfig.preset(name).replace(num_layers=layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    experts = [build_model(cfg, device, dtype, seed=k) for k in range(cfg.num_experts)]
    pipe = Pipeline(cfg, experts, None, None, mesh=single_device_mesh(device))
    short = f"{name} ({layers} blocks per expert), random {str(dtype).split('.')[-1]} weights"
    return pipe, short, short + ": distances show solver agreement on this architecture, not image quality"


def load_pipeline(name: str):
    """(pipeline, short note, full note): the demo model when asked and available, else tiny."""
    from paradit.pipeline import Pipeline
    if name == "demo":
        try:
            return Pipeline.from_pretrained("demo", device="cpu"), "demo (trained weights)", "demo model"
        except Exception as err:  # weights not shipped yet, or the demo package is mid-change
            full = (f"demo model unavailable ({type(err).__name__}: {str(err).split(';')[0]}); fell back to "
                    f"tiny with random weights at {TINY_VIDEO[0][0]}x{TINY_VIDEO[0][1]}x{TINY_VIDEO[1]}: "
                    f"distances show solver agreement, not image quality")
            return Pipeline.from_pretrained("tiny", device="cpu"), "tiny, random weights (demo unavailable)", full
    short = f"{name}" + (", random weights" if name == "tiny" else " (trained weights)")
    return Pipeline.from_pretrained(name, device="cpu"), short, short


@dataclasses.dataclass
class Problem:
    """Everything the velocity function needs: token-space noise, prompts, schedule."""
    pipe: object
    x0: torch.Tensor                   # (L, P*C) patchified noise
    grid: tuple[int, int, int]
    cond: torch.Tensor
    uncond: torch.Tensor | None
    sigmas: torch.Tensor               # float64 [N + 1]
    timesteps: list[int]               # [N]
    guidance: tuple[float, float]
    prompt: str | None                 # the prompt of a judged model's videos; None for random weights

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def make_problem(pipe, steps: int, seed: int, size: tuple[int, int] | None, frames: int | None,
                 prompt: str | None = None) -> Problem:
    from paradit.pipeline import VideoSettings
    cfg = pipe.cfg
    w, h = size or (None, None)
    s = VideoSettings.resolve(cfg, w, h, frames, steps, seed=seed, sampler="euler")
    if pipe.text_encoder is None:                                    # random weights: random text too
        g = torch.Generator().manual_seed(seed)
        text = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g).to(pipe.mesh.device)
        cond, uncond = text[:1], text[1:]
    else:
        cond, uncond = pipe.encode_prompts(prompt or PROMPT, NEGATIVE, s.guidance)
    noise = pipe.denoiser.initial_noise(s).to(pipe.mesh.device)               # (C, F, H, W)
    grid = token_grid(noise.shape, cfg.patch)
    x0 = patchify(noise[None], cfg.patch)[0]                         # (L, P*C)
    return Problem(pipe, x0, grid, cond, uncond, wan_sigmas(steps, s.shift),
                   wan_timesteps(steps, s.shift).tolist(), s.guidance, prompt)


def nfe(prob: Problem, index: int, x: torch.Tensor) -> torch.Tensor:
    """The guided velocity at grid index `index`, as the pipeline computes a step's (finished on
    return: on CUDA the host waits, so that wall clocks around it time the work)."""
    t = prob.timesteps[index]
    k = prob.pipe.expert_for(t)
    g = prob.guidance[k]
    v = prob.pipe.runtime.velocity(prob.pipe.experts[k], x, torch.tensor(float(t), device=x.device), prob.cond,
                                   prob.uncond if g != 1.0 else None, g, prob.grid)
    if v.is_cuda:
        torch.cuda.synchronize(v.device)
    return v


def to_latent(prob: Problem, tokens: torch.Tensor) -> torch.Tensor:
    return unpatchify(tokens[None].float(), prob.grid, prob.pipe.cfg.patch)[0]   # (C, F, H, W)


# ----------------------------------------------------------------------------- runs
def sequential(prob: Problem) -> tuple[torch.Tensor, float]:
    """The Euler solve and its wall time."""
    s = prob.sigmas.tolist()
    x = prob.x0.clone()
    t0 = time.perf_counter()
    for i in range(prob.steps):
        x = x + (s[i + 1] - s[i]) * nfe(prob, i, x)
    return x, time.perf_counter() - t0


def chords_run(prob: Problem, init: list[int]) -> list[dict]:
    """One CHORDS run with every NFE timed; per hit: round, NFEs, emulated parallel time, latent."""
    clock = {"rounds_s": 0.0, "nfe_s": 0.0}

    def velocity(points):
        slowest = 0.0
        out = []
        for index, x in points:
            t0 = time.perf_counter()
            out.append(nfe(prob, index, x))
            dt = time.perf_counter() - t0
            slowest, clock["nfe_s"] = max(slowest, dt), clock["nfe_s"] + dt
        clock["rounds_s"] += slowest
        return out

    hits = []
    start = time.perf_counter()
    for hit in Chords(prob.sigmas, init).run(velocity, prob.x0):
        controller = time.perf_counter() - start - clock["nfe_s"]   # everything but the NFEs
        hits.append(dict(core=hit.core, round=hit.round, nfe=hit.nfe, preview=hit.preview,
                         emulated_s=clock["rounds_s"] + controller, x=hit.x.clone()))
    return hits


def init_sequences(cores: int, steps: int) -> dict[str, list[int]]:
    """The default rule, the paper's sequence rescaled to N (K = 4, 6, 8), and evenly spaced starts."""
    seqs = {"default": init_sequence(cores, steps)}
    paper = chords_init(cores, steps)
    if paper is not None:
        seqs["paper"] = list(paper)
    seqs["uniform"] = [round(c * steps / cores) for c in range(cores)]
    late = seqs["default"][:-1] + [min(steps - 1, max(seqs["default"][-1] + 1, round(0.75 * steps)))]
    seqs["late"] = late   # the fastest core starts later: fewer rounds, a rougher first hit
    out: dict[str, list[int]] = {}
    for name, seq in seqs.items():  # a repeated sequence keeps its first name
        if seq not in out.values():
            out[name] = seq
    return dict(list(out.items())[:3])


def verdict(prob: Problem, frames: torch.Tensor | None) -> dict | None:
    """The judge's verdict (paradit/demo/judge.py) on a judged model's decoded video; None otherwise."""
    return None if frames is None or prob.prompt is None else judge(frames, prob.prompt)._asdict()


def decode(prob: Problem, tokens: torch.Tensor) -> torch.Tensor | None:
    vae = prob.pipe.vae
    return None if vae is None else vae.decode(to_latent(prob, tokens).cpu())


def measure(prob: Problem, cores: list[int], repeats: int) -> tuple[dict, list[dict]]:
    """The sequential reference and every (K, init) run. Each repeat times a sequential solve next to
    the CHORDS run, so that a speedup is a ratio of neighbouring timings (the machine is shared)."""
    x_seq, _ = sequential(prob)
    seq_latent, seq_frames = to_latent(prob, x_seq), decode(prob, x_seq)
    seq_times, rows = [], []
    for k in [k for k in cores if k <= prob.steps]:
        for name, init in init_sequences(k, prob.steps).items():
            pairs = [(sequential(prob)[1], chords_run(prob, init)) for _ in range(repeats)]
            seq_times += [t for t, _ in pairs]
            for j, hit in enumerate(pairs[0][1]):
                frames = decode(prob, hit["x"])
                rows.append(dict(cores=k, init_name=name, init=init, core=hit["core"], round=hit["round"],
                                 nfe=hit["nfe"], preview=hit["preview"], ideal_speedup=prob.steps / hit["round"],
                                 emulated_s=statistics.median(run[j]["emulated_s"] for _, run in pairs),
                                 measured_speedup=statistics.median(t / run[j]["emulated_s"] for t, run in pairs),
                                 latent_rmse=(to_latent(prob, hit["x"]) - seq_latent).pow(2).mean().sqrt().item(),
                                 decoded=frames is not None,
                                 psnr_db=None if frames is None else psnr(frames, seq_frames),
                                 judge=verdict(prob, frames)))
    reference = dict(steps=prob.steps, nfe=prob.steps, seconds=statistics.median(seq_times),
                     min_s=min(seq_times), max_s=max(seq_times), runs=len(seq_times), judge=verdict(prob, seq_frames))
    return reference, rows


# ----------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = ("K", "init", "hit", "round", "NFEs", "ideal x", "measured x", "latent RMSE", "PSNR dB", "judge")
    out = [head]
    for r in rows:
        out.append((str(r["cores"]), f"{r['init_name']} {r['init']}",
                    "preview" if r["preview"] else f"core {r['core']}", str(r["round"]), str(r["nfe"]),
                    f"{r['ideal_speedup']:.2f}", f"{r['measured_speedup']:.2f}", f"{r['latent_rmse']:.3g}",
                    "- (no VAE)" if not r.get("decoded", True) else
                    "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}",
                    "-" if not r.get("judge") else "ok" if all(v is not False for v in r["judge"].values()) else
                    "wrong: " + ",".join(k for k, v in r["judge"].items() if v is False)))
    widths = [max(len(x[i]) for x in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in out)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rmse, ax_psnr) = plt.subplots(1, 2, figsize=(13, 5.5))
    floor = 1e-9                                        # where an exact hit (RMSE 0) is drawn
    top = max([r["psnr_db"] for r in rows if r["psnr_db"] is not None] or [40.0]) + 5
    markers = {"default": "o", "paper": "s", "uniform": "^", "late": "v"}
    ks = sorted({r["cores"] for r in rows})
    for k, name in sorted({(r["cores"], r["init_name"]) for r in rows}):
        pts = [r for r in rows if (r["cores"], r["init_name"]) == (k, name)]
        color, m = f"C{ks.index(k)}", markers.get(name, "o")
        real, preview = [r for r in pts if not r["preview"]], [r for r in pts if r["preview"]]
        rmse = lambda r: max(r["latent_rmse"], floor)  # noqa: E731
        db = lambda r: top if r["psnr_db"] is None else r["psnr_db"]  # noqa: E731
        label = f"K={k} {name} {pts[0]['init']}"
        ax_rmse.plot([r["ideal_speedup"] for r in real], [rmse(r) for r in real], m + "-", color=color, label=label)
        ax_psnr.plot([r["measured_speedup"] for r in real], [db(r) for r in real], m + "-", color=color, label=label)
        ax_rmse.plot([r["ideal_speedup"] for r in preview], [rmse(r) for r in preview], m, mfc="none", color=color)
        ax_psnr.plot([r["measured_speedup"] for r in preview], [db(r) for r in preview], m, mfc="none", color=color)
    ax_rmse.set(title="Latent RMSE from the sequential Euler solve", xlabel="ideal speedup N / rounds",
                ylabel=f"RMSE (exact hits drawn at {floor:g})", yscale="log", xscale="log")
    ax_psnr.set(title=f"PSNR of decoded frames (identical frames drawn at {top:.0f} dB)",
                xlabel="measured speedup (K devices emulated in one process)", ylabel="PSNR, dB", xscale="log")
    decoded = any(r.get("decoded", True) for r in rows)
    if not decoded:
        ax_psnr.clear()
        ax_psnr.set_axis_off()
        ax_psnr.text(0.5, 0.5, "no VAE with these random weights:\nno frames decoded, latent RMSE only",
                     ha="center", va="center", transform=ax_psnr.transAxes)
    for ax in (ax_rmse, ax_psnr) if decoded else (ax_rmse,):
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    handles, labels = ax_rmse.get_legend_handles_labels()
    handles.append(plt.Line2D([], [], marker="o", mfc="none", color="0.3", ls=""))
    labels.append("hollow: the coarse preview (hit 0)")
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="demo (falls back to tiny if unavailable), demo64, tiny, or any "
                                                    "preset (its architecture with random weights, see above)")
    ap.add_argument("--layers", type=int, default=2, help="blocks per expert of a random-weight preset")
    ap.add_argument("--steps", type=int, default=24, help="grid steps N (Euler)")
    ap.add_argument("--cores", default="2,4,8", help="K values")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default: the preset's)")
    ap.add_argument("--frames", type=int, help="frames (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration; times are medians")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results folder (default: bench/results)")
    args = ap.parse_args(argv)
    logging.getLogger("paradit").setLevel(logging.WARNING)
    shipped = judged_recipe(args.model) is not None or args.model == "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() and not shipped else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    if shipped:
        pipe, short, note = load_pipeline(args.model)
    else:
        pipe, short, note = random_pipeline(args.model, args.layers, device)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    if pipe.cfg.name == "tiny":
        size, args.frames = size or TINY_VIDEO[0], args.frames or TINY_VIDEO[1]
    prompt = judged_prompt(pipe.cfg.name, PROMPT) if judged_recipe(pipe.cfg.name) else None   # tiny: not judged
    prob = make_problem(pipe, args.steps, args.seed, size, args.frames, prompt)
    t0 = time.time()
    with torch.no_grad():
        reference, rows = measure(prob, [int(k) for k in args.cores.split(",")], args.repeats)
    last = [r for r in rows if not r["preview"] and r["core"] == 0]
    exact = max(r["latent_rmse"] for r in last) if last else None
    cfg = pipe.cfg
    settings = (f"{short}; {prompt or PROMPT!r}, {prob.x0.shape[0]} tokens, Euler N={prob.steps}, shift "
                f"{cfg.shift:g}, guidance {prob.guidance}, seed {args.seed}, median of {args.repeats}")
    print(settings)
    print("note:", note)
    print(f"sequential Euler: {reference['seconds'] * 1e3:.1f} ms ({prob.steps} NFEs); last hits vs it: "
          f"max latent RMSE {exact:.3g}")
    print(table(rows))
    tag = machine_tag(device.type)
    result = dict(what="chords", date=time.strftime("%Y-%m-%d"), machine=tag, machine_description=
                  machine_description(device.type), environment=environment(), model=cfg.name, note=note,
                  settings=dict(steps=prob.steps, tokens=prob.x0.shape[0], shift=cfg.shift, guidance=prob.guidance,
                                seed=args.seed, repeats=args.repeats, device=device.type,
                                threads=1 if device.type == "cpu" else None),
                  sequential=reference, last_hit_max_rmse_vs_sequential=exact, method=__doc__, hits=rows,
                  wall_s=time.time() - t0)
    what = "chords" if cfg.name == "demo" or not prompt else f"chords_{cfg.name}"   # demo64's beside demo's
    json_path = write_json(results_path(what, "json", args.out, tag), result)
    png_path = results_path(what, "png", args.out, tag)
    where = "one process, 1 thread" if device.type == "cpu" else "one process, one GPU"
    plot(rows, f"CHORDS on {machine_description(device.type)} [{tag}], {where}\n{settings}", png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

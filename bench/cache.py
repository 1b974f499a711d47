"""The step cache (--cache easy:T): evaluations saved, wall time, and distance from the uncached video.

    python bench/cache.py                                    # the demo model: 12 prompts, 40 steps, a sweep
    python bench/cache.py --steps 24 --thresholds 0.1,0.2    # the demo's own step count
    python bench/cache.py --model demo64 --steps 24 --thresholds 0.05,0.1,0.2 --prompts 4   # 64x64x33
    python bench/cache.py --model /dev/shm/a14b --size 1280x720 --frames 81 --steps 4 --warmup 1 \\
        --thresholds 10 --prompts 1 --extrapolate-to 40 \\
        --savings-from bench/results/2026-12-06_cpu2_cache_40steps.json    # a GPU at full size: speed only

Quality (a trained demo model, demo or demo64: paradit/demo; prompts from its own vocabulary, 2 per
colour): every prompt is generated without the cache and with it at each threshold, same seed, on
one device. For each pair:
  saved          the evaluations the cache skipped, of all the run's steps (record.cache).
  denoise s      the denoising wall time of each run (record.timings), after one untimed step;
                 `speedup` = uncached / cached, the median over prompts (each cached run against
                 the uncached run of its prompt; the machine may be shared).
  latent error   ||cached - uncached|| / ||uncached|| of the final latent (fp32).
  PSNR, SSIM     of the decoded uint8 frames against the uncached ones: PSNR over every pixel;
                 SSIM per frame and channel with an 11x11 Gaussian window (sigma 1.5), averaged.
  judge          paradit.demo.judge's verdict (colour, shape, direction, speed) on the uncached and on
                 the cached video; the summary counts the videos judged right and the unchanged verdicts.
The demo model's default is 24 steps; the sweep runs 40 (T2V-A14B's), where a cache has more to save.

Speed (--model FOLDER or a preset other than demo/demo64/tiny: random weights, e.g. bench/e2e.py's folder):
the same runs, on CUDA when present; the distances mean nothing there and are not reported, and
which steps a random-weight model skips says nothing of a trained one. What carries over is the
cost of a step computed and of a step served from the cache (`step_s`, device-synchronised), from
which --extrapolate-to N predicts an N-step run at the demo model's saved fraction at the same
threshold (read from --savings-from, the demo sweep's JSON; the run's own when not given):
    T_uncached(N) = N t_computed,    T_cached(N) = N ((1 - f) t_computed' + f t_skipped)
where t_computed' is a computed step's time with the cache on (its bookkeeping included).

Writes bench/results/<date>_<machine>_cache_<N>steps.json and .png (demo's quality sweep;
cache_demo64_<N>steps for demo64's) or
<date>_<machine>_cache_<model>.json (speed); --out to choose the folder.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from launcher import (environment, judged_recipe, machine_description, machine_tag,  # noqa: E402
                      results_path, write_json)

from paradit.demo.data import judged_prompts  # noqa: E402
from paradit.demo.judge import judge, psnr, rel_err, ssim  # noqa: E402

THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


# ----------------------------------------------------------------------------- runs
def generate(pipe, prompt: str, seed: int, opts, cache: str | None):
    """(latent, record) of one request; the latent on this process (one device)."""
    kw = dict(steps=opts.steps, seed=seed, output="latent", progress=False, cache=cache)
    if opts.size:
        kw["width"], kw["height"] = opts.size
    if opts.frames:
        kw["frames"] = opts.frames
    latent = pipe(prompt, **kw)
    return latent, pipe.record


def step_times(record) -> dict:
    """Median seconds of a computed step and of a skipped one (None without any)."""
    skipped = {e["step"] for e in record.cache.skipped} if record.cache else set()
    comp = [s for i, s in enumerate(record.step_s) if i not in skipped]
    skip = [s for i, s in enumerate(record.step_s) if i in skipped]
    return {"computed_s": statistics.median(comp) if comp else None,
            "skipped_s": statistics.median(skip) if skip else None}


def sweep(pipe, prompts: list[str], opts, quality: bool) -> list[dict]:
    """One row per (threshold, prompt): the cached run against the uncached one just before it."""
    rows = []
    for i, prompt in enumerate(prompts):
        ref, rec = generate(pipe, prompt, i, opts, None)
        ref_s, ref_steps = rec.timings["denoise_s"], step_times(rec)
        ref_frames = pipe.vae.decode(ref) if quality else None
        for th in opts.thresholds:
            latent, rec = generate(pipe, prompt, i, opts, f"easy:{th:g}:{opts.warmup}")
            c = rec.cache.as_dict()
            row = dict(threshold=th, prompt=prompt, seed=i, steps=opts.steps, evaluations=c["evaluations"],
                       saved=c["saved"], saved_fraction=c["saved_fraction"], skipped=[e["step"] for e in c["skipped"]],
                       uncached_s=ref_s, cached_s=rec.timings["denoise_s"], speedup=ref_s / rec.timings["denoise_s"],
                       uncached_step=ref_steps, cached_step=step_times(rec))
            if quality:
                row |= distances(prompt, latent, ref, pipe.vae.decode(latent), ref_frames)
            rows.append(row)
            print(f"  {prompt!r:34} easy:{th:<5g} saved {c['saved']:2d}/{c['evaluations']} "
                  + (f"PSNR {row['psnr_db'] or math.inf:5.1f} dB SSIM {row['ssim']:.4f} " if quality else "")
                  + f"{ref_s:.2f} s -> {row['cached_s']:.2f} s", flush=True)
    return rows


def distances(prompt: str, latent, ref, frames, ref_frames) -> dict:
    """The cached run against the uncached one, and the judge's verdict (paradit/demo/judge.py) on each."""
    verdicts = [judge(f, prompt) for f in (ref_frames, frames)]
    return dict(latent_rel_err=rel_err(latent, ref), psnr_db=psnr(frames, ref_frames), ssim=ssim(frames, ref_frames),
                judge_uncached=verdicts[0]._asdict(), judge_cached=verdicts[1]._asdict(),
                judge_ok=[v.ok for v in verdicts])


def summary(rows: list[dict], quality: bool) -> list[dict]:
    """Per threshold: mean saved fraction, median speedup, and the distances' mean and worst."""
    out = []
    for th in sorted({r["threshold"] for r in rows}):
        rs = [r for r in rows if r["threshold"] == th]
        s = dict(threshold=th, prompts=len(rs), saved_fraction=statistics.mean(r["saved_fraction"] for r in rs),
                 min_saved_fraction=min(r["saved_fraction"] for r in rs),
                 speedup=statistics.median(r["speedup"] for r in rs))
        if quality:
            db = [math.inf if r["psnr_db"] is None else r["psnr_db"] for r in rs]
            s |= dict(mean_psnr_db=statistics.mean(db), min_psnr_db=min(db),
                      mean_ssim=statistics.mean(r["ssim"] for r in rs), min_ssim=min(r["ssim"] for r in rs),
                      mean_latent_rel_err=statistics.mean(r["latent_rel_err"] for r in rs),
                      judged_ok_uncached=sum(r["judge_ok"][0] for r in rs), judged_ok_cached=sum(r["judge_ok"][1] for r in rs),
                      verdict_unchanged=sum(r["judge_cached"] == r["judge_uncached"] for r in rs))
        out.append(s)
    return out


def extrapolate(rows: list[dict], n: int, savings: dict[float, float]) -> list[dict]:
    """Per threshold (every one run here and every one in `savings`), an n-step run's time from the
    measured step times (see the docstring). What a computed and a skipped step cost does not depend
    on the threshold: medians over every run, so one run at a threshold that skips every step it may
    (e.g. 10) measures both costs for all of the demo sweep's thresholds."""
    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None
    t_c = median(r["uncached_step"]["computed_s"] for r in rows)
    t_cc = median(r["cached_step"]["computed_s"] for r in rows)
    t_s = median(r["cached_step"]["skipped_s"] for r in rows)
    out = []
    for th in sorted({r["threshold"] for r in rows} | set(savings)):   # a demo threshold need not be run here
        rs = [r for r in rows if r["threshold"] == th]
        f = savings[th] if th in savings else statistics.mean(r["saved_fraction"] for r in rs)
        row = dict(threshold=th, steps=n, saved_fraction=f, saved_fraction_from="demo sweep" if th in savings
                   else "this run", computed_step_s=t_c, computed_step_cached_s=t_cc, skipped_step_s=t_s,
                   uncached_s=n * t_c)
        if t_s is not None:
            row |= dict(cached_s=n * ((1 - f) * t_cc + f * t_s), speedup=t_c / ((1 - f) * t_cc + f * t_s))
        out.append(row)
    return out


# ----------------------------------------------------------------------------- report
def plot(summ: list[dict], rows: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_db, ax_t) = plt.subplots(1, 2, figsize=(12, 5))
    saved = [100 * s["saved_fraction"] for s in summ]
    ax_db.scatter([100 * r["saved_fraction"] for r in rows], [r["psnr_db"] or 99 for r in rows], s=8, color="0.7",
                  label="one prompt")
    ax_db.plot(saved, [s["mean_psnr_db"] for s in summ], "o-", label="mean over prompts")
    ax_db.plot(saved, [s["min_psnr_db"] for s in summ], "v--", label="worst prompt")
    for s, x in zip(summ, saved):
        ax_db.annotate(f"{s['threshold']:g}", (x, s["mean_psnr_db"]), textcoords="offset points", xytext=(4, 4),
                       fontsize=8)
    ax_db.axhline(30, color="k", lw=0.8, ls=":")
    ax_db.axvline(40, color="k", lw=0.8, ls=":")
    ax_db.set(title="PSNR of the decoded video against the uncached one\n(labels: threshold T of easy:T)",
              xlabel="transformer evaluations saved, %", ylabel="PSNR, dB")
    ax_t.plot(saved, [s["speedup"] for s in summ], "o-", label="measured (median over prompts)")
    ax_t.plot(saved, [1 / (1 - s["saved_fraction"]) for s in summ], "--", color="0.5",
              label="ideal: 1 / (1 - saved)")
    ax_t.set(title="denoising wall time, uncached / cached", xlabel="transformer evaluations saved, %",
             ylabel="speedup")
    for ax in (ax_db, ax_t):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summ: list[dict], quality: bool) -> str:
    head = ["threshold", "saved", "min saved", "speedup"] + (["PSNR mean", "PSNR min", "SSIM mean", "latent err",
                                                               "judge ok: cached/uncached"] if quality else [])
    out = [head]
    for s in summ:
        line = [f"{s['threshold']:g}", f"{100 * s['saved_fraction']:.1f}%", f"{100 * s['min_saved_fraction']:.1f}%",
                f"{s['speedup']:.2f}x"]
        if quality:
            line += [f"{s['mean_psnr_db']:.1f}", f"{s['min_psnr_db']:.1f}", f"{s['mean_ssim']:.4f}",
                     f"{s['mean_latent_rel_err']:.3g}",
                     f"{s['judged_ok_cached']}/{s['judged_ok_uncached']} of {s['prompts']}"]
        out.append(line)
    widths = [max(len(x[i]) for x in out) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in out)


def load(model: str, opts):
    """(pipeline, whether its videos can be judged, note). Random-weight runs go to CUDA when present."""
    from paradit.pipeline import Pipeline
    judged = judged_recipe(model) is not None
    if judged or model == "tiny":
        note = f"{model} model (trained weights)" if judged else "tiny preset, random weights"
        return Pipeline.from_pretrained(model, device="cpu"), judged, note
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline.from_pretrained(model, device=device, dtype=torch.bfloat16 if device == "cuda" else None,
                                    offload=opts.offload, compile=opts.compile)
    if opts.compile:
        pipe.warmup(width=opts.size[0] if opts.size else None, height=opts.size[1] if opts.size else None,
                    frames=opts.frames, steps=opts.steps)
    return pipe, False, f"{pipe.cfg.name} from {model} (random weights: speed only)"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="demo, demo64 (trained: judged), tiny, or a checkpoint folder "
                                                   "(random weights: speed only)")
    ap.add_argument("--steps", type=int, default=40, help="denoising steps (the demo model's default is 24)")
    ap.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="comma-separated T of easy:T")
    ap.add_argument("--warmup", type=int, default=2, help="steps always computed at the start (easy:T:WARMUP)")
    ap.add_argument("--prompts", type=int, default=12, help="prompts (the judged model's vocabulary, else demo's; 2 per colour)")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    ap.add_argument("--frames", type=int, help="frames (default: the model's)")
    ap.add_argument("--offload", default="auto", help="a checkpoint's --offload mode (auto: what fits)")
    ap.add_argument("--compile", action="store_true", help="compile the blocks, warmed up before the timed runs")
    ap.add_argument("--extrapolate-to", type=int, help="predict an N-step run from the measured step times")
    ap.add_argument("--savings-from", type=Path, help="a demo sweep's JSON: its saved fraction per threshold")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    opts = ap.parse_args(argv)
    opts.thresholds = [float(t) for t in opts.thresholds.split(",")]
    opts.size = tuple(int(v) for v in opts.size.lower().split("x")) if opts.size else None
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)   # steadier timings on a shared CPU
    pipe, quality, note = load(opts.model, opts)
    prompts = judged_prompts(opts.model if quality else "demo", opts.prompts)
    device = pipe.mesh.device.type
    print(f"step cache sweep: {note}, {opts.steps} steps, thresholds {opts.thresholds}, {len(prompts)} prompts, "
          f"{machine_description(device)}", flush=True)
    t0 = time.time()
    # one step first: first-call costs (allocator, kernel choice) out of the timed runs
    generate(pipe, prompts[0], 0, argparse.Namespace(**vars(opts) | {"steps": 1}), None)
    rows = sweep(pipe, prompts, opts, quality)
    summ = summary(rows, quality)
    result = dict(method="easy (EasyCache's rule; paradit/engine/cache.py)", model=note, steps=opts.steps,
                  warmup=opts.warmup, machine=machine_description(device), environment=environment(),
                  seconds=time.time() - t0, summary=summ, runs=rows)
    if opts.extrapolate_to:
        savings = {}
        if opts.savings_from:
            demo = json.loads(opts.savings_from.read_text())
            savings = {s["threshold"]: s["saved_fraction"] for s in demo["summary"]}
            result["savings_from"] = dict(file=str(opts.savings_from), model=demo["model"], steps=demo["steps"])
        result["extrapolated"] = extrapolate(rows, opts.extrapolate_to, savings)
        for e in result["extrapolated"]:
            print(f"  {e['steps']} steps at easy:{e['threshold']:g} ({100 * e['saved_fraction']:.0f}% saved, "
                  f"{e['saved_fraction_from']}): {e['uncached_s']:.1f} s -> "
                  f"{e.get('cached_s', math.nan):.1f} s (step {e['computed_step_s']:.3f} s, cached step "
                  f"{e['computed_step_cached_s']:.3f} s, skipped step {e['skipped_step_s'] or math.nan:.4f} s)")
    print(table(summ, quality))
    tag = machine_tag(device)
    what = f"cache_{pipe.cfg.name}" if not quality else f"cache_{'' if opts.model == 'demo' else opts.model + '_'}" \
        f"{opts.steps}steps"   # demo's name as its earlier sweeps
    path = write_json(results_path(what, "json", opts.out, tag), result)
    print(f"wrote {path}")
    if quality:
        png = path.with_suffix(".png")
        plot(summ, rows, f"step cache (easy) on the {note}, {opts.steps} steps, {len(prompts)} prompts, "
                         f"{machine_description(device)}", png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

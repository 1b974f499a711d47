"""FP8 against bf16 on the same weights: one forward's error, the CFG step's time, a demo denoise.

    python bench/quant.py                       # one GPU: A14B blocks at 1280x720x81, --layers 4 of 40
    python bench/quant.py --layers 40           # the whole expert (bf16 ~28 GB, then ~14 GB in fp8)
    python bench/quant.py --cpu-emulation       # CPU smoke test: small shapes, torchao's CPU fallback

What is measured, in one process; bf16 first, then the same seeded weights rebuilt and quantised
by paradit.models.quant.quantize_experts (--mode, default fp8: the blocks' linear layers):
  forward  one batched-CFG forward (B = 2: cond and uncond) on the same inputs: the relative error
           ||fp8 - bf16|| / ||bf16|| of its output and of the guided velocity; with --layers <= 8
           also bf16's own error against an fp32 copy of the weights (what bf16 already costs).
  step     the CFG step (Runtime.velocity, cond and uncond batched, plus the Euler update) eager,
           then with every block torch.compile'd (paradit.compile.compile_blocks): --warmup untimed
           steps (the first, which builds the graphs, timed apart), --repeats timed ones, median.
           full_depth_s scales the per-block time to the preset's depth (40 blocks for A14B;
           embeddings and head are under 0.1% of a step), so a cut-down --layers run predicts the
           full step.
  demo     Pipeline.from_pretrained("demo") (the shipped trained model; --model demo64 for the 64x64x33
           one), its experts cast to bf16: the latent after a full denoise (its 24 steps, or --demo-steps;
           "a red circle moving right" in its vocabulary, seed 0) in bf16 and in fp8: the latents'
           relative error fp8 vs bf16 and bf16 vs the fp32 original, the decoded videos' PSNR and SSIM
           likewise, and paradit.demo.judge's verdict on each of the three videos.
  fp8 attention is measured when paradit.models.quant finds its kernel (FlashAttention-3 on
           Hopper); otherwise the JSON says what is missing.
Results: bench/results/<date>_<machine>_quant.json (and .png where matplotlib is installed).
On a CPU FP8 is refused (torchao asserts a GPU of compute capability 8.9+); --cpu-emulation lifts
that assert so that the whole script runs at small shapes as a smoke test (numbers meaningless).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from launcher import (environment, judged_prompt, machine_description, machine_tag,  # noqa: E402
                      results_path, write_json)
from scaling_measure import build_model, make_inputs, make_step, timed  # noqa: E402

from paradit.compile import compile_blocks  # noqa: E402
from paradit.config import WanConfig  # noqa: E402
from paradit.demo.data import judged_prompts  # noqa: E402
from paradit.demo.judge import judge, psnr, rel_err, ssim  # noqa: E402
from paradit.errors import ParameterError  # noqa: E402
from paradit.launch import init_distributed  # noqa: E402
from paradit.models import quant  # noqa: E402
from paradit.parallel.mesh import init_parallel  # noqa: E402
from paradit.parallel.runtime import Runtime  # noqa: E402
from paradit.plan.layout import ParallelConfig  # noqa: E402
from paradit.settings import QUANT_MODES  # noqa: E402

DEMO_PROMPT = "a red circle moving right"
DEFAULTS = {"cuda": dict(preset="wan2.2-t2v-a14b", size="1280x720", frames=81, layers=4, warmup=2, repeats=3),
            # dims multiples of 16 (torch._scaled_mm's rule): tiny's layout at dim 64
            "cpu": dict(preset="tiny", size="64x64", frames=9, layers=2, warmup=1, repeats=2)}


@contextlib.contextmanager
def cpu_emulation(on: bool):
    """Lift paradit's and torchao's FP8 hardware checks (CPU smoke test only); restored on exit."""
    if not on:
        yield
        return
    import torchao.quantization.quant_api as quant_api
    with mock.patch.object(quant, "fp8_linears_missing", lambda device: []), \
            mock.patch.object(quant_api, "_check_hardware_support", lambda granularity: None):
        yield


def bench_config(preset: str, layers: int, device: torch.device) -> WanConfig:
    cfg = WanConfig.preset(preset)
    if device.type == "cpu" and preset == "tiny":
        cfg = cfg.replace(dim=64, ffn_dim=128)
    return cfg.replace(num_layers=layers)


def forward_outputs(model, runtime: Runtime, inputs: dict, device) -> dict:
    """The batched cond+uncond forward's output (2, L, P*C) and the guided velocity (L, P*C) at the
    schedule's first timestep."""
    x = inputs["tokens"].to(device)
    t = torch.tensor(1000.0 * inputs["sigmas"][0], device=device)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        out = runtime.forward_tokens(model, x.to(dtype)[None].expand(2, -1, -1), t.reshape(1, 1).expand(2, 1),
                                     torch.cat([inputs["cond"], inputs["uncond"]]), inputs["grid"])
        v = runtime.velocity(model, x, t, inputs["cond"], inputs["uncond"], inputs["guidance"], inputs["grid"])
    return {"out": out.float(), "v": v.float()}


def attempt(what: str, fn, *a):
    """fn(*a), or {"error": ...} with the traceback printed: one stage failing on the GPU (a compile,
    a kernel) leaves the others' numbers in the JSON."""
    try:
        return fn(*a)
    except Exception as err:  # noqa: BLE001 - recorded, not hidden
        traceback.print_exc()
        print(f"  {what} failed: {type(err).__name__}: {err}", flush=True)
        return {"error": f"{type(err).__name__}: {str(err)[:500]}"}


def step_times(model, runtime, inputs, device, args, compiled: bool) -> dict:
    if compiled:
        torch._dynamo.reset()
        compile_blocks([model])
    step = make_step(runtime, model, inputs, "step", device)
    with torch.no_grad():
        first = timed(step, 1, device, together=False)[0]
        for _ in range(args.warmup - 1):
            step()
        times = timed(step, args.repeats, device, together=False)
    med = statistics.median(times)
    return dict(median_s=med, times_s=times, first_call_s=first,
                full_depth_s=med * WanConfig.preset(args.preset).num_layers / args.layers)


def measure_model(cfg, mode: str | None, args, device, inputs, emulate: bool) -> tuple[dict, dict, dict]:
    """(forward outputs, eager step, compiled step) of the seeded model, quantised per `mode` (None:
    bf16). The model is rebuilt from the same seed each time: the same weights, no copy held."""
    model = build_model(cfg, device, torch.bfloat16)
    mesh = init_parallel(ParallelConfig(), device, num_heads=cfg.num_heads)
    runtime = Runtime(mesh, "auto", torch.bfloat16)
    runtime.bind(model)
    fingerprint = model.blocks[0].self_attn.q.weight.float().sum().item()
    report = None
    if mode:
        with cpu_emulation(emulate):
            report = quant.quantize_experts([model], mode)
            if report["attention"]:
                runtime.use_attention(quant.fp8_attention(), report["attention"], [model])
    outs = forward_outputs(model, runtime, inputs, device)
    eager = attempt("eager step", step_times, model, runtime, inputs, device, args, False)
    compiled = None if args.no_compile else attempt("compiled step", step_times, model, runtime, inputs, device,
                                                    args, True)
    torch._dynamo.reset()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return outs | {"fingerprint": fingerprint, "report": report}, eager, compiled


def fp32_reference(cfg, device, inputs) -> dict:
    """The bf16 model's weights in fp32 (same seed), same inputs, TF32 off: what bf16 alone is off by."""
    model = build_model(cfg, device, torch.bfloat16).float()
    mesh = init_parallel(ParallelConfig(), device, num_heads=cfg.num_heads)
    runtime = Runtime(mesh, "auto", torch.float32)
    runtime.bind(model)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return forward_outputs(model, runtime, inputs, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def demo_latents(device, mode: str, emulate: bool, steps: int | None, model: str = "demo") -> dict:
    """A judged demo model's final latent: fp32 as shipped, cast to bf16, then bf16 with `mode` applied."""
    from paradit.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(model, device=str(device))
    prompt = judged_prompt(model, DEMO_PROMPT)
    run = dict(output="latent", progress=False, seed=0, steps=steps)
    latents = {"fp32": pipe(prompt, **run)}
    for k, m in enumerate(pipe.experts):
        pipe.experts[k] = m.to(torch.bfloat16)
    t0 = time.perf_counter()
    latents["bf16"] = pipe(prompt, **run)
    bf16_s = time.perf_counter() - t0
    with cpu_emulation(emulate):
        report = quant.quantize_experts(pipe.experts, mode)
        if report["attention"]:
            pipe.runtime.use_attention(quant.fp8_attention(), report["attention"], pipe.experts)
    t0 = time.perf_counter()
    latents[mode] = pipe(prompt, **run)
    fp8_s = time.perf_counter() - t0
    frames = {k: pipe.vae.decode(v.float()) for k, v in latents.items()}
    versus = lambda a, b: {"rel_err": rel_err(latents[a], latents[b]), "psnr_db": psnr(frames[a], frames[b]),  # noqa: E731
                           "ssim": ssim(frames[a], frames[b])}
    return {"model": model, "steps": len(pipe.record.step_s), "prompt": prompt, "seed": 0,
            "bf16_vs_fp32": versus("bf16", "fp32"), "fp8_vs_bf16": versus(mode, "bf16"),
            "fp8_vs_fp32": versus(mode, "fp32"), "judge": {k: judge(f, prompt)._asdict() for k, f in frames.items()},
            "denoise_s": {"bf16": bf16_s, "fp8": fp8_s}}


def judged_model(name: str) -> str:
    """--model's check: a demo model the judge knows (paradit.demo.data.judged_prompts), else its error."""
    try:
        judged_prompts(name, 1)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def attention_status(device) -> dict:
    missing = quant.fp8_attention_missing(device)
    return {"available": not missing, "missing": missing}


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kinds = [k for k in ("eager", "compiled") if result["step_s"][k] and None not in result["step_s"][k].values()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, prec in enumerate(("bf16", "fp8")):
        vals = [result["step_s"][k][prec] for k in kinds]
        ax.bar([j + 0.38 * i for j in range(len(kinds))], vals, width=0.36, label=prec)
    ax.set_xticks([j + 0.19 for j in range(len(kinds))], kinds)
    ax.set_ylabel(f"CFG step, s ({result['settings']['layers']} blocks)")
    ax.set_title(f"{result['settings']['preset']} {result['settings']['size']}x{result['settings']['frames']}, "
                 f"{result['machine']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", help="model preset (default: wan2.2-t2v-a14b on GPU, tiny at dim 64 on CPU)")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default 1280x720 GPU, 64x64 CPU)")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--layers", type=int, help="blocks of the model (default 4 GPU, 2 CPU; A14B has 40)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--mode", default="fp8", choices=[m for m in QUANT_MODES if m != "none"],
                    help="what to quantise (paradit.settings.QUANT_MODES); default fp8, the linear layers")
    ap.add_argument("--no-compile", action="store_true", help="eager steps only (always so on a CPU)")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo model's denoise")
    ap.add_argument("--demo-steps", type=int, help="the demo denoise's steps (default: the demo's 24)")
    ap.add_argument("--model", "--demo-model", dest="demo_model", default="demo", type=judged_model,
                    help="the judged model of the demo denoise: demo (16x16x9) or demo64 (64x64x33)")
    ap.add_argument("--cpu-emulation", action="store_true",
                    help="CPU smoke test: lift torchao's GPU assert (numbers meaningless)")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    return ap.parse_args(argv)


def settle(args, device) -> bool:
    """The device's defaults (DEFAULTS) for what was not given; FP8 refused here, naming what is missing,
    unless emulated. Returns whether it is: --cpu-emulation on a CPU."""
    d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for k in ("preset", "size", "frames", "layers", "warmup", "repeats"):
        setattr(args, k, getattr(args, k) or d[k])
    emulate = args.cpu_emulation and device.type == "cpu"
    if device.type == "cpu":
        args.no_compile = True     # inductor on a 2-core CPU: minutes, and nothing to learn for FP8
    if not emulate:
        try:
            quant.check_quant(args.mode, device)
        except ParameterError as err:
            raise SystemExit(f"bench/quant.py: {err}" + ("; for a CPU smoke test pass --cpu-emulation"
                                                          if device.type == "cpu" else ""))
    return emulate


def measure(args, device, emulate: bool) -> dict:
    """bf16 against FP8: the forward's errors, the steps' times, the demo denoise; the result as written."""
    w, h = (int(v) for v in args.size.split("x"))
    cfg = bench_config(args.preset, args.layers, device)
    inputs = make_inputs(cfg, dict(width=w, height=h, frames=args.frames, sample_steps=cfg.steps), device)
    print(f"quant: {args.preset} ({args.layers} blocks), {w}x{h}x{args.frames} ({cfg.num_tokens(w, h, args.frames)} "
          f"tokens), bf16 vs {args.mode}, on {machine_description(device.type)}"
          f"{' (CPU emulation)' if emulate else ''}", flush=True)

    ref32 = fp32_reference(cfg, device, inputs) if args.layers <= 8 else None
    bf16, bf16_eager, bf16_compiled = measure_model(cfg, None, args, device, inputs, emulate)
    fp8, fp8_eager, fp8_compiled = measure_model(cfg, args.mode, args, device, inputs, emulate)
    assert fp8["fingerprint"] == bf16["fingerprint"], "the two models must hold the same weights"
    result = dict(
        what="quant", date=time.strftime("%Y-%m-%d"), machine=machine_tag(device.type), emulated=emulate,
        environment=environment(), method=__doc__,
        settings=dict(preset=args.preset, layers=args.layers, size=args.size, frames=args.frames,
                      tokens=cfg.num_tokens(w, h, args.frames), mode=args.mode, warmup=args.warmup,
                      repeats=args.repeats, torchao=fp8["report"]["linears"] and fp8["report"]["linears"]["torchao"]),
        quantised=fp8["report"], fp8_attention=attention_status(device),
        forward={"fp8": {"rel_err": rel_err(fp8["out"], bf16["out"]),
                         "velocity_rel_err": rel_err(fp8["v"], bf16["v"])},
                 "bf16_vs_fp32": None if ref32 is None else {"rel_err": rel_err(bf16["out"], ref32["out"]),
                                                              "velocity_rel_err": rel_err(bf16["v"], ref32["v"])}},
        step_s={"eager": {"bf16": bf16_eager.get("median_s"), "fp8": fp8_eager.get("median_s")},
                "compiled": None if args.no_compile else {"bf16": bf16_compiled.get("median_s"),
                                                          "fp8": fp8_compiled.get("median_s")}},
        steps={"bf16": {"eager": bf16_eager, "compiled": bf16_compiled},
               "fp8": {"eager": fp8_eager, "compiled": fp8_compiled}},
        demo=None if args.no_demo else attempt("demo", demo_latents, device, args.mode, emulate, args.demo_steps,
                                                       args.demo_model))
    for s in result["step_s"].values():
        if s and s["bf16"] and s["fp8"]:
            s["speedup"] = s["bf16"] / s["fp8"]
    return result


def report(result: dict, args) -> None:
    """The step times (and at the preset's full depth), the forward's errors, the demo's latent errors."""
    full = WanConfig.preset(args.preset).num_layers
    for kind, s in result["step_s"].items():
        if s and "speedup" in s:
            print(f"  {kind:8s} step: bf16 {s['bf16']:.3f} s, {args.mode} {s['fp8']:.3f} s ({s['speedup']:.2f}x); "
                  f"at the full {full} blocks: {s['bf16'] * full / args.layers:.2f} s vs "
                  f"{s['fp8'] * full / args.layers:.2f} s", flush=True)
    forward = result["forward"]
    print(f"  forward rel. error {args.mode} vs bf16: {forward['fp8']['rel_err']:.3e} (velocity "
          f"{forward['fp8']['velocity_rel_err']:.3e})"
          + (f"; bf16 vs fp32: {forward['bf16_vs_fp32']['rel_err']:.3e}" if forward["bf16_vs_fp32"] else ""), flush=True)
    if result["demo"] and "error" not in result["demo"]:
        print(f"  {args.demo_model} latent after {result['demo']['steps']} steps: {args.mode} vs bf16 "
              f"{result['demo']['fp8_vs_bf16']['rel_err']:.3e}, bf16 vs fp32 "
              f"{result['demo']['bf16_vs_fp32']['rel_err']:.3e}", flush=True)


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.getLogger("paradit").setLevel(logging.WARNING)
    device = init_distributed("auto").device
    emulate = settle(args, device)
    result = measure(args, device, emulate)
    report(result, args)
    path = write_json(results_path("quant", "json", args.out, result["machine"]), result)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()

"""The CLI: `python -m paradit.generate` (also under `torchrun --nproc-per-node W`).

    torchrun --nproc-per-node 4 -m paradit.generate --model tiny --sp 2 --cfg-par 2 --out out.mp4

Everything the user typed is validated on every rank before any weights are built or read.
Rank 0 of each data-parallel replica writes its videos, atomically, each with a JSON sidecar.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from paradit import conditioning
from paradit.config import PRESETS, WanConfig
from paradit.launch import init_distributed, setup_logging, shutdown
from paradit.launch.faults import (EXIT_PEER_FAILED, AbortWatcher, count_reported, peer_failure, report_failure,
                                   say_error, wait_for_reports)
from paradit.models.attention import pick_backend
from paradit.models.loading import CheckpointError
from paradit.models.lora import check_loras, lora_specs
from paradit.outputs import write_json, write_tensor, write_video
from paradit.parallel.chords import ChordsSettings, chords_layout, experts_per_core, parse_init, parse_stop
from paradit.parallel.layout import ParallelConfig, auto_sp
from paradit.residency import OFFLOAD_MODES
from paradit.schedulers.schedule import high_noise_steps

log = logging.getLogger("paradit")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paradit.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="demo", help=f"preset ({', '.join(sorted(PRESETS))}) or checkpoint folder")
    p.add_argument("--prompt", default="a red circle moving right")
    p.add_argument("--prompts-file", help="one prompt a line; data-parallel replicas share them out")
    p.add_argument("--negative-prompt", default=None,
                   help="default: the model's own (the original Wan's Chinese one for Wan checkpoints)")
    p.add_argument("--image", help="first frame for I2V-A14B / TI2V-5B checkpoints; without --size the video "
                                   "takes the image's shape at the preset's area")
    p.add_argument("--components", help="diffusers-layout folder whose text_encoder/, tokenizer/ and vae/ "
                                        "an original-layout --model uses (overrides a diffusers folder's own)")
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA (.safetensors) merged into every expert at load time, strength SCALE (1); repeatable")
    p.add_argument("--lora-high", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA for the high-noise expert of a Wan2.2 A14B model only; repeatable")
    p.add_argument("--lora-low", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA for the low-noise expert of a Wan2.2 A14B model only; repeatable")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block, then warm "
                                                          "up one step per expert before the timed run")
    p.add_argument("--size", help="WxH, e.g. 1280x720 (default: the preset's)")
    p.add_argument("--frames", type=int, help="4k+1 frames (default: the preset's)")
    p.add_argument("--steps", type=int)
    p.add_argument("--shift", type=float)
    p.add_argument("--guidance", help="one scale, or high,low for the two Wan2.2 experts")
    p.add_argument("--sampler", default="unipc", choices=["unipc", "euler"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/video.mp4")
    p.add_argument("--save-latents", action="store_true", help="also write the final latent (.safetensors)")
    add_layout_args(p)
    p.add_argument("--chords", type=int, default=1, help="CHORDS cores (parallel-in-time); one core group "
                   "per core when the world has room, else the cores run in turn")
    p.add_argument("--chords-init", help="start step of each core, e.g. 0,8,16,32 (default: the rule)")
    p.add_argument("--chords-stop", default="hit:1", help="hit:M | residual:TAU | none")
    p.add_argument("--chords-stream", action="store_true", help="write every hit as it arrives (out.hitN.mp4)")
    p.add_argument("--timeout", type=float, default=None, help="collective timeout in seconds")
    p.add_argument("--check-finite", action="store_true", help="stop at the first NaN/Inf velocity, naming the step")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """The device, layout and offload flags, shared with the server (python -m paradit.serve)."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--attention", default="auto", help="auto, flash, sdpa, math")
    p.add_argument("--sp", type=int, help="sequence-parallel degree; picks ulysses x ring from the head count")
    p.add_argument("--ulysses", type=int)
    p.add_argument("--ring", type=int)
    p.add_argument("--cfg-par", type=int, default=1, choices=[1, 2], help="2: cond and uncond on separate GPU groups")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas over prompts")
    p.add_argument("--experts", default="colocated", choices=["colocated", "split", "auto"],
                   help="split: high- and low-noise experts on separate GPU groups, requests pipelined")
    p.add_argument("--stages", help="GPUs of the high,low stages with --experts split (default: by step split)")
    p.add_argument("--plan", default="manual", choices=["manual", "auto"], help="auto: the planner picks the layout")
    p.add_argument("--gpu", choices=["h100", "h200", "b200"], help="GPU kind for the planner (default: detected)")
    p.add_argument("--force", action="store_true", help="run a layout the planner predicts will not fit")
    p.add_argument("--offload", default="auto", choices=OFFLOAD_MODES,
                   help="keep the text encoder and/or the idle expert in host memory, copied to the GPU when "
                        "used; auto: the planner's fastest mode that fits (none on a CPU)")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {size!r}: write it as WIDTHxHEIGHT, e.g. 1280x720") from None
    return w, h


def parse_guidance(text: str | None):
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--guidance {text!r}: give one number or two (high,low), e.g. 4.0,3.0") from None
    if len(vals) not in (1, 2):
        raise ValueError(f"--guidance {text!r}: give one number or two (high,low)")
    return vals[0] if len(vals) == 1 else tuple(vals)


def layout_from_args(args, num_heads: int) -> ParallelConfig:
    u, r = args.ulysses, args.ring
    if args.sp is not None:
        if u is None and r is None:
            u, r = auto_sp(num_heads, args.sp)
        elif (u or 1) * (r or 1) != args.sp:
            raise ValueError(f"--sp {args.sp} disagrees with --ulysses {u} x --ring {r}; give --sp alone or "
                             f"--ulysses and --ring whose product is {args.sp}")
        else:
            u, r = u or args.sp // (r or 1), r or args.sp // (u or 1)
    return ParallelConfig(ulysses=u or 1, ring=r or 1, cfg=args.cfg_par, dp=args.dp)


def model_config(name_or_path: str, components: str | None = None) -> WanConfig:
    if name_or_path in PRESETS:
        return WanConfig.preset(name_or_path)
    if not Path(name_or_path).exists():
        raise ValueError(f"--model {name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                         f"nor an existing checkpoint folder")
    from paradit.checkpoint import model_config as checkpoint_config
    return checkpoint_config(name_or_path, components)


def read_prompts(args) -> list[str]:
    if args.prompts_file is None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ValueError(f"--prompts-file {path}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} has no prompts (one prompt a line)")
    return prompts


def output_path(out: str, index: int, count: int) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out}: the video is written as H.264 mp4; give a path ending in .mp4")
    return out if count == 1 else out.with_name(f"{out.stem}_{index:03d}{out.suffix}")


def gpu_kind(args) -> str | None:
    """The planner's GPU preset: --gpu, else read from the CUDA device name; None on CPU."""
    if args.gpu:
        return args.gpu
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    return next((k for k in ("b200", "h200", "h100") if k in name), "h100")


def planned_layout(args, cfg, world: int, settings, kind: str | None, log_choice: bool):
    """--plan auto / --experts auto: the planner's choice for this world and GPU kind."""
    from paradit.parallel.planner import plan
    if kind is None:
        raise ValueError("--plan auto / --experts auto need a GPU kind to plan for: run on a GPU or "
                         "pass --gpu h100|h200|b200")
    p = plan(cfg, world, kind, settings.width, settings.height, settings.frames, settings.steps,
             offload=args.offload)
    if p.choice is None:
        raise ValueError(f"the planner finds no layout of {world} x {kind} that fits "
                         f"{cfg.name} at {settings.width}x{settings.height}x{settings.frames}:\n{p.explain()}")
    if log_choice:
        log.info("planner: %s", p.explain())
    return p.choice.layout


def split_layout(args, cfg, world: int, settings) -> ParallelConfig:
    """--experts split: stage sizes from --stages or the step split; each stage's sp from the heads."""
    from paradit.parallel.stages import stage_sizes
    if cfg.boundary is None:
        raise ValueError("experts='split' needs a two-expert model (Wan2.2 A14B); this one has one expert")
    n_high = high_noise_steps(cfg.boundary, settings.steps, settings.shift)
    if args.stages:
        try:
            sizes = tuple(int(v) for v in args.stages.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != 2 or min(sizes) < 1:
            raise ValueError(f"--stages {args.stages!r}: give two GPU counts, high,low (e.g. 5,3)")
    else:
        sizes = stage_sizes(world, n_high, settings.steps)
    stages = []
    for n in sizes:
        if n % args.cfg_par:
            raise ValueError(f"--stages {sizes}: a stage of {n} GPUs cannot hold --cfg-par {args.cfg_par}")
        stages.append((*auto_sp(cfg.num_heads, n // args.cfg_par), args.cfg_par))
    return ParallelConfig(experts="split", stages=tuple(stages))


def resolve_layout(args, cfg, info, settings, chords: ChordsSettings | None = None) -> ParallelConfig:
    kind = gpu_kind(args)
    if args.plan == "auto":
        layout = planned_layout(args, cfg, info.world_size, settings, kind, info.rank == 0)
    elif args.experts == "split":
        layout = split_layout(args, cfg, info.world_size, settings)
    elif args.experts == "auto" and kind is not None:
        chosen = planned_layout(args, cfg, info.world_size, settings, kind, False)
        layout = (split_layout(args, cfg, info.world_size, settings) if chosen.experts == "split"
                  else layout_from_args(args, cfg.num_heads))
    else:  # colocated, or auto with no GPU to plan for (CPU): both experts on every rank
        layout = layout_from_args(args, cfg.num_heads)
    if chords is not None:
        if layout.stages:
            raise ValueError("--chords cannot be combined with --experts split yet; use colocated experts")
        layout = dataclasses.replace(layout, chords=chords_layout(chords, info.world_size, layout.world_size))
        chords.validate(settings.steps, layout.chords)
    layout.validate(info.world_size, cfg.num_heads)
    if kind is not None and not args.force:
        check_memory(cfg, layout, kind, settings, info.world_size, args.offload)
    return layout


def check_memory(cfg, layout: ParallelConfig, kind: str, settings, world: int, offload: str = "auto") -> None:
    """Refuse, before loading, a layout the planner predicts will not fit (override: --force)."""
    from paradit.parallel.planner import evaluate, make_problem, plan
    if cfg.name not in PRESETS:
        return
    problem = make_problem(cfg, world, kind, settings.width, settings.height, settings.frames, settings.steps,
                           offload=offload)
    cand = evaluate(problem, layout)
    if not cand.feasible and "memory" in cand.reason:
        best = plan(cfg, world, kind, settings.width, settings.height, settings.frames, settings.steps).choice
        hint = (f"; the planner suggests {best.layout.label()} with --offload {best.offload} "
                f"({best.mem_gb:.1f} GB per GPU)" if best else "")
        raise ValueError(f"layout {layout.describe()} with --offload {offload} is predicted not to fit on {kind}: "
                         f"{cand.reason}{hint}. Pass --force to run it anyway")


def offload_mode(args, cfg, layout: ParallelConfig, settings, device) -> str:
    """--offload auto: the planner's fastest mode that fits this layout on this GPU kind; none on a CPU."""
    from paradit.parallel.planner import evaluate, make_problem
    kind = gpu_kind(args)
    if args.offload != "auto":
        return args.offload
    if device.type != "cuda" or kind is None or cfg.name not in PRESETS:
        return "none"
    problem = make_problem(cfg, layout.world_size, kind, settings.width, settings.height, settings.frames,
                           settings.steps)
    return evaluate(problem, layout).offload


def run(args) -> list[Path]:
    from paradit.settings import VideoSettings

    # 1. validate everything before any weights exist
    t_start = time.perf_counter()
    info = init_distributed(args.device, args.timeout)
    setup_logging(info.rank)
    cfg = model_config(args.model, args.components)
    width, height = parse_size(args.size)
    conditioning.check_task(cfg, args.image)
    if args.image and args.size is None:
        img = conditioning.load_image(args.image)
        width, height = conditioning.size_for_image(cfg, img.width, img.height)
    settings = VideoSettings.resolve(cfg, width, height, args.frames, args.steps, args.shift,
                                     parse_guidance(args.guidance), args.seed, args.sampler)
    chords, needed = None, None
    if args.chords > 1:
        chords = ChordsSettings(args.chords, parse_init(args.chords_init), parse_stop(args.chords_stop))
    layout = resolve_layout(args, cfg, info, settings, chords)
    pick_backend(info.device, torch.bfloat16 if info.device.type == "cuda" else torch.float32, args.attention)
    if chords is not None:
        per_core = experts_per_core(cfg.boundary, settings.steps, settings.shift,
                                    chords.resolve_init(settings.steps), chords.stop)
        needed = (per_core[layout.coords(info.rank)["chords"]] if layout.chords > 1
                  else set().union(*per_core))
        log.info("CHORDS: %d cores, init %s, stop %s; experts per core: %s", chords.cores,
                 chords.resolve_init(settings.steps), args.chords_stop,
                 [sorted(["high", "low"][k] for k in e) for e in per_core])
    if layout.stages:
        needed = {layout.coords(info.rank)["stage"]}
    if args.image and (layout.stages or (chords and cfg.task == "ti2v")):
        raise ValueError("--image is not supported with --experts split, nor with --chords for TI2V-5B, yet")
    prompts = read_prompts(args)
    paths = [output_path(args.out, i, len(prompts)) for i in range(len(prompts))]
    loras = lora_specs(args.lora, args.lora_high, args.lora_low)
    check_loras(loras, cfg, warn=False)  # files, names, shapes (headers); from_pretrained warns and merges

    # 2. build
    from paradit.pipeline import Pipeline  # diffusers and transformers: only once the input is valid
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, parallel=layout, device=args.device, backend=args.attention,
                                    experts_needed=needed, components=args.components, compile=args.compile,
                                    loras=loras,
                                    offload=offload_mode(args, cfg, layout, settings, info.device))
    startup = {"validate_s": t0 - t_start, **pipe.startup, "build_s": time.perf_counter() - t0}
    if args.compile:
        startup["compile_s"] = pipe.warmup(image=args.image is not None, **settings.__dict__)
    pipe.check_finite = args.check_finite
    mesh = pipe.mesh
    written = []

    def finish(i: int, latent, elapsed: float) -> None:
        """Decode (spread over the output rank's sp group) and write request i on the output rank."""
        t1 = time.perf_counter()
        video = pipe.decode(latent)
        memory = gpu_memory(pipe)  # collective over the request's ranks
        if not mesh.is_output_rank:
            return
        path = paths[i]
        pipe.record.timings["vae_decode_s"] = time.perf_counter() - t1
        startup.update({k: v for k, v in pipe.startup.items() if k not in startup})  # first_step_s
        t1 = time.perf_counter()
        write_video(path, video.numpy(), cfg.fps)
        pipe.record.timings["write_video_s"] = time.perf_counter() - t1
        if args.save_latents:
            write_tensor(path.with_suffix(".latent.safetensors"), {"latent": latent})
        write_json(path.with_suffix(".json"), sidecar(args, cfg, settings, layout, pipe, prompts[i], startup,
                                                     elapsed) | {"gpu_memory_gb": memory,
                                                                 "time_to_video_s": since_process_start()})
        if pipe.record.chords:
            log.info("%s", chords_summary(pipe.record.chords, settings.steps))
        log.info("wrote %s (%d frames %dx%d, %.2f s)", path, video.shape[0], video.shape[2], video.shape[1],
                 elapsed)
        print(f"paradit: wrote {path}", flush=True)
        written.append(path)

    # 3. generate: through the two expert stages, or this replica's share of the prompts
    if layout.stages:
        from paradit.parallel.stages import run_split
        t0 = time.perf_counter()
        latencies = []
        run_split(pipe, [(p, args.negative_prompt, settings) for p in prompts],
                  on_done=lambda i, latent, latency: (latencies.append(latency), finish(i, latent, latency)),
                  progress=not args.no_progress)
        if mesh.is_output_rank:
            total = time.perf_counter() - t0
            print(f"paradit: split experts: {len(prompts)} requests in {total:.2f} s "
                  f"({3600 * len(prompts) / total:.1f} per hour); latency per request: "
                  + ", ".join(f"{lat:.2f} s" for lat in latencies), flush=True)
        return written
    for i, (prompt, path) in enumerate(zip(prompts, paths)):
        if i % layout.dp != mesh.rank("dp"):
            continue
        t0 = time.perf_counter()
        on_hit = stream_hits(pipe, path, cfg.fps) if (chords and args.chords_stream and mesh.is_output_rank) else None
        latent = pipe(prompt, output="latent", chords=chords, on_hit=on_hit, progress=not args.no_progress,
                      **settings_kwargs(args, settings))
        finish(i, latent, time.perf_counter() - t0)
    return written


def gpu_memory(pipe) -> dict[str, dict[str, float]] | None:
    """Peak GPU memory (GB, allocated and reserved by torch's allocator) of every rank of this
    request's group (its replica; its stage with split experts), keyed by global rank; None on CPU."""
    import torch.distributed as dist
    mine = None
    if pipe.mesh.device.type == "cuda":
        d = pipe.mesh.device
        mine = {"allocated": torch.cuda.max_memory_allocated(d) / 1e9, "reserved": torch.cuda.max_memory_reserved(d) / 1e9}
    group = pipe.request_group
    if group is None:
        return None if mine is None else {"0": mine}
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, (dist.get_rank(), mine), group=group)
    return None if mine is None else {str(r): m for r, m in every}


def since_process_start() -> float | None:
    """Seconds since this process started (the interpreter's start, imports included), from /proc."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):  # not Linux
        return None
    return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))


def settings_kwargs(args, settings) -> dict:
    return dict(negative_prompt=args.negative_prompt, image=args.image, width=settings.width,
                height=settings.height, frames=settings.frames, steps=settings.steps, shift=settings.shift,
                guidance=settings.guidance, seed=settings.seed, sampler=settings.sampler)


def stream_hits(pipe, path: Path, fps: int):
    """Decode and write every CHORDS hit as it arrives: out.hit0.mp4 (preview), out.hit1.mp4, ..."""
    count = [0]

    def on_hit(hit, latent):
        out = path.with_name(f"{path.stem}.hit{count[0]}{path.suffix}")
        write_video(out, pipe.vae.decode(latent).numpy(), fps)
        print(f"paradit: CHORDS hit {count[0]} (core {hit.core}, round {hit.round}"
              f"{', preview' if hit.preview else ''}) -> {out}", flush=True)
        count[0] += 1
    return on_hit


def chords_summary(report, steps: int) -> str:
    lines = [f"CHORDS: {report.rounds} rounds for {steps} steps (ideal speedup {steps / report.rounds:.2f}x), "
             f"{report.nfe} NFEs ({report.nfe / steps:.2f}x sequential)"]
    for j, h in enumerate(report.hits):
        lines.append(f"  hit {j}: core {h['core']} round {h['round']}{' (preview)' if h['preview'] else ''}, "
                     f"RMS from last hit {h['rms_from_last']:.3e}")
    return "\n".join(lines)


def sidecar(args, cfg, settings, layout, pipe, prompt, startup, elapsed) -> dict:
    rec = pipe.record
    steps = max(1, len(rec.trace))
    return {
        "prompt": prompt, "model": args.model, "preset": cfg.name, "image": args.image,
        "loras": [dict(path=str(s.path), scale=s.scale, target=s.target)
                  for s in lora_specs(args.lora, args.lora_high, args.lora_low)],
        "negative_prompt": cfg.negative_prompt if args.negative_prompt is None else args.negative_prompt,
        "settings": settings.__dict__, "layout": layout.__dict__ | {"world_size": layout.world_size},
        "attention": pipe.runtime.backend, "device": str(pipe.mesh.device), "offload": pipe.offload,
        "experts_per_step": [{"t": t, "expert": ["high", "low"][k], "guidance": g} for t, k, g in rec.trace],
        "timings_s": {"startup": startup, **rec.timings, "step_s": rec.step_s, "total": elapsed},
        "collectives_per_step": {op: {"bytes": b / steps, "count": c / steps} for op, (b, c) in rec.traffic.items()},
        "chords": rec.chords.as_dict(settings.steps) if rec.chords else None,
        "torch": torch.__version__,
    }


def dist_ready() -> bool:
    import torch.distributed as dist
    return dist.is_initialized()


def finish_together(info) -> None:
    """Every rank confirms success before any exits 0, so that a rank which finished its own part
    (say the high-noise stage) still learns of, and reports, a peer's failure."""
    if info.world_size > 1:
        import torch.distributed as dist
        ok = torch.ones(1, device=info.device)
        dist.all_reduce(ok)
        if ok.item() != info.world_size:  # unreachable unless a rank lied; kept as an invariant
            raise RuntimeError("ranks disagree on success")


def main(argv=None) -> int:
    """Run the CLI; on any rank's failure every rank exits non-zero with the reason."""
    args = parse_args(argv)
    watcher, code = None, 0
    try:
        info = init_distributed(args.device, args.timeout)
        if info.world_size > 1:
            watcher = AbortWatcher().start()
        run(args)
        finish_together(info)
    except (ValueError, CheckpointError) as err:      # the user's input: a clear message, exit 2
        code, message = 2, str(err)
    except KeyboardInterrupt:
        code, message = 130, "interrupted (Ctrl-C)"
    except Exception as err:                          # a bug, a broken machine, or a failed peer
        peer = peer_failure()
        if peer is None:
            traceback.print_exc()
        code, message = (EXIT_PEER_FAILED, f"stopping because {peer}") if peer else (1, f"{type(err).__name__}: {err}")
    if code:
        if watcher is not None:
            watcher.stop()  # this thread reports now; the watcher must not print a second time
        rank = int(os.environ.get("RANK", 0))
        say_error(f"paradit: error (rank {rank}): {message}")
        count_reported()
        if code != EXIT_PEER_FAILED:  # only the root cause is posted; never overwrite it
            report_failure(message)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1 and not dist_ready():
            time.sleep(3.0)  # failed before the process group existed: no store to wait on
        wait_for_reports(world)  # every rank prints before any exits (a launcher then kills the rest)
        sys.stderr.flush()
        os._exit(code)  # peers may be blocked in collectives: do not wait on a clean teardown
    if watcher is not None:
        watcher.stop()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CLI: `python -m paradit.generate` (also under `torchrun --nproc-per-node W`).

    torchrun --nproc-per-node 4 -m paradit.generate --model tiny --sp 2 --cfg-par 2 --out out.mp4

argv -> spec (paradit.cli.spec: every flag checked on every rank before any weights are built or
read) -> build -> generate -> write. The output rank of each data-parallel replica stages its videos,
each with a JSON sidecar, and renames them into place once every rank has succeeded: a run writes
all of its outputs or none.
"""
from __future__ import annotations

import os
import signal
import sys


def _signal_while_starting(signum, frame) -> None:
    """SIGINT / SIGTERM before the failure watcher takes the signals over (imports, rendezvous: the
    first seconds): a line and the signal's exit code, not a silent -15 or an import's traceback."""
    code, what = {signal.SIGINT: (130, "interrupted (SIGINT)"), signal.SIGTERM: (143, "terminated (SIGTERM)")}[signum]
    sys.stderr.write(f"paradit: error (rank {os.environ.get('RANK', 0)}): {what} while starting\n")
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # the program itself, before torch's seconds of imports
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _signal_while_starting)
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:   # the help needs no torch: 0.4 s, not 1.5-2 s
        from paradit.cli.flags import parse_args
        try:
            parse_args()   # prints the help and exits
        except Exception:  # noqa: S110 (another flag's error first: main reports it, as it would anyway)
            pass

import logging  # noqa: E402 (after the handlers above)
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from paradit.cli.flags import flag_terms  # noqa: E402
from paradit.cli.spec import Batch, RunSpec, files_of, hit_path, parse_args, resolve, resolve_batch  # noqa: E402
from paradit.events import phase  # noqa: E402
from paradit.launch import init_distributed, setup_logging, shutdown  # noqa: E402
from paradit.launch.faults import (EXIT_PEER_FAILED, AbortWatcher, count_reported, peer_failure,  # noqa: E402
                                   report_failure, say_error, wait_for_reports)
from paradit.models.loading import CheckpointError  # noqa: E402
from paradit.outputs import Outputs, written_size, write_video  # noqa: E402

log = logging.getLogger("paradit")


def run(spec: RunSpec, batch: Batch, outputs: Outputs, startup: dict) -> list[Path]:
    """Build the pipeline of a validated spec, generate the batch's prompts, stage their outputs
    (committed by the caller once every rank has succeeded); returns the staged videos. startup:
    the start-up's timings so far (imports_s, validate_s), completed here (paradit.events)."""
    with phase("pipeline_import", startup):   # torch._dynamo, transformers: only once the input is valid
        from paradit.pipeline import Pipeline
    s = spec.settings
    log.info("video: %dx%d, %d frames, %d steps (%s)", s.width, s.height, s.frames, s.steps, spec.size_source)
    with phase("build", startup):
        pipe = Pipeline.from_spec(spec.build)
    startup.update(pipe.startup)
    if spec.build.compile:
        startup["compile_s"] = pipe.warmup(image=spec.image is not None, **s.__dict__)
    pipe.check_finite = spec.check_finite
    staged = []

    def finish(i: int, latent, elapsed: float) -> None:
        path = stage_video(spec, pipe, outputs, startup, batch.outputs[i], batch.prompts[i], latent, elapsed)
        if path is not None:
            staged.append(path)

    if spec.layout.stages:   # all of the prompts through the two expert stages
        run_split(spec, batch, pipe, finish)
        return staged
    for i, (prompt, path) in enumerate(zip(batch.prompts, batch.outputs)):   # this replica's share
        if i % spec.layout.dp != pipe.mesh.rank("dp"):
            continue
        t0 = time.perf_counter()
        on_hit = stream_hits(pipe, path, spec.cfg.fps) if spec.chords is not None and batch.chords_stream else None
        latent = pipe.run(prompt, s, spec.negative_prompt, image=spec.image, chords=spec.chords, on_hit=on_hit,
                          progress=batch.progress)
        finish(i, latent, time.perf_counter() - t0)
    return staged


def run_split(spec: RunSpec, batch: Batch, pipe, finish) -> None:
    """Every prompt pipelined through the two expert stages; the throughput line on the output rank."""
    t0, latencies = time.perf_counter(), []
    pipe.stream([(p, spec.negative_prompt, spec.settings) for p in batch.prompts],
                on_done=lambda i, latent, latency: (latencies.append(latency), finish(i, latent, latency)),
                progress=batch.progress)
    if pipe.mesh.is_output_rank:
        total, n = time.perf_counter() - t0, len(batch.prompts)
        print(f"paradit: split experts: {n} requests in {total:.2f} s ({3600 * n / total:.1f} per hour); "
              f"latency per request: " + ", ".join(f"{lat:.2f} s" for lat in latencies), flush=True)


def stage_video(spec: RunSpec, pipe, outputs: Outputs, startup: dict, path: Path, prompt: str, latent,
                elapsed: float) -> Path | None:
    """Decode (spread over the output rank's sp group) and, on the output rank, stage one video with
    its sidecar (and latent); the staged video's path there, None elsewhere."""
    video = outputs.video_stream(path, spec.cfg.fps) if pipe.mesh.is_output_rank else None
    with pipe.record.phase("vae_decode"):
        pipe.decode(latent, on_frames=video)   # the mp4 encoded as the frames are decoded
    memory = gpu_memory(pipe)  # collective over the request's ranks
    if not pipe.mesh.is_output_rank:
        return None
    decode_s = pipe.record.timings["vae_decode_s"]
    startup.update({k: v for k, v in pipe.startup.items() if k not in startup})  # first_step_s
    with pipe.record.phase("write_video"):
        video.close()                          # what the encoder has left after the decode
    if spec.save_latents:
        outputs.tensors(files_of(path, True)[2], {"latent": latent})
    outputs.json(path.with_suffix(".json"), sidecar(spec, pipe, prompt, startup, elapsed + decode_s)
                 | {"gpu_memory_gb": memory, "time_to_video_s": since_process_start()})
    if pipe.record.chords:
        log.info("%s", chords_summary(pipe.record.chords, spec.settings.steps))
    if pipe.record.cache:
        c = pipe.record.cache.as_dict()
        log.info("step cache %s: %d of %d evaluations saved (steps %s)", spec.settings.cache, c["saved"],
                 c["evaluations"], ", ".join(str(e["step"]) for e in c["skipped"]) or "none")
    log.info("staged %s (%d frames, %.2f s)", path, video.frames, elapsed + decode_s)
    return path


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


def stream_hits(pipe, path: Path, fps: int):
    """Decode and write every CHORDS hit as it arrives: out.hit0.mp4 (preview), out.hit1.mp4, ...
    Previews, written at once each on its own (atomically), not part of the run's output set.
    Every rank gets the hits (their latents are gathered together); the output rank writes them."""
    count = [0]

    def on_hit(hit, latent):
        if not pipe.mesh.is_output_rank:
            return
        out = hit_path(path, count[0])
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
                     f"RMS distance to the final hit {h['rms_from_last']:.3e}")
    return "\n".join(lines)


def sidecar(spec: RunSpec, pipe, prompt: str, startup: dict, total_s: float) -> dict:
    rec, cfg, s, layout = pipe.record, spec.cfg, spec.settings, spec.layout
    steps = max(1, len(rec.trace))
    return {
        "prompt": prompt, "model": spec.build.model, "preset": cfg.name, "image": spec.image_path,
        "loras": [dict(path=str(lo.path), scale=lo.scale, target=lo.target) for lo in spec.loras],
        "negative_prompt": cfg.negative_prompt if spec.negative_prompt is None else spec.negative_prompt,
        "settings": s.__dict__ | {"sampler": spec.sampler_label, "cache": s.cache and str(s.cache)},
        "size": {"generated": [s.width, s.height], "written": list(written_size(s.width, s.height))},
        "layout": layout.__dict__ | {"world_size": layout.world_size},
        "attention": {"backend": pipe.runtime.backend, "kernel": pipe.runtime.kernel,
                      "per_shape": pipe.runtime.kernels_ran()}, "device": str(pipe.mesh.device), "offload": pipe.offload,
        "quant": pipe.quant,
        "experts_per_step": [{"t": t, "expert": ["high", "low"][k], "guidance": g} for t, k, g in rec.trace],
        "timings_s": {"startup": startup, **rec.timings, "step_s": rec.step_s, "total": total_s},
        "collectives_per_step": {op: {"bytes": b / steps, "count": c / steps} for op, (b, c) in rec.traffic.items()},
        "chords": rec.chords.as_dict(s.steps) if rec.chords else None,
        "cache": rec.cache.as_dict() if rec.cache else None,   # the step cache: skipped steps, evaluations saved
        "torch": torch.__version__,
    }


def finish_together(info) -> None:
    """Every rank confirms success before any commits its outputs or exits 0, so that a rank which
    finished its own part (say the high-noise stage) still learns of, and reports, a peer's failure."""
    if info.world_size > 1:
        import torch.distributed as dist
        ok = torch.ones(1, device=info.device)
        dist.all_reduce(ok)
        if ok.item() != info.world_size:  # unreachable unless a rank lied; kept as an invariant
            raise RuntimeError("ranks disagree on success")


def failure(err: BaseException) -> tuple[int, str, bool]:
    """(exit code, one-line reason, whether to print the traceback) of an exception."""
    if isinstance(err, (ValueError, CheckpointError)):     # the user's input: a clear message, exit 2
        return 2, str(err), False
    if isinstance(err, KeyboardInterrupt):                 # before the watcher took over the signals
        return 130, "interrupted (SIGINT)", False
    if isinstance(err, FloatingPointError):                # --check-finite
        return 1, f"{err}; the video is not written", False
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err):
        return 1, (f"out of memory ({type(err).__name__}: {str(err).splitlines()[0][:200]}); try a smaller "
                   f"--size or --frames, or spread the run over more processes"), False
    if isinstance(err, OSError):                           # the machine: disk full, ffmpeg, ...
        return 1, f"{type(err).__name__}: {err}", False
    peer = peer_failure()
    if peer:                                               # a failed peer broke our collective
        return EXIT_PEER_FAILED, f"stopping because {peer}", False
    if lost_peer(err):                                     # ... one that could post no reason (SIGKILL)
        return EXIT_PEER_FAILED, (f"stopping because a peer rank is gone without a reason (killed, or its "
                                  f"machine lost): {str(err).splitlines()[0][:200]}"), False
    return 1, f"{type(err).__name__}: {err}", True         # a bug: show where


# What gloo and NCCL say when the rank at the other end of a collective has gone away
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
             "NCCL communicator was aborted", "Socket Timeout")


def lost_peer(err: BaseException) -> bool:
    import torch.distributed as dist
    return isinstance(err, (RuntimeError, dist.DistError)) and any(text in str(err) for text in PEER_LOST)


def main(argv=None) -> int:
    """Run the CLI; on any rank's failure every rank exits non-zero with the reason, writing nothing."""
    before = since_process_start()   # the interpreter, torch and this module's imports
    outputs, watcher, startup = Outputs(), None, {} if before is None else {"imports_s": before}
    try:
        with phase("validate", startup):   # reading the flags, the world, every check: before any weight
            flags = parse_args(argv)
            setup_logging(int(os.environ.get("RANK", 0)))
            with flag_terms(flags):
                info = init_distributed(flags.device, flags.timeout)
            watcher = AbortWatcher(cleanup=outputs.discard).start()
            spec = resolve(flags, info)
            batch = resolve_batch(flags, spec, info)
        run(spec, batch, outputs, startup)
        finish_together(info)
        for path in outputs.commit():
            if path.suffix == ".mp4":
                print(f"paradit: wrote {path}", flush=True)
    except Exception as err:
        claim_report(watcher)  # first: a traceback printed here would sit beside the watcher's line
        code, message, show = failure(err)
        if show:
            traceback.print_exc()
        outputs.discard()
        report(code, message)
    except KeyboardInterrupt as err:
        claim_report(watcher)
        outputs.discard()
        report(*failure(err)[:2])
    joined = watcher is None or watcher.stop()  # joined before the process group goes: see faults.py
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is _signal_while_starting:  # restored by stop(); the run is over, not starting
            signal.signal(sig, default)
    if not joined:  # a store call that never returns: leave without the interpreter's teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    shutdown()
    return 0


def claim_report(watcher: AbortWatcher | None) -> None:
    """Return if this (main) thread reports the failure; if the watcher thread is reporting already
    (a peer failed or a signal came, and our collective broke as a result), wait for it to exit the
    process: main says nothing, not even the broken collective's traceback."""
    if watcher is not None and not watcher.claim():
        time.sleep(60)


def report(code: int, message: str, watcher: AbortWatcher | None = None) -> None:
    """Print this rank's error once, post it for the peers, let every rank print, exit `code`
    (watcher: claim the report from it first, unless the caller did)."""
    claim_report(watcher)
    if threading.current_thread() is threading.main_thread():  # said why: a launcher's SIGTERM that stops
        for sig in (signal.SIGINT, signal.SIGTERM):             # the rest now ends us without a second line
            signal.signal(sig, signal.SIG_DFL)
    rank = int(os.environ.get("RANK", 0))
    say_error(f"paradit: error (rank {rank}): {message}")
    count_reported()
    if code != EXIT_PEER_FAILED:  # only the root cause is posted; never overwrite it
        report_failure(message)
    world = int(os.environ.get("WORLD_SIZE", 1))
    import torch.distributed as dist
    if world > 1 and not dist.is_initialized():
        time.sleep(3.0)  # failed before the process group existed: no store to wait on
    wait_for_reports(world)  # every rank prints before any exits (a launcher then kills the rest)
    sys.stderr.flush()
    os._exit(code)  # peers may be blocked in collectives: do not wait on a clean teardown


if __name__ == "__main__":
    sys.exit(main())

"""Start-up and offload: how fast a checkpoint becomes resident, and what offload costs a step.

    python bench/startup.py /path/to/Wan2.2-T2V-A14B-Diffusers --memory-cap-gb 80 --size 1280x720 --frames 81
    python bench/startup.py /dev/shm/a14b --offload-modes none --steps 0    # start-up only
    python bench/startup.py tiny          # the tiny model written to a temp folder (CI)

Every weight file is read once first, so each timing starts from a warm page cache. Then:
  0. the two halves of the reader apart, for the experts' files: the page cache into pinned
     staging slots by the reader's threads (no device copy), for each --sources entry ("pread",
     "mmap"); pinned memory to the device (one stream; CUDA only); GB/s each;
  1. each component alone, onto the device: the experts side by side through one shared Reader
     (load_transformer, as the pipeline loads them), the text encoder, the VAE; seconds and GB/s
     of what was read, and the pinning of the staging slots; then the experts again once per
     --sources entry;
  2. the whole start-up, Pipeline.from_pretrained, with its own phase timings and each phase's
     GB/s (the experts' bytes over weights_s, the text encoder's over text_encoder_s, ...);
  3. a few denoising steps (none with --steps 0) with offload none and with offload experts (and
     any others given with --offload-modes), each step timed with the device synchronised around
     it, so that a step which waits for a copy shows it; the step after the expert switch is
     reported apart; peak memory allocated and reserved per mode on CUDA.
--memory-cap-gb caps this process's CUDA memory (torch.cuda.set_per_process_memory_fraction; GB
are 1e9 bytes: an H100 80GB has 85.0e9), so that a larger GPU stands in for a smaller one.
Prints a table and writes bench/results/<date>_<machine>_startup.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]   # bench/ and the repository root

import torch  # noqa: E402

PROMPT = "a red circle moving right"


# ----------------------------------------------------------------------------- the tiny checkpoint
def write_tiny(root: Path) -> Path:
    """The tiny preset's seeded components as a diffusers-layout folder (text_len 512, as checkpoints)."""
    from paradit.checkpoint import save_diffusers_layout
    from paradit.config import WanConfig
    from paradit.pipeline import tiny_components

    cfg = WanConfig.preset("tiny").replace(text_len=512)
    experts, text, vae = tiny_components(cfg, "cpu", torch.float32)
    for model, name in zip(experts, ("transformer", "transformer_2")):
        save_diffusers_layout(model, root / name)
    text.model.save_pretrained(root / "text_encoder")
    text.tokenizer.save_pretrained(root / "tokenizer")
    vae.vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text('{"_class_name": "WanPipeline", "boundary_ratio": %r}' % cfg.boundary)
    return root


def warm_page_cache(folder: Path) -> float:
    """Read every file under folder once; GB read."""
    total = 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total / 1e9


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def expert_entries(folder: Path) -> dict:
    """Every tensor of the checkpoint's experts, where it is in its file."""
    from paradit.checkpoint import locate
    from paradit.models.reader import header
    out = {}
    for k, expert in enumerate(locate(folder).experts):
        for file in sorted(expert.glob("*.safetensors")):
            out.update({(k, file.name, name): e for name, e in header(file).items()})
    return out


def host_read(entries: dict, source: str, threads: int, device: torch.device) -> dict:
    """The reader's first half alone: every byte from the page cache into a thread's staging slot
    (pinned on CUDA), as Reader does it, with no device copy."""
    from paradit.models.reader import STAGE_BYTES, PinnedBuffer, _Files
    pinned = PinnedBuffer(threads * STAGE_BYTES) if device.type == "cuda" else None
    flat = pinned.tensor if pinned else torch.empty(threads * STAGE_BYTES, dtype=torch.uint8)
    work = iter([(e, start) for e in sorted(entries.values(), key=lambda e: -e.nbytes)
                 for start in range(0, e.nbytes, STAGE_BYTES)])
    take, files = threading.Lock(), _Files()

    def worker(i):
        slot = flat[i * STAGE_BYTES:(i + 1) * STAGE_BYTES]
        while True:
            with take:
                item = next(work, None)
            if item is None:
                return
            e, start = item
            files.fill(source, e, start, slot[:min(STAGE_BYTES, e.nbytes - start)])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    files.close()                                 # unmapping is part of the mmap source's cost
    seconds = time.perf_counter() - t0
    if pinned:
        pinned.close()
    nbytes = sum(e.nbytes for e in entries.values())
    return {"source": source, "threads": threads, "s": seconds, "bytes": nbytes, "gb_per_s": nbytes / 1e9 / seconds}


def host_to_device(device: torch.device, nbytes: int = 4 << 30) -> dict:
    """The reader's second half alone: pinned memory to the device, 64 MB copies on one stream."""
    from paradit.models.reader import PinnedBuffer
    host = PinnedBuffer(nbytes)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    piece = 64 << 20
    for _ in range(2):                            # the first pass warms the copy path
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, nbytes, piece):
            dev[start:start + piece].copy_(host.tensor[start:start + piece], non_blocking=True)
        sync(device)
        seconds = time.perf_counter() - t0
    host.close()
    del dev
    free(device)
    return {"s": seconds, "bytes": nbytes, "gb_per_s": nbytes / 1e9 / seconds}


def reader_halves(folder: Path, device: torch.device, sources: list[str], threads: int) -> dict:
    entries = expert_entries(folder)
    out = {f"host_read_{s}": host_read(entries, s, threads, device) for s in sources}
    if device.type == "cuda":
        out["host_to_device"] = host_to_device(device)
    return out


def experts_alone(folder: Path, device: torch.device, dtype: torch.dtype, source: str, threads: int) -> dict:
    """Every expert onto the device, side by side through one Reader, as load_pipeline_components does."""
    from paradit.checkpoint import locate, model_config
    from paradit.models.loading import load_transformer
    from paradit.models.reader import Reader

    ck = locate(folder)
    cfg = model_config(ck)
    stats = [{} for _ in ck.experts]

    def experts():
        with Reader(device, threads=threads, source=source) as reader, ThreadPoolExecutor(len(ck.experts)) as pool:
            models = list(pool.map(lambda k: load_transformer(ck.experts[k], dtype=dtype, device=device, config=cfg,
                                                              stats=stats[k], reader=reader), range(len(ck.experts))))
            return models, dict(reader.stats)
    free(device)
    (models, reader_stats), seconds = timed(experts, device)
    out = {"s": seconds, "bytes": sum(s.get("bytes", 0) for s in stats), "source": source, "threads": threads,
           "staging_s": reader_stats["staging_s"], "staging_gb": reader_stats["staging_bytes"] / 1e9, **memory(device)}
    del models
    free(device)
    return out


def components_alone(folder: Path, device: torch.device, dtype: torch.dtype, threads: int) -> dict:
    """Each component onto the device from a warm page cache, one after the other."""
    from paradit.checkpoint import locate, model_config
    from paradit.models.text_encoder import TextEncoder
    from paradit.models.vae import VideoVAE

    ck = locate(folder)
    cfg = model_config(ck)
    out = {"experts": experts_alone(folder, device, dtype, "pread", threads)}   # the loader's source
    read = {"text_encoder": {}, "vae": {}}
    te, seconds = timed(lambda: TextEncoder.from_pretrained(ck.component("text_encoder"), ck.component("tokenizer"),
                                                             cfg.text_len, dtype=dtype, device=device,
                                                             stats=read["text_encoder"]), device)
    out["text_encoder"] = {"s": seconds, "bytes": read["text_encoder"].get("bytes", 0)}
    del te
    free(device)
    vae, seconds = timed(lambda: VideoVAE.from_pretrained(ck.component("vae"), device, stats=read["vae"]), device)
    out["vae"] = {"s": seconds, "bytes": read["vae"].get("bytes", 0)}
    del vae
    free(device)
    for part in out.values():
        part["gb_per_s"] = part["bytes"] / 1e9 / part["s"] if part["s"] else None
    return out


def whole_startup(folder: Path, device: torch.device, offload: str) -> tuple[object, dict]:
    from paradit.pipeline import Pipeline
    free(device)
    pipe, seconds = timed(lambda: Pipeline.from_pretrained(str(folder), device=str(device), offload=offload), device)
    read = sum(s.get("bytes", 0) for s in pipe.load_stats.values())
    return pipe, {"offload": offload, "s": seconds, "bytes": read, "gb_per_s": read / 1e9 / seconds,
                  "phases_s": dict(pipe.startup), "phases_gb_per_s": phase_rates(pipe), **memory(device)}


def phase_rates(pipe) -> dict:
    """GB/s of each loading phase: the bytes it read over its seconds (the phases overlap: each
    one's rate is what it got while sharing the host with the others)."""
    t = pipe.startup
    parts = {"weights_s": [k for k in pipe.load_stats if k not in ("text_encoder", "vae")],
             "text_encoder_s": ["text_encoder"], "vae_s": ["vae"]}
    out = {}
    for phase, names in parts.items():
        nbytes = sum(pipe.load_stats[n].get("bytes", 0) for n in names if n in pipe.load_stats)
        if nbytes and t.get(phase):
            out[phase.replace("_s", "")] = nbytes / 1e9 / t[phase]
    return out


def step_times(pipe, settings: dict, device: torch.device) -> dict:
    """One request; every evaluation timed with the device synchronised before and after it."""
    times, velocity = [], pipe.denoiser.velocity

    def timed_velocity(*args, **kw):
        sync(device)
        t0 = time.perf_counter()
        v = velocity(*args, **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
        return v
    pipe.denoiser.velocity = timed_velocity
    try:
        pipe(PROMPT, output="latent", progress=False, **settings)
    finally:
        del pipe.denoiser.velocity        # back to the method
    experts = [k for _, k, _ in pipe.record.trace]
    switch = next((i for i in range(1, len(experts)) if experts[i] != experts[i - 1]), None)
    return {"offload": pipe.offload, "steps_s": times, "median_s": statistics.median(times), "max_s": max(times),
            "after_switch_s": times[switch] if switch is not None else None, "switch_index": switch,
            "experts": experts, "text_encoder_s": pipe.record.timings.get("text_encoder_s"), **memory(device)}


# ----------------------------------------------------------------------------- the report
def table(result: dict) -> str:
    rows = [("what", "seconds", "GB", "GB/s", "peak alloc GB")]
    for name, part in result.get("reader", {}).items():
        what = f"{name} ({part['threads']} threads)" if "threads" in part else name
        rows.append((what, f"{part['s']:.3f}", f"{part['bytes'] / 1e9:.2f}", f"{part['gb_per_s']:.2f}", "-"))
    alone = dict(result["alone"])
    for source, part in result.get("experts_by_source", {}).items():
        alone[f"experts, {source},"] = part
    for name, part in alone.items():
        if "source" in part:
            name = f"{name} {part['threads']} threads (pinning {part['staging_s']:.2f} s)"
        rows.append((f"{name} alone", f"{part['s']:.3f}", f"{part['bytes'] / 1e9:.2f}",
                     f"{part['gb_per_s']:.2f}" if part["gb_per_s"] else "-",
                     f"{part.get('peak_allocated_gb', float('nan')):.1f}" if "peak_allocated_gb" in part else "-"))
    s = result["startup"]
    rows.append((f"start-up (offload {s['offload']})", f"{s['s']:.3f}", f"{s['bytes'] / 1e9:.2f}",
                 f"{s['gb_per_s']:.2f}", f"{s['peak_allocated_gb']:.1f}" if "peak_allocated_gb" in s else "-"))
    for phase, rate in s.get("phases_gb_per_s", {}).items():
        rows.append((f"  {phase} (inside the start-up)", f"{s['phases_s'][phase + '_s']:.3f}", "", f"{rate:.2f}", ""))
    for st in result["steps"]:
        after = f", after the switch {st['after_switch_s']:.3f}" if st["after_switch_s"] is not None else ""
        rows.append((f"step, offload {st['offload']}", f"{st['median_s']:.3f} (max {st['max_s']:.3f}{after})", "",
                     "", f"{st['peak_allocated_gb']:.1f}" if "peak_allocated_gb" in st else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint folder (diffusers layout), or 'tiny'")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--memory-cap-gb", type=float, help="cap this process's CUDA memory at this many GB (1e9 bytes)")
    ap.add_argument("--size", default=None, help="WxH of the timed steps (default: the model's)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=4, help="sampler steps of the timed request (both experts run; "
                    "0: no steps)")
    ap.add_argument("--offload-modes", default="none,experts", help="comma-separated modes to time steps under")
    ap.add_argument("--sources", default="pread,mmap", help="comma-separated reader sources to time the experts with")
    ap.add_argument("--threads", type=int, default=None, help="reader threads (default: what the loader uses)")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    return ap.parse_args(argv)


def bench_device(args) -> torch.device:
    """--device (auto: CUDA if there is one), its memory capped at --memory-cap-gb."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.memory_cap_gb:
        if device.type != "cuda":
            raise SystemExit("--memory-cap-gb caps CUDA memory; this run is on the CPU")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 1e9 / total), device)
    return device


def measure_components(folder: Path, device: torch.device, dtype: torch.dtype, args) -> dict:
    """Steps 0 and 1: the reader's two halves, each component alone, the experts once per source."""
    from paradit.checkpoint import reader_threads
    sources, threads = args.sources.split(","), args.threads or reader_threads(1)
    result = {"reader": reader_halves(folder, device, sources, threads)}
    print("reader:", json.dumps(result["reader"]), flush=True)
    result["alone"] = components_alone(folder, device, dtype, threads)
    print("alone:", json.dumps(result["alone"]), flush=True)
    result["experts_by_source"] = {}
    for source in sources:
        part = experts_alone(folder, device, dtype, source, threads)
        part["gb_per_s"] = part["bytes"] / 1e9 / part["s"]
        result["experts_by_source"][source] = part
        print(f"experts ({source}):", json.dumps(part), flush=True)
    return result


def measure_modes(folder: Path, device: torch.device, args) -> dict:
    """Steps 2 and 3, once per --offload-modes entry: the whole start-up, then the timed steps."""
    settings = {"steps": args.steps, "frames": args.frames}
    if args.size:
        settings["width"], settings["height"] = (int(v) for v in args.size.lower().split("x"))
    result = {"steps": []}
    modes = args.offload_modes.split(",")
    for i, mode in enumerate(modes):
        pipe, startup = whole_startup(folder, device, mode)
        if i == 0:
            result["startup"] = startup
        result.setdefault("startups", []).append(startup)
        if args.steps:
            result["steps"].append(step_times(pipe, settings, device))
        print(f"offload {mode}: start-up", json.dumps(startup), "steps",
              json.dumps(result["steps"][-1] if args.steps else None), flush=True)
        del pipe
        free(device)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    from launcher import environment, machine_description, machine_tag, results_path, write_json
    device = bench_device(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = tempfile.TemporaryDirectory(prefix="paradit_startup_") if args.checkpoint == "tiny" else None
    folder = write_tiny(Path(tmp.name)) if tmp else Path(args.checkpoint)
    try:
        warm_gb = warm_page_cache(folder)
        result = {"checkpoint": str(args.checkpoint), "device": str(device), "dtype": str(dtype),
                  "memory_cap_gb": args.memory_cap_gb, "page_cache_warmed_gb": warm_gb,
                  "machine": machine_description(device.type), "environment": environment(),
                  "threads": threading.active_count()}
        result |= measure_components(folder, device, dtype, args)
        result |= measure_modes(folder, device, args)
    finally:
        if tmp:
            tmp.cleanup()
    print(table(result))
    path = write_json(results_path("startup", "json", args.out, machine_tag(device.type)), result)
    print(f"wrote {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

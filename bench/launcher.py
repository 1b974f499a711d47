"""Where a benchmark runs and how its worlds start: machine names, result paths, process launch.

One launcher for both kinds of machine:
  * CPU: paradit.launch.spawn, N gloo processes of one thread each.
  * GPU: N processes, one per GPU, each given the torchrun environment (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE, LOCAL_RANK) and joining NCCL through paradit.launch.init_distributed.
`run_world(fn, world, *args)` returns fn's result from every rank, in rank order, either way.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import traceback
from pathlib import Path

import torch

from paradit.launch import free_port, init_distributed, shutdown, spawn

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- the machine
def has_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_name() -> str:
    return torch.cuda.get_device_name(0)


def machine_tag(device_type: str | None = None) -> str:
    """'cpu2' (cores), 'h100x1', 'h200x8' (GPU kind and count); the file-name part of results."""
    device_type = device_type or ("cuda" if has_cuda() else "cpu")
    if device_type == "cpu":
        return f"cpu{cpu_cores()}"
    name = gpu_name().lower()
    kind = re.search(r"\b([abhlv]\d{2,3}|gb?\d{3}|mi\d{3}x?)\b", name)
    kind = kind.group(1) if kind else re.sub(r"[^a-z0-9]+", "", name.replace("nvidia", ""))[:12]
    return f"{kind}x{torch.cuda.device_count()}"


def machine_description(device_type: str) -> str:
    """For plot titles and JSON: the CPU model and cores, or the GPU name and count."""
    if device_type == "cpu":
        return f"{cpu_model()}, {cpu_cores()} cores"
    return f"{torch.cuda.device_count()} x {gpu_name()}"


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "cpu": cpu_model(), "cpu_cores": cpu_cores(),
           "loadavg_1_5_15_min": os.getloadavg()}   # the machine may be shared: how busy it was
    if has_cuda():
        env |= {"gpu": gpu_name(), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    return env


# ----------------------------------------------------------------------------- results
def results_path(what: str, ext: str, out_dir: str | Path | None = None, tag: str | None = None) -> Path:
    """<out_dir>/<YYYY-MM-DD>_<machine>_<what>.<ext> (STYLE.md point 8)."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{datetime.date.today().isoformat()}_{tag or machine_tag()}_{what}.{ext}"


def write_json(path: Path, data: dict) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(x):
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


# ----------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux: writing 5 to clear_refs); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- launching
def run_world(fn, world: int, *args, device_type: str = "cpu", timeout_s: float = 600.0) -> list:
    """fn(*args) on `world` local ranks (gloo on CPU, NCCL one process per GPU); results by rank."""
    if device_type == "cpu":
        return spawn(fn, world, *args, timeout_s=timeout_s)
    if world > torch.cuda.device_count():
        raise ValueError(f"world {world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    return _spawn_cuda(fn, world, args, timeout_s)


def _cuda_worker(rank, world, port, fn, args, queue, timeout_s):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        init_distributed(None, timeout_s=timeout_s)   # cuda:LOCAL_RANK, NCCL when world > 1
        queue.put((rank, True, fn(*args)))
    except BaseException as err:  # report everything to the parent, which names the rank
        queue.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        shutdown()


def _spawn_cuda(fn, world: int, args: tuple, timeout_s: float) -> list:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_cuda_worker, args=(r, world, port, fn, args, queue, timeout_s), daemon=True)
             for r in range(world)]   # daemons: they die with this process if it is killed
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout_s)
            (results if ok else errors)[rank] = value
            if errors:
                break
    except Exception as err:  # queue.Empty: a rank hung or died without reporting
        errors[-1] = f"timed out after {timeout_s:.0f}s waiting for ranks ({err!r})"
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 2)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed: {errors[rank]}")
    return [results[r] for r in range(world)]

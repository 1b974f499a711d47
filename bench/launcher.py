"""Where a benchmark runs and how its worlds start: machine names, result paths, process launch.

One launcher for both kinds of machine:
  * CPU: paradit.launch.spawn, N gloo processes of one thread each.
  * GPU: N processes, one per GPU, each given the torchrun environment (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE, LOCAL_RANK) and joining NCCL: paradit.launch.spawn(device="cuda").
`run_world(fn, world, *args)` returns fn's result from every rank, in rank order, either way.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
from pathlib import Path

import torch

from paradit.demo.data import RECIPES, all_prompts
from paradit.launch import spawn

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


def rank_device(device_type: str) -> torch.device:
    """This rank's device: the GPU the launcher made current (one a rank), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA timing's end); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def code_revision() -> dict:
    """Which paradit was measured: the git commit (+uncommitted if the tree differs from it), and a
    digest of paradit's sources, which names the code where a copy of the tree has no .git."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted((root / "paradit").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    git = ["git", "-C", str(root)]
    try:
        rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=30)
        commit = rev.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"git": commit, "paradit_sha256": digest.hexdigest()[:12]}


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "cpu": cpu_model(), "cpu_cores": cpu_cores(), "code": code_revision(),
           "loadavg_1_5_15_min": os.getloadavg()}   # the machine may be shared: how busy it was
    if has_cuda():
        env |= {"gpu": gpu_name(), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda,
                "nccl": ".".join(map(str, torch.cuda.nccl.version())), "cudnn": torch.backends.cudnn.version(),
                "driver": _nvidia_driver()}
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


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


# ----------------------------------------------------------------------------- judged models
def judged_recipe(model: str):
    """The data recipe (paradit.demo.data.RECIPES) of a trained demo model, whose videos
    paradit.demo.judge can check against their prompts; None for any other model."""
    return RECIPES.get(model)


def judged_prompt(model: str, prompt: str) -> str:
    """`prompt` in a judged model's vocabulary: its first prompt that begins so ("a red circle moving
    right" is demo's own, "... slowly" demo64's, whose prompts all name a speed)."""
    recipe = judged_recipe(model)
    fits = [p for p in all_prompts(recipe)] if recipe else []
    fits = [p for p in fits if p == prompt or p.startswith(prompt + " ")]
    if not fits:
        raise ValueError(f"{prompt!r} is no prompt of {model!r}'s vocabulary, nor the start of one")
    return fits[0]


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
    return spawn(fn, world, *args, timeout_s=timeout_s, device=device_type)

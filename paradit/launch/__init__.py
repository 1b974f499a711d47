"""Process-group setup, chosen in one place: NCCL with one GPU per local rank, gloo on CPU.

`init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); without it the process is a world of one and no process group is created.
`spawn(fn, nprocs)` runs `fn(*args)` in N local gloo processes, for tests and CPU use.
"""
from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import pickle
import re
import socket
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paradit.errors import ParameterError
from paradit.plan.hardware import available_host_gb, gpu_preset

log = logging.getLogger("paradit")

MAX_TIMEOUT_S = 7 * 24 * 3600.0
MIN_TIMEOUT_S = 1.0  # the rendezvous itself waits this long: below it every rank fails there


def check_timeout(timeout_s, param: str = "timeout_s") -> float:
    """A collective timeout: a finite number of seconds in [1 s, one week]."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or not MIN_TIMEOUT_S <= timeout_s <= MAX_TIMEOUT_S:
        raise ParameterError(param, timeout_s, f"the collective timeout must be a finite number of seconds "
                             f"in [{MIN_TIMEOUT_S:g}, {MAX_TIMEOUT_S:g}]")
    return float(timeout_s)


def default_timeout_s() -> float:
    """PARADIT_TIMEOUT_S if set (checked like timeout_s), else 600 s."""
    env = os.environ.get("PARADIT_TIMEOUT_S")
    if env is None:
        return 600.0
    try:
        value = float(env)
    except ValueError:
        value = env
    return check_timeout(value, "PARADIT_TIMEOUT_S")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    host_gb: float | None = None   # host memory available at start, GB: the least of the world's hosts (None: unknown)
    ranks_per_host: int = 1        # ranks sharing one host's memory (torchrun's LOCAL_WORLD_SIZE)


def planner_gpu(device: torch.device) -> str | None:
    """The planner's GPU preset of `device` (from its name and memory: paradit.plan.hardware.gpu_preset);
    None off CUDA, whose memory the planner does not model."""
    if device.type != "cuda":
        return None
    return gpu_preset(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory / 1e9)


def pick_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """auto (cuda:local_rank if CUDA is available, else cpu), cpu, cuda or cuda:N."""
    if requested is None or requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not isinstance(requested, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", requested):
        raise ParameterError("device", requested, "choose auto, cpu, cuda or cuda:N")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("device", requested, "CUDA is not available on this machine", "use cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ParameterError("device", requested, f"this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


ALLOC_CONF = "expandable_segments:True"


def use_expandable_segments() -> None:
    """CUDA memory in segments that grow and shrink, unless PYTORCH_CUDA_ALLOC_CONF says otherwise.
    Encode, denoise and decode allocate in different sizes: with fixed segments an H100 held 84.2 GB
    reserved for 77.1 GB allocated at 832x480x81 (2026-12-06), 7 GB lost to fragmentation on a card
    where A14B at 720p fits with 3 GB to spare."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF          # read when CUDA initialises
    if torch.cuda.is_initialized():                             # a wrapper touched CUDA first
        torch.cuda.memory._set_allocator_settings(ALLOC_CONF)


def init_distributed(device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the torchrun world if there is one (idempotent). timeout_s: the collective timeout
    (default: default_timeout_s())."""
    timeout_s = default_timeout_s() if timeout_s is None else check_timeout(timeout_s)
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        use_expandable_segments()
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (VAE, norms) on tensor cores; the
        torch.backends.cudnn.allow_tf32 = True        # weights are bf16 anyway. Set once, here.
    if dev.type == "cpu":
        set_cpu_threads()
    if world == 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, dev, None, available_host_gb())
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = dict(device_id=dev) if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    setup_logging(dist.get_rank())
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(),
                    least_host_gb(dev if backend == "nccl" else torch.device("cpu")), local)


def least_host_gb(device: torch.device) -> float | None:
    """The least host memory available over the world's hosts (collective): every rank plans with the same
    figure, so no two ranks choose differently (a rank reading after another has started would see less)."""
    here = available_host_gb()
    t = torch.tensor([math.inf if here is None else here], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return None if math.isinf(t.item()) else t.item()


def cpu_threads(local_ranks: int, cores: int) -> int:
    """Torch's threads for one CPU rank: the cores shared by the node's ranks, but 1 where a rank
    would get 2 or fewer. Measured on a 2-core box (the demo model, 200 steps, one process): 1
    thread 1.9 s and 2 threads 2.1 s on an idle machine; with one other busy process 1.9 s against
    5.1-7.2 s, as OpenMP's threads wait on each other for a core."""
    per_rank = max(1, cores // max(1, local_ranks))
    return 1 if per_rank <= 2 else per_rank


@functools.cache
def set_cpu_threads() -> int:
    """Set torch's thread count for a CPU run, unless OMP_NUM_THREADS says it; log the choice; return it.
    Once per process (functools.cache: the first call's choice stands), so that init_distributed,
    called by each build, neither repeats the line nor undoes a torch.set_num_threads made since."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if os.environ.get("OMP_NUM_THREADS"):
        log.info("cpu threads: %d (OMP_NUM_THREADS=%s)", torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])
        return torch.get_num_threads()
    torch.set_num_threads(cpu_threads(local, cores))
    log.info("cpu threads: %d (%d cores, %d local rank%s)", torch.get_num_threads(), cores, local,
             "" if local == 1 else "s")
    return torch.get_num_threads()


RANK_HANDLER = "paradit-rank"   # the name of setup_logging's handler on the "paradit" logger


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors, tagged with their rank. The first
    call stands (generate.py calls it before the world exists, init_distributed after): the logger's
    own handlers say whether it was made."""
    if any(h.get_name() == RANK_HANDLER for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(RANK_HANDLER)
    handler.setFormatter(logging.Formatter(f"[paradit r{rank}] %(message)s"))
    log.addHandler(handler)
    log.setLevel(level if rank == 0 else logging.WARNING)
    log.propagate = False


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- local spawner
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How spawn() starts CPU ranks: a fresh interpreter per rank ("spawn": each imports torch and paradit
# anew, seconds of CPU a rank); or, with PARADIT_SPAWN_PRELOAD=module,module... in the environment,
# a fork of one server process that imported those modules once (a rank then starts in a fraction of
# a second). Test suites that spawn many small worlds use the latter (tests/conftest.py).
SPAWN_PRELOAD_ENV = "PARADIT_SPAWN_PRELOAD"


def use_forkserver(preload: list[str]) -> None:
    """Start spawn()'s CPU ranks from a fork server that imports `preload` once, from now on in this
    process and its children (it sets PARADIT_SPAWN_PRELOAD). Each rank still gets the caller's
    environment, working directory and sys.path as of its spawn() call, as with fresh interpreters."""
    os.environ[SPAWN_PRELOAD_ENV] = ",".join(preload)


def _worker(rank, world, port, fn, args, queue, timeout_s, device, env=None):
    if env is not None:  # a fork server's child: the caller's environment now, not the server's
        os.environ.clear()
        os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cpu":
        torch.set_num_threads(1)  # N processes share the machine's cores
    try:
        init_distributed(device, timeout_s=timeout_s)  # gloo on CPU; NCCL on cuda:LOCAL_RANK
        if device == "cpu" and dist.is_initialized():
            # Every rank connected before any runs fn: a rank whose fn returns at once (an error
            # raised before any collective) and exits cannot break a peer's gloo connect, still under way.
            dist.barrier()
        # Pickled here, by value: a tensor put on the queue as it is travels as a shared-memory handle
        # that the parent can only open while this process lives, and it may have exited by then.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException as err:  # report everything, including SystemExit, to the parent
        queue.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        shutdown()


class SpawnError(RuntimeError):
    pass


def spawn(fn, nprocs: int, *args, timeout_s: float = 300.0, device: str = "cpu") -> list:
    """Run fn(*args) on `nprocs` local ranks (device "cpu": gloo; "cuda": NCCL, one GPU a rank);
    return each rank's result, in rank order.

    fn must be importable (module-level). Any rank's exception is raised here naming the rank.
    """
    if device == "cuda" and nprocs > torch.cuda.device_count():
        raise ValueError(f"{nprocs} ranks need {nprocs} GPUs; this machine has {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    preload = [m for m in os.environ.get(SPAWN_PRELOAD_ENV, "").split(",") if m]
    forkserver = device == "cpu" and bool(preload)
    ctx = mp.get_context("forkserver" if forkserver else "spawn")
    if forkserver:
        ctx.set_forkserver_preload(preload)
    env = dict(os.environ) if forkserver else None
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, fn, args, queue, timeout_s, device, env),
                         daemon=True)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(nprocs):
            rank, ok, value = queue.get(timeout=timeout_s)
            (results if ok else errors)[rank] = pickle.loads(value) if ok else value
            if errors:
                break
    except Exception as err:  # queue.Empty: a rank hung or died without reporting
        errors[-1] = f"timed out after {timeout_s:.0f}s waiting for ranks ({err!r})"
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise SpawnError(f"rank {rank} failed: {errors[rank]}")
    return [results[r] for r in range(nprocs)]

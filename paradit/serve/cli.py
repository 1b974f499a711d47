"""`python -m paradit.serve` (also under `torchrun --nproc-per-node W`), with generate's layout flags.

    torchrun --nproc-per-node 2 -m paradit.serve --experts split --port 8000 --state-dir /var/lib/paradit

Every rank validates the flags and builds its part of the pipeline once; rank 0 also owns the
state directory (SQLite jobs, videos), serves HTTP and schedules. Then every rank runs jobs as its
lane receives them (paradit.serve.engine) until it is stopped. A failure on any rank ends the
whole service with that rank's reason, after marking the job it was running failed; the exit
status is non-zero so that a supervisor restarts it, and the restart resumes the queue.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("paradit")


def parse_args(argv=None) -> argparse.Namespace:
    from paradit.config import PRESETS
    from paradit.generate import add_layout_args
    p = argparse.ArgumentParser(prog="python -m paradit.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="demo", help=f"preset ({', '.join(sorted(PRESETS))}) or checkpoint folder")
    p.add_argument("--components", help="diffusers-layout folder with text_encoder/, tokenizer/, vae/ for an "
                                        "original-layout --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; other than loopback it needs "
                                                      "--api-key (or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the address is printed)")
    p.add_argument("--api-key", default=None, help="clients must send `Authorization: Bearer KEY` to /v1 "
                                                  "(default: the environment variable PARADIT_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="listen beyond loopback without an API key")
    p.add_argument("--state-dir", default="outputs/serve", help="jobs (SQLite) and videos; a restart resumes them")
    p.add_argument("--max-queue", type=int, default=64, help="queued jobs beyond which POST answers 429")
    p.add_argument("--max-steps", type=int, default=200, help="largest num_inference_steps a request may ask")
    p.add_argument("--max-video-tokens", type=int, help="largest video a request may ask, in transformer "
                                                        "tokens (default: 4x the model's default video)")
    p.add_argument("--save-latents", action="store_true", help="also write each final latent (.safetensors)")
    p.add_argument("--timeout", type=float, default=None, help="collective timeout in seconds (idle time "
                                                               "never counts: idle ranks wait outside collectives)")
    add_layout_args(p)
    args = p.parse_args(argv)
    args.api_key = args.api_key or os.environ.get("PARADIT_API_KEY") or None
    return args


def check_args(args) -> None:
    """The server's own flags, on every rank, before any weights exist; ValueError with the fix."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: give 0-65535 (0: any free port)")
    for flag in ("max_queue", "max_steps", "max_video_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: give a number >= 1")
    if not (args.api_key or args.insecure or is_loopback(args.host)):
        raise ValueError(f"--host {args.host} accepts connections from other machines: set --api-key KEY (or "
                         f"PARADIT_API_KEY) so that only clients with the key can use /v1, or pass --insecure")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def lock_state_dir(state_dir: Path):
    """One service per state directory: an exclusive lock, released by the OS however we exit."""
    state_dir.mkdir(parents=True, exist_ok=True)
    f = open(state_dir / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise ValueError(f"--state-dir {state_dir} is in use by another paradit serve (pid {f.read().strip()}); "
                         f"stop it or give another --state-dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def start_http(app, host: str, port: int):
    """uvicorn in a thread of rank 0, on a socket bound here (so a taken port is a clear error)."""
    import uvicorn
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); give another "
                         f"--port (0: any free one)") from None
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                            limit_concurrency=512)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="paradit-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start (see its log above)")
        time.sleep(0.01)
    return server, sock.getsockname()[1]


@dataclass
class Parts:
    """What the failure path needs to reach."""
    worker: object = None
    scheduler: object = None
    http: object = None
    lock: object = None   # the state directory's lock file, held for the life of the process


def run(args, info, parts: Parts) -> None:
    import torch

    from paradit.generate import model_config, offload_mode, resolve_layout
    from paradit.models.attention import pick_backend
    from paradit.serve.schema import Limits
    from paradit.settings import VideoSettings

    # 1. validate everything before any weights exist (every rank)
    check_args(args)
    cfg = model_config(args.model, args.components)
    defaults = VideoSettings.resolve(cfg)  # the layout and offload are planned for the model's default video
    layout = resolve_layout(args, cfg, info, defaults)
    pick_backend(info.device, torch.bfloat16 if info.device.type == "cuda" else torch.float32, args.attention)
    if cfg.task != "t2v":
        raise ValueError(f"--model {args.model} is an image-to-video model ({cfg.task}); the service takes text "
                         f"prompts only so far: serve a text-to-video model")
    limits = Limits(args.max_steps, args.max_video_tokens or Limits.default_video_tokens(cfg))
    state_dir = Path(args.state_dir)

    # 2. rank 0: the state directory and the HTTP front, answering 503 until the models are loaded
    service = None
    if info.rank == 0:
        from paradit.serve.api import Service, create_app
        from paradit.serve.jobs import JobStore
        parts.lock = lock_state_dir(state_dir)
        shown = {"size": f"{cfg.size[0]}x{cfg.size[1]}", "num_frames": cfg.frames, "num_inference_steps": cfg.steps,
                 "guidance_scale": list(cfg.guidance)}
        service = Service(args.model, JobStore(state_dir), args.api_key, args.max_queue, layout.describe(), shown)
        parts.http, port = start_http(create_app(service), args.host, args.port)
        print(f"paradit: serving {args.model} on http://{args.host}:{port} (loading the models)", flush=True)

    # 3. build (every rank its part), then settle what an earlier run left in the state directory
    from paradit.pipeline import Pipeline
    from paradit.serve.engine import Channel, Worker
    needed = {layout.coords(info.rank)["stage"]} if layout.stages else None
    pipe = Pipeline.from_pretrained(args.model, parallel=layout, device=args.device, backend=args.attention,
                                    experts_needed=needed, components=args.components,
                                    offload=offload_mode(args, cfg, layout, defaults, info.device))
    channel = Channel()
    parts.worker = Worker(pipe, channel, state_dir, args.save_latents)
    if info.rank == 0:
        from paradit.serve.scheduler import Scheduler
        from paradit.serve.schema import Checker
        service.checker = Checker(cfg, args.model, copy.deepcopy(pipe.text_encoder.tokenizer), limits)
        settled = service.jobs.recover(args.model, service.checker.recheck)
        if any(settled.values()):
            log.info("state directory: %(requeued)d interrupted jobs back in the queue, %(failed)d failed, "
                     "%(missing)d completed jobs without their video", settled)
        lanes = 1 if layout.stages else layout.dp
        parts.scheduler = service.scheduler = Scheduler(service.jobs, channel, lanes, bool(layout.stages),
                                                        len(layout.stage_degrees), info.world_size,
                                                        service.metrics).start()
        print(f"paradit: ready ({layout.describe()}; {service.jobs.counts()['queued']} jobs queued)", flush=True)

    # 4. serve until stopped
    parts.worker.run()


def stop_on_sigterm() -> None:
    """SIGTERM (a supervisor's stop) ends rank 0 like Ctrl-C: the jobs in flight go back to the queue."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    from paradit.launch import init_distributed, setup_logging, shutdown
    from paradit.launch.faults import (EXIT_PEER_FAILED, AbortWatcher, count_reported, peer_failure,
                                       report_failure, say_error, wait_for_reports)
    from paradit.models.loading import CheckpointError

    args = parse_args(argv)
    parts, watcher, code = Parts(), None, 0
    rank = int(os.environ.get("RANK", 0))
    try:
        info = init_distributed(args.device, args.timeout)
        setup_logging(info.rank)
        if rank == 0:
            stop_on_sigterm()
        elif info.world_size > 1:  # rank 0's scheduler watches the abort key itself (it settles the jobs first)
            watcher = AbortWatcher().start()
        run(args, info, parts)
    except (ValueError, CheckpointError) as err:      # the user's flags: a clear message, exit 2
        code, message = 2, str(err)
    except KeyboardInterrupt:
        if parts.scheduler is not None:
            parts.scheduler.stop()
            print("paradit: stopped; jobs that were running are back in the queue", flush=True)
        os._exit(0)  # a clean stop; the lanes got their stop command
    except Exception as err:                          # a bug, a broken machine, or a failed peer
        peer = peer_failure()
        if peer is None:
            traceback.print_exc()
        code, message = (EXIT_PEER_FAILED, f"stopping because {peer}") if peer else (1, f"{type(err).__name__}: {err}")
        if parts.worker is not None and peer is None:
            parts.worker.report_failure(message)      # the job this rank ran is marked failed first
    if code:
        if watcher is not None:
            watcher.stop()
        if parts.scheduler is not None:               # rank 0: settle the jobs, then end like the others
            parts.scheduler.end_after_failure(message, code)
        say_error(f"paradit: error (rank {rank}): {message}")
        count_reported()
        if code != EXIT_PEER_FAILED:
            report_failure(message)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1 and not dist_ready():
            time.sleep(3.0)  # failed before the process group existed: no store to wait on
        wait_for_reports(world)
        sys.stderr.flush()
        os._exit(code)
    if watcher is not None:
        watcher.stop()
    shutdown()
    return 0


def dist_ready() -> bool:
    import torch.distributed as dist
    return dist.is_initialized()

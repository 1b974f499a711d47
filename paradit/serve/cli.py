"""`python -m paradit.serve` (also under `torchrun --nproc-per-node W`), with generate's layout flags.

    torchrun --nproc-per-node 2 -m paradit.serve --experts split --port 8000 --state-dir /var/lib/paradit

Every rank validates the flags and builds its part of the pipeline once; rank 0 also owns the
state directory (SQLite jobs, videos), serves HTTP and schedules. Then every rank runs jobs as its
lane receives them (paradit.serve.engine) until it is stopped. A failure on any rank ends the
whole service with that rank's reason, after marking the job it was running failed; the exit
status is non-zero so that a supervisor restarts it, and the restart resumes the queue.
"""
from __future__ import annotations

import copy
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("paradit")


# generate's flags that describe one run's requests, which a service takes from each request instead;
# every other flag of generate's (the model, the machine, the layout, the build, CHORDS) is the
# server's too, with the same definition, resolved by the same function (paradit.cli.spec.resolve)
# (--size, --frames, --steps, --shift, --guidance, --sampler, --negative-prompt: the server's default
# request, which a request's own fields override; a request's seed is its own or random)
PER_REQUEST = ("--prompt", "--prompts-file", "--image", "--seed", "--out", "--chords-stream", "--no-progress")


def serve_flags():
    from paradit.cli.flags import FLOAT, INT, PATH, Flag
    return (
        Flag("--host", str, "127.0.0.1", "address to listen on; another than loopback needs --api-key (or "
             "--insecure)", "127.0.0.1", metavar="ADDR"),
        Flag("--port", INT, 8000, "0: any free port (the address is printed)", "8000", metavar="N"),
        Flag("--api-key", str, None, "clients must send `Authorization: Bearer KEY` to /v1",
             "the environment variable PARADIT_API_KEY", metavar="KEY"),
        Flag("--insecure", help="listen beyond loopback without an API key"),
        Flag("--state-dir", PATH, "outputs/serve", "jobs (SQLite) and videos; a restart resumes them",
             "outputs/serve", metavar="DIR"),
        Flag("--max-queue", INT, 64, "queued jobs beyond which POST /v1/videos answers 429", "64", metavar="N"),
        Flag("--max-steps", INT, 200, "the most num_inference_steps a request may ask", "200", metavar="N"),
        Flag("--max-video-tokens", INT, None, "the largest video a request may ask, in transformer tokens",
             "4x the model's default video, or the server's --size and --frames if larger", metavar="N"),
        Flag("--lora-dir", PATH, None, "a folder of LoRAs (NAME.safetensors) that requests may list by name "
             "(\"loras\": [{\"name\", \"scale\", \"expert\"}]): merged on the GPU per job, the base weights "
             "restored exactly when the set changes", None, metavar="DIR"),
        Flag("--request-timeout", FLOAT, 10.0, "seconds a request's headers, and then its body, may take to "
             "arrive (408 and a close after)", "10", metavar="S"),
    )


def parse_args(argv=None):
    """-> paradit.cli.flags.Flags: the shared flags as generate parses them, and the server's own.
    generate's other flags are there at their defaults, so that its combination rules apply."""
    from paradit.cli.flags import FLAGS, Flags, build_parser, raw_values, spec_flags
    argv = list(sys.argv[1:] if argv is None else argv)
    every = FLAGS + spec_flags()
    flags = tuple(f for f in every if f.name not in PER_REQUEST) + serve_flags()
    ns = build_parser("python -m paradit.serve", __doc__, flags).parse_args(argv)
    values = {f.dest: f.default for f in every} | vars(ns)
    values["api_key"] = values["api_key"] or os.environ.get("PARADIT_API_KEY") or None
    return Flags(values, raw_values(argv))


def check_args(flags) -> None:
    """The server's own flags, on every rank, before any weights exist; ValueError with the fix."""
    if not 0 <= flags.port <= 65535:
        raise ValueError(f"--port {flags.port}: give 0-65535 (0: any free port)")
    for name in ("max_queue", "max_steps", "max_video_tokens"):
        value = getattr(flags, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a number >= 1")
    if not 0 < flags.request_timeout <= 3600:
        raise ValueError(f"--request-timeout {flags.request_timeout}: give seconds in (0, 3600]")
    if not (flags.api_key or flags.insecure or is_loopback(flags.host)):
        raise ValueError(f"--host {flags.host} accepts connections from other machines: set --api-key KEY (or "
                         f"PARADIT_API_KEY) so that only clients with the key can use /v1, or pass --insecure")
    bad = next((i for i, ch in enumerate(flags.api_key or "") if not " " < ch <= "~"), None)
    if bad is not None:   # the key itself is never printed
        raise ValueError(f"--api-key (or PARADIT_API_KEY): its character {bad + 1} is a space or not printable "
                         f"ASCII; clients send a header's other bytes in encodings of their own (curl UTF-8, the "
                         f"server reads Latin-1) and drop its edge spaces, so no client could match it: use "
                         f"letters, digits and punctuation")


def is_loopback(host: str) -> bool:
    """Every address the name resolves to (IPv4 and IPv6: `::1`, `localhost`) is loopback."""
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
        return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)
    except (OSError, ValueError):
        return False


def lock_state_dir(state_dir: Path):
    """One service per state directory: an exclusive lock, released by the OS however we exit."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        f = open(state_dir / "lock", "a+")
    except OSError as err:   # a file in its place, a parent that is one, a place nothing can be created
        why = "it is a file" if state_dir.is_file() else f"cannot create it ({err.strerror})"
        raise ValueError(f"--state-dir {state_dir}: {why}; name a folder the service may write (made if "
                         f"missing)") from None
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


@dataclass
class Parts:
    """What the failure path needs to reach."""
    worker: object = None
    scheduler: object = None
    http: object = None
    lock: object = None   # the state directory's lock file, held for the life of the process


def run(flags, info, parts: Parts) -> None:
    from paradit.cli.spec import resolve
    from paradit.serve.schema import Checker

    # 1. validate everything before any weights exist (every rank): generate's resolve, the same spec
    check_args(flags)
    spec = resolve(flags, info)
    cfg = spec.cfg
    lora_dir = lora_folder(flags, spec) if flags.lora_dir else None
    limits = limits_of(flags, spec)
    state_dir = Path(flags.state_dir)

    # 2. rank 0: the state directory and the HTTP front, answering 503 until the models are loaded
    service = open_front(flags, spec, parts) if info.rank == 0 else None

    # 3. build (every rank its part) and warm up compiled blocks, then settle the state directory
    from paradit.pipeline import Pipeline
    from paradit.serve.engine import Channel, Worker
    pipe = Pipeline.from_spec(spec.build)
    if spec.build.compile:   # the graphs of the server's default request (spec.settings), before it says ready
        pipe.warmup(**spec.settings.__dict__)
    pipe.check_finite = spec.check_finite
    channel = Channel()
    parts.worker = Worker(pipe, channel, state_dir, spec.save_latents, spec.chords, lora_dir,
                          lora_base(spec) if lora_dir else None)
    if info.rank == 0:
        checker = Checker(cfg, flags.model, copy.deepcopy(pipe.text_encoder.tokenizer), limits, spec.settings,
                          flags.cache, spec.chords, spec.layout)
        checker.state_dir, checker.negative = state_dir, spec.negative_prompt
        checker.lora_names = None if lora_dir is None else frozenset(p.stem for p in lora_dir.glob("*.safetensors"))
        start_scheduling(service, checker, channel, spec.layout, info.world_size, parts)

    # 4. serve until stopped
    parts.worker.run()


def limits_of(flags, spec):
    """--max-steps and --max-video-tokens (default: 4x the model's or the default request's video),
    refused where they would refuse the server's own default request (what a request leaves out)."""
    from paradit.serve.schema import Limits
    s, cfg = spec.settings, spec.cfg
    limits = Limits(flags.max_steps, flags.max_video_tokens or Limits.default_video_tokens(cfg, s))
    if s.steps > limits.max_steps:
        raise ValueError(f"--steps {s.steps}: above --max-steps {limits.max_steps}, so every request that gives no "
                         f"num_inference_steps would be refused; lower --steps or raise --max-steps")
    tokens = cfg.num_tokens(s.width, s.height, s.frames)
    if tokens > limits.max_video_tokens:
        raise ValueError(f"the default video ({s.width}x{s.height}, {s.frames} frames) is {tokens} tokens, above "
                         f"--max-video-tokens {limits.max_video_tokens}, so every request that gives no size and "
                         f"frames would be refused; make it smaller or raise --max-video-tokens")
    return limits


def lora_folder(flags, spec) -> Path:
    """--lora-dir, checked on every rank before any weights are built: a folder of LoRAs that fit the
    model, on a build whose weights a job may change in place (whole, not FP8, not offloaded)."""
    from paradit.models.lora import LoraError, LoraSpec, check_loras
    folder = Path(flags.lora_dir)
    if not folder.is_dir():
        raise ValueError(f"--lora-dir {folder}: no such folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"--lora-dir {folder} holds no .safetensors files (the LoRAs requests name)")
    b = spec.build
    if b.quant != "none" or b.layout.shard_weights != "none" or b.offload in ("experts", "all", "layers"):
        raise ValueError(f"--lora-dir: per-request LoRAs change the experts' weights in place, which are FP8 "
                         f"(--quant {b.quant}), sharded (--shard-weights {b.layout.shard_weights}) or offloaded "
                         f"(--offload {b.offload}) here; serve them whole, or merge fixed LoRAs with --lora")
    try:
        check_loras([LoraSpec(f) for f in files], spec.cfg, warn=False)   # headers: every file fits the model
    except LoraError as err:
        raise ValueError(f"--lora-dir {folder}: every .safetensors file in it must be a LoRA of {spec.cfg.name} "
                         f"(requests may name any of them); move out or replace: {err}") from None
    return folder


def lora_base(spec) -> list | None:
    """Where per-request LoRA sets get the base weights back from (paradit.models.lora_sets): each
    expert's checkpoint folder, for a checkpoint read from disk with no LoRA merged at load; None (host
    copies of the weights a set touches) for a preset built in memory, or weights with --lora merged."""
    from paradit.components import PRESET_BUILDERS
    b = spec.build
    if b.model in PRESET_BUILDERS or b.loras:
        return None
    from paradit.checkpoint import locate
    return list(locate(b.model, b.components).experts)


def open_front(flags, spec, parts: Parts):
    """Rank 0: lock and open the state directory, start HTTP (503 until ready); -> the Service."""
    from paradit.serve.api import Service, create_app
    from paradit.serve.jobs import JobStore
    from paradit.serve.server import start_http, url
    state_dir = Path(flags.state_dir)
    parts.lock = lock_state_dir(state_dir)
    s = spec.settings   # the default request: the model's, or the server's --size, --steps, ...
    shown = {"size": f"{s.width}x{s.height}", "num_frames": s.frames, "num_inference_steps": s.steps,
             "guidance_scale": list(s.guidance)}
    service = Service(flags.model, JobStore(state_dir), flags.api_key, flags.max_queue, spec.layout.describe(),
                      shown, request_timeout_s=flags.request_timeout, takes_images=spec.cfg.task != "t2v")
    parts.http, port = start_http(create_app(service), flags.host, flags.port, flags.request_timeout)
    print(f"paradit: serving {flags.model} on {url(flags.host, port)} (loading the models)", flush=True)
    return service


def start_scheduling(service, checker, channel, layout, world_size: int, parts: Parts) -> None:
    """Rank 0, once the models are loaded: settle the state directory, start the scheduler, say ready."""
    from paradit.serve.scheduler import Scheduler
    service.checker = checker
    settled = service.jobs.recover(service.model, checker.recheck)
    if any(settled.values()):
        log.info("state directory: %(requeued)d interrupted jobs back in the queue, %(failed)d failed, "
                 "%(missing)d completed jobs without their video, %(temporaries)d unfinished files and %(inputs)d "
                 "first frames of ended jobs removed", settled)
    lanes = 1 if layout.stages else layout.dp
    parts.scheduler = service.scheduler = Scheduler(service.jobs, channel, lanes, bool(layout.stages),
                                                    len(layout.stage_degrees), world_size, service.metrics).start()
    print(f"paradit: ready ({layout.describe()}; {service.jobs.counts()['queued']} jobs queued)", flush=True)


def stop_on_sigterm() -> None:
    """SIGTERM (a supervisor's stop) ends rank 0 like Ctrl-C: the jobs in flight go back to the queue."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    """Serve; on any rank's failure every rank exits non-zero with the reason (paradit.generate's
    classification and report), rank 0 after settling the jobs in the state directory."""
    from paradit.cli.flags import flag_terms
    from paradit.generate import failure, report
    from paradit.launch import init_distributed, setup_logging, shutdown
    from paradit.launch.faults import EXIT_PEER_FAILED, AbortWatcher

    parts, watcher = Parts(), None
    try:
        flags = parse_args(argv)
        with flag_terms(flags):
            info = init_distributed(flags.device, flags.timeout)
        setup_logging(info.rank)
        if info.rank == 0:
            stop_on_sigterm()  # rank 0's scheduler watches the abort key itself: it settles the jobs first
        else:
            watcher = AbortWatcher(signal_is_stop=True).start()  # stopped with rank 0, quietly
        run(flags, info, parts)
    except KeyboardInterrupt:  # rank 0: SIGINT or SIGTERM
        if parts.scheduler is not None:
            parts.scheduler.stop()
            print("paradit: stopped; jobs that were running are back in the queue", flush=True)
        os._exit(0)
    except Exception as err:
        code, message, show = failure(err)
        if show:
            traceback.print_exc()
        if parts.worker is not None and code != EXIT_PEER_FAILED:
            parts.worker.report_failure(message)      # the job this rank ran is marked failed first
        if parts.scheduler is not None:               # rank 0: settle the jobs, then report like every rank
            parts.scheduler.end_after_failure(message, code)
        report(code, message, watcher)
    if watcher is not None and not watcher.stop():
        os._exit(0)  # a store call that never returns: leave without the interpreter's teardown
    shutdown()
    return 0

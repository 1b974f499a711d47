"""Run the service in a subprocess (one process, or torchrun with N): for tests and benchmarks.

    with ServerProcess(["--experts", "split"], nproc=2, state_dir=tmp) as server:
        httpx.get(server.url + "/health")

It listens on 127.0.0.1 (or `host`) at a free port (--port 0; the address is read from the
server's output), is given a deadline to become ready, and is always killed at the end (its whole
process group). `wrap` is a command line that execs the server's (given as its last arguments),
e.g. one that first mounts a small filesystem on the state directory.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from paradit.launch import free_port


class ServerProcess:
    def __init__(self, args: list[str], nproc: int = 1, state_dir: str | Path = "outputs/serve",
                 env: dict | None = None, ready_timeout_s: float = 180.0, host: str = "127.0.0.1",
                 wrap: list[str] | None = None):
        self.args, self.nproc, self.state_dir = list(args), nproc, Path(state_dir)
        self.env, self.ready_timeout_s, self.host, self.wrap = env or {}, ready_timeout_s, host, wrap or []
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()          # it said ready, or its output ended
        self._said_ready = False

    @property
    def command(self) -> list[str]:
        serve = ["-m", "paradit.serve", "--host", self.host, "--port", "0", "--state-dir", str(self.state_dir)]
        if self.nproc == 1:
            return [*self.wrap, sys.executable, *serve, *self.args]
        return [*self.wrap, sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.nproc}",
                f"--master-port={free_port()}", *serve, *self.args]

    def start(self) -> "ServerProcess":
        return self.launch().wait_ready()

    def launch(self) -> "ServerProcess":
        """Start the process and return at once (wait_ready waits for it)."""
        # one thread per process: with more threads than free cores (a busy or small machine),
        # torch's thread pool slows the tiny models' many small operations tenfold
        env = os.environ | {"OMP_NUM_THREADS": "1"} | self.env
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)  # its own group: killed whole
        self._started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def wait_ready(self) -> "ServerProcess":
        """Until the server says it is ready. RuntimeError, after killing it, if it exits first (at
        once, with its exit status and last output: a child that outlives it may hold its output
        open, so the process itself is watched, not only its output) or is not ready
        ready_timeout_s after launch."""
        deadline = self._started_at + self.ready_timeout_s
        while not self._ready.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self.proc.poll() is not None or time.monotonic() >= deadline:
                break
        if self._said_ready and self.url is not None:
            return self
        if not self._reader.is_alive():   # its output ended: it is exiting, if not gone already
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        code = self.proc.poll()
        if code is not None:
            self._reader.join(2.0)   # the lines it printed before exiting
            self.kill()
            raise RuntimeError(f"the server exited with status {code} before it was ready:\n{self.output[-4000:]}")
        self.kill()
        raise RuntimeError(f"the server did not become ready in {self.ready_timeout_s:.0f} s:\n{self.output[-4000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"paradit: serving \S+ on (http://(?:[\d.]+|\[[\da-f:]+\]):\d+)", line)
            if m:
                self.url = m[1]
            if line.startswith("paradit: ready"):
                self._said_ready = True
                self._ready.set()
        self._ready.set()  # its output ended (it exited): wait_ready stops waiting

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout_s: float) -> int:
        """The exit status once it ends by itself (killed, if it takes longer than timeout_s)."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, as a supervisor stops a service; SIGKILL if it takes longer than timeout_s."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self._signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """kill -9 of the whole process group (torchrun and every rank)."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None:  # ranks that outlived their launcher
            self._signal(signal.SIGKILL)

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready() if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1, what: str = "the condition"):
    """Poll predicate() until it returns a truthy value; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(interval_s)

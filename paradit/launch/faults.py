"""Failure handling: one rank's error reaches every rank, fast, with its reason.

A failing rank posts "rank R: reason" under one key of the process group's TCPStore; every rank
runs a small watcher thread that polls that key and, when it appears, prints the reason and exits
non-zero (os._exit: a rank blocked inside a collective cannot be unwound politely). If the store
itself disappears (its host, rank 0, died), the watcher exits too. Collective timeouts remain the
last resort.

The watcher also reports SIGINT and SIGTERM: Python runs signal handlers only in the main thread
and only between bytecodes, so a rank blocked in a collective would never say why it stopped. The
signal's byte arrives on a wakeup pipe the watcher waits on; it prints `interrupted (SIGINT)` or
`terminated (SIGTERM)` and exits 130 or 143, on every rank that got the signal (torchrun sends
SIGTERM to every worker after a Ctrl-C). The watcher is stopped and joined before the process group
is torn down: a thread still inside a store call at interpreter exit aborts the process. Tests prove
all of this with paradit.events' hooks (PARADIT_FAIL_AT / PARADIT_DELAY_AT: one rank fails or stalls
at a named point).
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

import torch.distributed as dist

ABORT_KEY = "paradit/abort"
REPORTED_KEY = "paradit/reported"  # how many ranks have printed their error
EXIT_PEER_FAILED = 3
SIGNAL_EXITS = {signal.SIGINT: (130, "interrupted (SIGINT)"), signal.SIGTERM: (143, "terminated (SIGTERM)")}


def say_error(line: str) -> None:
    """One write per line: ranks share the launcher's stderr, and print() writes the newline
    separately, which lets two ranks' lines merge into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _store():
    # The default group's store: the rendezvous TCPStore torchrun (or our spawner) created.
    return dist.distributed_c10d._get_default_store()


def report_failure(message: str) -> None:
    """Tell every rank that this one failed (no-op without a process group)."""
    if not dist.is_initialized():
        return
    try:
        _store().set(ABORT_KEY, f"rank {dist.get_rank()}: {message}")
    except Exception:  # the store may be gone already; the launcher still sees our exit code
        pass


def count_reported() -> int:
    """Count this rank as having printed its error; returns how many ranks have so far."""
    try:
        return _store().add(REPORTED_KEY, 1) if dist.is_initialized() else 1
    except Exception:
        return -1


def wait_for_reports(world: int, timeout_s: float = 10.0) -> None:
    """Before the first failing rank exits (and a launcher kills the rest), give every rank up to
    timeout_s to print its own error: when all ranks reject the same input, all of them say so."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if _store().add(REPORTED_KEY, 0) >= world:
                return
        except Exception:
            return
        time.sleep(0.05)


def peer_failure(wait_s: float = 1.0) -> str | None:
    """A failure another rank reported (waiting up to wait_s for it to arrive), else None.

    A rank whose collective broke because a peer died asks this first, so that it reports the
    root cause instead of its own "connection reset".
    """
    if not dist.is_initialized():
        return None
    deadline = time.monotonic() + wait_s
    try:
        store, me = _store(), dist.get_rank()
        while True:
            if store.check([ABORT_KEY]):
                reason = store.get(ABORT_KEY).decode()
                return None if reason.startswith(f"rank {me}:") else reason
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
    except Exception:
        return None


class AbortWatcher:
    """Watches the abort key (world > 1) and this process's SIGINT / SIGTERM; on either, prints why,
    runs `cleanup` (the run's outputs: no temporary survives) and exits this process.

    Start it from the main thread (it installs the signal handlers) and always stop() it, which
    joins the thread and restores the handlers. store: the default group's store (injectable so
    that tests can hold the thread inside a store call)."""

    def __init__(self, interval_s: float = 0.2, cleanup=None, store=None, signal_is_stop: bool = False):
        self.interval_s, self.cleanup = interval_s, cleanup or (lambda: None)
        self.signal_is_stop = signal_is_stop  # a service's worker rank: SIGTERM is how it is stopped
        self.distributed = dist.is_initialized()
        self.me = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.store = store if store is not None else (_store() if self.distributed else None)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()       # signal bytes and stop() both wake the thread
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._saved = None
        self._reporter = threading.Lock()            # one report per process: the watcher's or main's
        self.thread = threading.Thread(target=self._run, name="paradit-abort-watch", daemon=True)

    def start(self) -> "AbortWatcher":
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, _ignore_here) for s in SIGNAL_EXITS}
            self._saved = (handlers, signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False))
        self.thread.start()
        return self

    def claim(self) -> bool:
        """True for the first thread to report this process's failure; the other one must not."""
        return self._reporter.acquire(blocking=False)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop and join the thread (it finishes the store call it may be in); restore the signal
        handlers. Returns False if the thread did not end within timeout_s (a store that stopped
        answering): the caller must then leave with os._exit, not through interpreter shutdown."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        if self._saved is not None:
            handlers, fd = self._saved
            signal.set_wakeup_fd(fd)
            for s, h in handlers.items():
                signal.signal(s, h)
            self._saved = None
        return not self.thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._wake_r], [], [], self.interval_s)
            if ready:
                for byte in os.read(self._wake_r, 64):
                    if byte in SIGNAL_EXITS and not self._stop.is_set():
                        self._exit_on_signal(signal.Signals(byte))
                continue
            if self.store is None:
                continue
            try:
                if not self.store.check([ABORT_KEY]):
                    continue
                reason = self.store.get(ABORT_KEY).decode()
            except Exception as err:  # rank 0 (the store's host) is gone
                if self._stop.is_set():
                    return
                reason = f"lost contact with the job's store on rank 0 ({type(err).__name__})"
            if reason.startswith(f"rank {self.me}:") or self._stop.is_set():
                return  # our own failure: the main thread is already exiting
            self._exit(EXIT_PEER_FAILED, f"stopping because {reason}")

    def _exit_on_signal(self, sig: signal.Signals) -> None:
        code, message = SIGNAL_EXITS[sig]
        if self.signal_is_stop:  # a normal stop, no error: the launcher signals every rank (rank 0 says it)
            if self.claim():
                self.cleanup()
                sys.stdout.flush()
                os._exit(0)
            return
        self._exit(code, message, post=True)  # posted: a peer that did not get the signal stops too

    def _exit(self, code: int, message: str, post: bool = False) -> None:
        if not self.claim():
            return  # the main thread reports (and exits) already
        say_error(f"paradit: error (rank {self.me}): {message}")
        if post:
            report_failure(message)
        self.cleanup()
        count_reported()
        if self.world > 1:
            wait_for_reports(self.world)  # rank 0 hosts the store: it must outlive the others' reports
        sys.stderr.flush()
        os._exit(code)


def _ignore_here(signum, frame) -> None:
    """The Python-level handler does nothing: the watcher thread reports the signal (its byte
    arrives on the wakeup pipe even while the main thread is blocked in a collective)."""

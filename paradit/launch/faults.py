"""Failure handling: one rank's error reaches every rank, fast, with its reason.

A failing rank posts "rank R: reason" under one key of the process group's TCPStore; every rank
runs a small watcher thread that polls that key and, when it appears, prints the reason and exits
non-zero (os._exit: a rank blocked inside a collective cannot be unwound politely). If the store
itself disappears (its host, rank 0, died), the watcher exits too. Collective timeouts remain the
last resort. The test hook PARADIT_FAIL_AT="RANK:POINT" (POINT: stepN, roundN, handoff) raises
an injected failure at that point, so tests can prove all of this.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

ABORT_KEY = "paradit/abort"
REPORTED_KEY = "paradit/reported"  # how many ranks have printed their error
EXIT_PEER_FAILED = 3


class InjectedFailure(RuntimeError):
    pass


def maybe_fail(point: str) -> None:
    """Raise InjectedFailure if PARADIT_FAIL_AT names this rank and this point (test hook)."""
    spec = os.environ.get("PARADIT_FAIL_AT")
    if not spec:
        return
    rank, _, where = spec.partition(":")
    me = dist.get_rank() if dist.is_initialized() else 0
    if int(rank) == me and where == point:
        raise InjectedFailure(f"injected failure at {point} (PARADIT_FAIL_AT={spec})")


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
    """Polls the abort key; exits this process when another rank has failed."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self._stop = interval_s, threading.Event()
        self.me = dist.get_rank()
        self.store = _store()
        self.thread = threading.Thread(target=self._run, name="paradit-abort-watch", daemon=True)

    def start(self) -> "AbortWatcher":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
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
            say_error(f"paradit: error (rank {self.me}): stopping because {reason}")
            count_reported()
            wait_for_reports(dist.get_world_size())  # rank 0 hosts the store: it must outlive the others' reports
            os._exit(EXIT_PEER_FAILED)

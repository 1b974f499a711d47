"""Timings and test hooks: one mechanism, importable from every layer (plain Python, no torch).

A phase of the library's work, start-up (the CLI's pipeline import, config, weights, text encoder
and its warm-up, VAE, offload, compile) or a request (text encode, image encode, each step or
CHORDS round, denoise, VAE decode, video write), runs inside `phase(NAME, into)`: it first passes
the test hook of that name, then times the block into `into["NAME_s"]`. A point that is not timed
(the split hand-off) passes its hook with `hook(NAME)`. Timings are plain dicts the caller owns (a
loader's start-up, a request's record); nothing here keeps state.

The hooks let tests make one rank fail or stall at a named point, to prove that every rank stops
with the reason and that nothing hangs:

    PARADIT_FAIL_AT="RANK:NAME[,RANK:NAME...]"            raise InjectedFailure there
    PARADIT_DELAY_AT="RANK:NAME:SECONDS[,...]"            sleep first (a slow rank)

RANK is the process's rank as its launcher set it (the RANK variable; 0 without one). The names in
use: stepN (before sampler step N), roundN (CHORDS round N), handoff (both sides of the split
hand-off), and every phase name.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass


class InjectedFailure(RuntimeError):
    """The failure PARADIT_FAIL_AT asked for."""


FORMS = {"PARADIT_FAIL_AT": ("RANK:NAME", "1:step3"), "PARADIT_DELAY_AT": ("RANK:NAME:SECONDS", "1:step3:2.5")}


def _points(variable: str) -> list[list[str]]:
    """The entries of a hook variable naming this process's rank, split at ':' (after the rank); a
    malformed entry is a ValueError naming it (it was ignored, or failed mid-run as a float)."""
    me, text = os.environ.get("RANK", "0"), os.environ.get(variable, "")
    entries = [e.split(":") for e in text.split(",") if e]
    form, example = FORMS[variable]
    for e in entries:
        if len(e) != form.count(":") + 1 or not e[0].isdigit() or not _seconds(e[2:]):
            raise ValueError(f"{variable}={text!r}: entry {':'.join(e)!r} is not {form} (e.g. {example})")
    return [rest for rank, *rest in entries if rank == me]


def _seconds(rest: list[str]) -> bool:
    """No seconds field, or one that is a finite number >= 0."""
    try:
        return not rest or 0 <= float(rest[0]) < float("inf")
    except ValueError:
        return False


def hook(name: str) -> None:
    """The test hook of point `name`: sleep if PARADIT_DELAY_AT names this rank and point, then raise
    InjectedFailure if PARADIT_FAIL_AT does."""
    for where, seconds in _points("PARADIT_DELAY_AT"):
        if where == name:
            time.sleep(float(seconds))
    if [name] in _points("PARADIT_FAIL_AT"):
        raise InjectedFailure(f"injected failure at {name} (PARADIT_FAIL_AT={os.environ['PARADIT_FAIL_AT']})")


@dataclass
class Span:
    """How long a phase took, set as it ends (for callers that keep the seconds elsewhere)."""
    seconds: float = 0.0


@contextmanager
def phase(name: str, into: dict | None = None):
    """Pass the hook of `name`, then time the block: into[NAME_s] (when given) and the yielded Span
    get its seconds, also when it raises. A device's queued work belongs to a phase only if the
    block synchronises before it ends (the caller's choice: this module knows no device)."""
    hook(name)
    span, t0 = Span(), time.perf_counter()
    try:
        yield span
    finally:
        span.seconds = time.perf_counter() - t0
        if into is not None:
            into[f"{name}_s"] = span.seconds


def timed(name: str, into: dict, fn, *args, **kw):
    """fn(*args, **kw) as phase `name` (for work handed to a thread pool)."""
    with phase(name, into):
        return fn(*args, **kw)

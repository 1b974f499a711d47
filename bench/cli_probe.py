"""The CLI (`python -m paradit.generate`) as bench/e2e.py runs it, with what a measurement needs around it.

    python bench/cli_probe.py [--memory-cap-gb G] [--phase-memory OUT.json] [--hide-fa4] -- GENERATE FLAGS

--memory-cap-gb G: CUDA memory capped at G GB (1e9 bytes; torch.cuda.set_per_process_memory_fraction
    before anything is allocated), so that a larger GPU stands in for an 80 GB one.
--phase-memory OUT.json: the peak GPU memory (allocated and reserved by torch's allocator, GB) and the
    device-synchronised seconds of each phase, written when the CLI exits: start-up
    (Pipeline.from_pretrained: weights, offload set-up, LoRA merge), text encoding
    (Pipeline.encode_prompts), denoise (Pipeline.drive), decode (Pipeline.decode, the mp4 encoded
    meanwhile) and write (VideoStream.close: what the encoder has left after the decode). The peak statistics are reset as each phase starts and read as it ends; a phase
    run more than once (several prompts) keeps its largest peak and its total time.
--hide-fa4: flash-attn-4 (`flash_attn.cute`) made unimportable, as if it were not installed.

The phases are measured from outside (the methods wrapped here, in this process only): the library
itself carries no probe. They are wrapped as the CLI imports paradit.pipeline, where it times that
import (pipeline_import_s), so that the probe moves none of it into the CLI's imports_s.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import importlib.abc
import importlib.util
import json
import runpy
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]   # the repository root


class HideModule(importlib.abc.MetaPathFinder):
    """Refuses `name` and its submodules, as a missing package would."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by bench/cli_probe.py --hide-fa4)")
        return None


PEAKS = (("allocated_gb", "max_memory_allocated"), ("reserved_gb", "max_memory_reserved"))


def measured(fn, phase: str, record: dict, whole: dict):
    """fn, its phase's peak memory and seconds recorded (CUDA: device-synchronised). The peak
    statistics are reset as the phase starts; `whole` keeps the run's peak, read before each reset
    too, which torch.cuda.max_memory_* report here (keep_whole_peaks): the CLI's sidecar stays the run's."""
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            for key, name in PEAKS:
                whole[key] = max(whole.get(key, 0), REAL[name]())
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            if cuda:
                torch.cuda.synchronize()
            row = record.setdefault(phase, {"s": 0.0, "calls": 0})
            row["s"] += time.perf_counter() - t0
            row["calls"] += 1
            for key, name in PEAKS if cuda else ():
                peak = REAL[name]()
                row[key] = max(row.get(key, 0.0), peak / 1e9)
                whole[key] = max(whole.get(key, 0), peak)
    return wrapper


REAL = {name: getattr(torch.cuda, name) for _, name in PEAKS}


def keep_whole_peaks(whole: dict) -> None:
    """torch.cuda.max_memory_allocated / _reserved as the run's peaks, not the current phase's."""
    for key, name in PEAKS:
        setattr(torch.cuda, name, lambda device=None, key=key, name=name: max(REAL[name](device), whole.get(key, 0)))


class AfterImport(importlib.abc.MetaPathFinder):
    """Calls then(module) once the module `name` has been imported, by whoever imports it first: the
    probe patches paradit.pipeline where the CLI imports it (inside its pipeline_import phase), so that
    its libraries are not imported before the CLI's clock and counted in imports_s instead."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)                      # once; the finders below find the module itself
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_then(module):
            run(module)
            self.then(module)
        spec.loader.exec_module = exec_then             # this spec's own loader instance
        return spec


def probe_phases(record: dict) -> None:
    """The phases measured, once the CLI imports paradit.pipeline (AfterImport)."""
    sys.meta_path.insert(0, AfterImport("paradit.pipeline", lambda module: patch_phases(module.Pipeline, record)))


def patch_phases(Pipeline, record: dict) -> None:
    from paradit.outputs import VideoStream
    whole: dict = {}
    keep_whole_peaks(whole)
    build = Pipeline.__dict__["from_spec"].__func__     # the one build path (from_pretrained calls it)
    Pipeline.from_spec = classmethod(measured(build, "startup", record, whole))
    for cls, name, phase in ((Pipeline, "encode_prompts", "text_encode"), (Pipeline, "drive", "denoise"),
                             (Pipeline, "decode", "decode"), (VideoStream, "close", "write")):
        setattr(cls, name, measured(getattr(cls, name), phase, record, whole))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-cap-gb", type=float)
    p.add_argument("--phase-memory", type=Path)
    p.add_argument("--hide-fa4", action="store_true")
    split = argv.index("--") if "--" in argv else len(argv)
    args, flags = p.parse_args(argv[:split]), argv[split + 1:]
    if args.hide_fa4:
        sys.meta_path.insert(0, HideModule("flash_attn.cute"))
    if args.memory_cap_gb is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 1e9 / total))
    if args.phase_memory is not None:
        record: dict = {}
        probe_phases(record)
        atexit.register(lambda: args.phase_memory.write_text(json.dumps(record, indent=1)))
    sys.argv = ["paradit.generate", *flags]
    runpy.run_module("paradit.generate", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])

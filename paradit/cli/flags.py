"""Flags: the command line's table, typed parsing, and library errors translated into flag terms.

Pure Python, no torch (the planner's CLI uses it too). A value parser only reads the text (an
integer, a WIDTHxHEIGHT, a stop rule, UTF-8 text); ranges belong to the library checks that consume
the values (paradit.settings, ParallelConfig, the planner), whose ParameterErrors `flag_terms`
re-raises naming the flag the user typed.

A build option (a flag that changes what is built) is not declared here: it is a field of
paradit.runspec.BuildSpec made with runspec.option(default, flag=dict(help=..., parse=...)), and its
flag (--the-field-name) exists in generate and the service from that declaration (spec_flags), its
library errors name the flag (all_param_flags), and paradit.cli.spec.resolve passes its value on to
runspec.build_spec (runspec.build_options). Any other flag is one Flag entry in FLAGS:
its typed value is `flags.<name>` (dashes as underscores); the service takes it too unless it is one
of paradit.serve.cli.PER_REQUEST. If it feeds a library parameter, map the parameter to it in
PARAM_FLAGS; if it conflicts with other flags, add the rule to paradit.cli.spec.check_combinations.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from paradit.errors import ParameterError
from paradit.plan.hardware import GPUS
from paradit.plan.layout import SHARD_MODES
from paradit.runspec import path_flag as PATH
from paradit.settings import SAMPLER_NAMES

DEFAULT_PROMPT = "a red circle moving right"


class UsageError(ValueError):
    """A mistake on the command line, already worded in flags."""


# ---------------------------------------------------------------------------------------------
# Value parsers: text -> value, or argparse.ArgumentTypeError("TEXT: why")


def _parser(name: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(f"{text}: {err}") from None
    parse.__name__ = name
    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("not a number") from None


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*([+-]?\d+)\s*x\s*([+-]?\d+)\s*", text.lower())
    if not m:
        raise ValueError("write it as WIDTHxHEIGHT, e.g. 1280x720")
    width, height = int(m.group(1)), int(m.group(2))
    if width < 0 or height < 0:
        raise ValueError("width and height are numbers of pixels, > 0 (WIDTHxHEIGHT, e.g. 1280x720)")
    return width, height


def _numbers(text: str) -> float | tuple[float, float]:
    vals = [_float(v) for v in text.split(",")]
    if len(vals) not in (1, 2):
        raise ValueError("give one number or two (high,low), e.g. 4.0,3.0")
    return vals[0] if len(vals) == 1 else tuple(vals)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError("give comma-separated integers, e.g. 0,8,16,32") from None


def parse_stop(text: str) -> int | float | None:
    """'hit:M' | 'residual:TAU' | 'none' -> the CHORDS controller's stop rule."""
    kind, _, value = text.partition(":")
    try:
        if kind == "none" and not value:
            return None
        if kind == "hit" and int(value) >= 1:
            return int(value)
        if kind == "residual" and 0 < float(value) < float("inf"):
            return float(value)
    except ValueError:
        pass
    raise ValueError("use hit:M (stop after the M-th hit, M >= 1), residual:TAU (consecutive hits closer than "
                     "TAU, a finite TAU > 0), or none (run to the exact result)")


def _text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid UTF-8 (byte {text[err.start].encode('utf-8', 'surrogateescape')!r} "
                         f"at position {err.start})") from None
    return text


INT, FLOAT = _parser("integer", _int), _parser("number", _float)
SIZE, NUMBERS, INTS = _parser("size", _size), _parser("numbers", _numbers), _parser("list", _ints)
STOP, TEXT = _parser("stop rule", parse_stop), _parser("text", _text)


# ---------------------------------------------------------------------------------------------
# The flags


@dataclass(frozen=True)
class Flag:
    name: str                                   # "--steps"
    parse: Callable | None = None               # None: a switch
    default: object = None
    help: str = ""
    shown: str | None = None                    # the default as --help shows it (None: not shown)
    choices: tuple | None = None
    metavar: str | None = None
    repeat: bool = False                        # may be given several times: a list of values

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        text = self.help + (f" (default: {self.shown})" if self.shown is not None else "")
        if self.parse is None:
            parser.add_argument(self.name, action="store_true", help=text)
        else:
            parser.add_argument(self.name, type=self.parse, default=self.default, help=text, choices=self.choices,
                                metavar=self.metavar, action="append" if self.repeat else "store")


def _timeout_shown() -> str:
    env = os.environ.get("PARADIT_TIMEOUT_S")
    return f"PARADIT_TIMEOUT_S={env}" if env else "600 s, or PARADIT_TIMEOUT_S"


FLAGS: tuple[Flag, ...] = (
    # what to generate
    Flag("--prompt", TEXT, None, "the text to generate", repr(DEFAULT_PROMPT), metavar="TEXT"),
    Flag("--prompts-file", PATH, None, "one prompt a line (UTF-8); data-parallel replicas share them out; "
         "instead of --prompt", metavar="FILE"),
    Flag("--negative-prompt", TEXT, None, "what to guide away from", "the model's own; for Wan checkpoints "
         "the original Wan's Chinese one", metavar="TEXT"),
    Flag("--image", PATH, None, "first frame for I2V-A14B / TI2V-5B checkpoints; without --size the video takes "
         "the image's shape at the preset's area", metavar="FILE"),
    # the video
    Flag("--size", SIZE, None, "WIDTHxHEIGHT, e.g. 1280x720. Videos with a side under 128 pixels (the demo's "
         "16x16) are written enlarged by an integer factor, nearest-neighbour (to at most 16384 a side, "
         "libx264's limit); the sidecar records both sizes",
         "the preset's", metavar="WxH"),
    Flag("--frames", INT, None, "frames, of the form 4k+1 (8k+1, k >= 1, for the demo model)", "the preset's",
         metavar="N"),
    Flag("--steps", INT, None, "denoising steps", "the preset's", metavar="N"),
    Flag("--shift", FLOAT, None, "the sigma schedule's shift, 0.01 to 100", "the preset's", metavar="X"),
    Flag("--guidance", NUMBERS, None, "classifier-free guidance scale: one, or high,low for the two Wan2.2 "
         "experts; 1 turns guidance off", "the preset's", metavar="G[,G]"),
    Flag("--sampler", str, None, "unipc or euler", "unipc; Euler steps with --chords", choices=SAMPLER_NAMES),
    Flag("--cache", str, None, "the step cache: reuse the transformer's last output on steps where it would "
         "barely change (easy: EasyCache's adaptive rule); higher THRESHOLD skips more; the first WARMUP steps, "
         "the first two of each expert and the last are computed; the sidecar lists every skipped step", "off",
         metavar="METHOD[:THRESHOLD[:WARMUP]]"),
    Flag("--seed", INT, 0, "seed of the initial noise, 0 to 2**64-1; the same seed gives the same video on "
         "every layout", "0", metavar="N"),
    Flag("--out", str, "outputs/video.mp4", "the video (.mp4); its sidecar .json beside it; with several "
         "prompts NAME_000.mp4, NAME_001.mp4, ...", "outputs/video.mp4", metavar="FILE"),
    Flag("--save-latents", help="also write the final latent (NAME.latent.safetensors)"),
    # the machine
    Flag("--timeout", FLOAT, None, "collective timeout in seconds (at least 1): how long a rank waits for a peer "
         "that has stopped answering", None, metavar="S"),
    # the layout
    Flag("--sp", INT, None, "sequence-parallel degree; picks ulysses x ring from the head count", "1",
         metavar="N"),
    Flag("--ulysses", INT, None, "Ulysses (all-to-all) degree, at most the model's heads", "1", metavar="N"),
    Flag("--ring", INT, None, "Ring attention degree", "1", metavar="N"),
    Flag("--cfg-par", INT, 1, "2: the cond and uncond passes on separate GPU groups", "1", metavar="1|2"),
    Flag("--cfg-mode", str, "auto", "how a GPU group with --cfg-par 1 runs a guided step: batched (cond and uncond "
         "in one forward) or in-turn (one after the other: about 0.58x the activation memory, the same work); "
         "auto: the planner's fastest that fits", "auto; batched on a CPU", choices=("auto", "batched", "in-turn")),
    Flag("--dp", INT, 1, "data-parallel replicas over the prompts", "1", metavar="N"),
    Flag("--experts", str, "colocated", "split: the high- and low-noise experts on separate GPU groups, requests "
         "pipelined; auto: the planner decides on a GPU", "colocated", choices=("colocated", "split", "auto")),
    Flag("--stages", INTS, None, "GPUs of the high,low stages with --experts split", "by the step split",
         metavar="H,L"),
    Flag("--plan", str, "manual", "auto: the planner picks the layout (instead of the layout flags)", "manual",
         choices=("manual", "auto")),
    Flag("--gpu", str, None, "GPU kind for the planner", "detected from the CUDA device",
         choices=tuple(GPUS)),
    Flag("--force", help="run a layout the planner predicts will not fit in GPU memory"),
    Flag("--shard-weights", str, "auto", "shard each expert's transformer blocks over the sequence-parallel group "
         "(sp) or the whole request group (request), gathered block by block behind compute (FSDP2); auto: the "
         "planner's choice", "auto; none on a CPU", choices=SHARD_MODES),
    # CHORDS
    Flag("--chords", INT, 1, "CHORDS cores (parallel-in-time, Euler steps); one core group per core when the "
         "world has room, else the cores run in turn; 1 is off", "1", metavar="K"),
    Flag("--chords-init", INTS, None, "start step of each core, e.g. 0,8,16,32", "the rule for K cores",
         metavar="I,I,..."),
    Flag("--chords-stop", STOP, None, "hit:M | residual:TAU | none", "hit:1", metavar="RULE"),
    Flag("--chords-stream", help="write every CHORDS hit as it arrives (NAME.hitN.mp4)"),
    # checks and output
    Flag("--check-finite", help="stop at the first NaN/Inf velocity, naming the step and the expert"),
    Flag("--no-progress", help="no progress bar"),
)


def spec_flags() -> tuple[Flag, ...]:
    """The build options' flags: declared with paradit.runspec.BuildSpec's fields (runspec.option), read
    when a command line is parsed, so that a build option declared there needs no entry here."""
    from paradit import runspec
    return tuple(Flag(**{"default": f.default, **d}) for f in dataclasses.fields(runspec.BuildSpec)
                 for d in runspec.declared_flags(f))


def all_param_flags() -> dict[str, str]:
    """PARAM_FLAGS and each build option's first flag (a library error names the field)."""
    from paradit import runspec
    return {f.name: runspec.declared_flags(f)[0]["name"] for f in dataclasses.fields(runspec.BuildSpec)
            if runspec.declared_flags(f)} | PARAM_FLAGS


LAYOUT_FLAGS = ("--sp", "--ulysses", "--ring", "--cfg-par", "--dp", "--experts", "--stages")

# library parameter -> the flag that sets it (the CLI names the flag in a ParameterError); the build
# options' are their declarations' (all_param_flags)
PARAM_FLAGS = {"width": "--size", "height": "--size", "frames": "--frames", "steps": "--steps",
               "shift": "--shift", "guidance": "--guidance", "seed": "--seed", "sampler": "--sampler",
               "ulysses": "--ulysses", "ring": "--ring", "sp": "--sp", "cfg": "--cfg-par", "dp": "--dp",
               "chords": "--chords", "experts": "--experts", "stages": "--stages", "timeout_s": "--timeout",
               "gpu": "--gpu", "cfg_mode": "--cfg-mode", "shard_weights": "--shard-weights",
               "cores": "--chords", "init": "--chords-init",
               "stop": "--chords-stop", "image": "--image", "cache": "--cache"}  # cores, init, stop: ChordsSettings


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (every rank reports them the same way) in flag terms.
    A value that starts with a minus and a digit, a dot, inf or nan (-1, -.5, -inf, -16x16) is a
    value, which the flag's own check then judges; argparse takes only -1 and -.5, and reads -inf
    as an unknown flag ("expected one argument")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)

    def error(self, message: str):
        message = re.sub(r"^argument (--[\w-]+)(/[^:]*)?: ", r"\1 ", message)
        raise UsageError(message)


def build_parser(prog: str, description: str, flags: tuple[Flag, ...]) -> Parser:
    p = Parser(prog=prog, description=description, allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in flags:
        f.add_to(p)
    return p


def raw_values(argv: list[str]) -> dict[str, str]:
    """flag -> the text the user typed for it (the last one wins, as in argparse)."""
    out = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            out[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--")
                                          else "")
    return out


@dataclass(frozen=True)
class Flags:
    """The parsed command line: every flag's typed value, and what the user typed."""
    values: dict
    typed: dict[str, str]

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def given(self, flag: str) -> bool:
        return flag in self.typed


def parse_args(argv: list[str] | None = None) -> Flags:
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    doc = ("Generate videos with a Wan model on one process, or on many under torchrun:\n\n"
           "  torchrun --nproc-per-node 4 -m paradit.generate --model tiny --sp 2 --cfg-par 2 --out out.mp4\n\n"
           "Every flag is checked on every rank before any weights are read. The output rank of each\n"
           "data-parallel replica writes its videos, each with a JSON sidecar: all of them or none.")
    flags = list(spec_flags()) + list(FLAGS)
    for i, f in enumerate(flags):
        if f.name == "--timeout":
            flags[i] = dataclasses.replace(f, shown=_timeout_shown())
    ns = build_parser("python -m paradit.generate", doc, tuple(flags)).parse_args(argv)
    return Flags(vars(ns), raw_values(argv))


# ---------------------------------------------------------------------------------------------
# Library errors in flag terms


def flag_alternative(alt: dict) -> str:
    parts = []
    for k, v in alt.items():
        if k == "stages":
            parts.append("--stages " + ",".join(str(u * r * c) for u, r, c in v))
        else:
            parts.append(f"{all_param_flags().get(k, '--' + k.replace('_', '-'))} {v}")
    return " ".join(parts) or "no layout flags"


def in_flag_terms(err: ParameterError, flags: Flags, param_flags: dict | None = None) -> str:
    param_flags = all_param_flags() if param_flags is None else param_flags

    def name(param, value):
        if param == "layout":
            given = [f"{f} {flags.typed[f]}" for f in LAYOUT_FLAGS if flags.given(f)]
            return f"the layout {value} ({' '.join(given) or 'no layout flags'})"
        flag = param_flags.get(param)
        if flag is None:
            return f"{param}={value!r}"
        if not flags.given(flag) and value is None:   # a flag that is missing: "--image: ..."
            return flag
        return f"{flag} {flags.typed.get(flag, value)}"
    return err.render(name, flag_alternative)


@contextmanager
def flag_terms(flags: Flags, param_flags: dict | None = None):
    """Re-raise a library ParameterError as a UsageError naming the flag (param_flags: parameter ->
    flag, default all_param_flags())."""
    try:
        yield
    except ParameterError as err:
        raise UsageError(in_flag_terms(err, flags, param_flags)) from None



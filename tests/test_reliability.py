"""Bad input is named before heavy work on every rank; failures and signals stop the whole job with
the reason on every rank; outputs are written as a set or not at all; no run hangs. See
docs/reliability.md, which lists each promise with the test here that proves it."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from paradit import conditioning
from paradit import outputs as out_mod
from paradit.cli.flags import flag_terms
from paradit.cli.spec import parse_args, resolve, resolve_batch
from paradit.config import WanConfig
from paradit.generate import failure
from paradit.launch import DistInfo, free_port, init_distributed, spawn
from paradit.launch.faults import SIGNAL_EXITS
from paradit.plan import ParallelConfig
from paradit.plan import GPUS, load_calibration, plan
from paradit.pipeline import Pipeline
from paradit.settings import VideoSettings
from workers import bad_layout_on_every_rank

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_FLAGS = {"--sp", "--ulysses", "--ring", "--cfg-par", "--dp", "--chords", "--experts", "--plan", "--stages"}
HANG_GUARD_S = 120  # a run that takes longer than this has hung (normal failures take ~5-15 s)
TINY = WanConfig.preset("tiny")


def torchrun(nproc: int, args: list, env: dict | None = None, timeout: float = HANG_GUARD_S, model="tiny"):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "paradit.generate", "--model", model, "--no-progress", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc, time.monotonic() - start


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("paradit: error")]


def ranks_reporting(lines: list[str]) -> set[int]:
    return {int(re.match(r"paradit: error \(rank (\d+)\)", line).group(1)) for line in lines}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.txt").write_text("\n\n")
    (d / "binary.txt").write_bytes(b"a prompt\n\xff\xfe\x00\x81 not text\n")
    (d / "prompts.txt").write_text("a red circle\n")
    (d / "not_a_checkpoint").mkdir()
    (d / "a_file").write_text("x")
    (d / "image.txt").write_text("not an image")
    return d


# ---------------------------------------------------------------------------------------------
# The command line, checked in-process exactly as every rank checks it (parse -> device and
# timeout -> spec), for rank 0 and rank 1 of a world of 2 (4 where the case says so).
# (args, message regex, world, where): where "all": every rank refuses; "output": the rank that
# writes refuses (the others hear it through the store: test_bad_cli_input_under_torchrun).
BAD_CLI = [
    # types, as typed
    (["--steps", "abc"], r"--steps abc: not an integer", 2, "all"),
    (["--size", "64"], r"--size 64: write it as WIDTHxHEIGHT", 2, "all"),
    (["--guidance", "a,b"], r"--guidance a,b: not a number", 2, "all"),
    (["--guidance", "1,2,3"], r"one number or two", 2, "all"),
    (["--cfg-par", "x"], r"--cfg-par x: not an integer", 2, "all"),
    (["--sampler", "ddim"], r"--sampler invalid choice: 'ddim'", 2, "all"),
    (["--prompt", "caf\udce9"], r"--prompt caf.*not valid UTF-8", 2, "all"),
    (["--frobnicate", "1"], r"unrecognized arguments: --frobnicate", 2, "all"),
    (["--step", "4"], r"unrecognized arguments: --step", 2, "all"),           # no silent abbreviations
    # non-finite and out-of-range video settings
    (["--guidance", "inf"], r"--guidance inf: must be a finite number", 2, "all"),
    (["--guidance", "1e308"], r"--guidance 1e308: must be in \[0, 100\]", 2, "all"),
    (["--guidance", "nan"], r"--guidance nan: must be a finite number", 2, "all"),
    (["--guidance", "4,-1"], r"--guidance 4,-1: must be in \[0, 100\]", 2, "all"),
    (["--shift", "inf"], r"--shift inf: must be a finite number", 2, "all"),
    (["--shift", "-1"], r"--shift -1: must be in \[0.01, 100\]", 2, "all"),
    (["--shift", "1e-300"], r"--shift 1e-300: must be in \[0.01, 100\]", 2, "all"),
    (["--steps", "0"], r"--steps 0: must be an integer from 1 to 1000", 2, "all"),
    (["--steps", "100000"], r"--steps 100000: must be an integer from 1 to 1000", 2, "all"),
    (["--frames", "8"], r"--frames 8: tiny takes frames of the form 4k\+1.*nearest allowed: 5 or 9", 2, "all"),
    (["--frames", "100001"], r"--frames 100001: .*from 1 to 1001", 2, "all"),
    (["--size", "100x64"], r"--size 100x64: tiny takes width and height as multiples of 16.*96 or 112", 2, "all"),
    (["--size", "100000x100000"], r"--size 100000x100000: .*from 16 to 4096", 2, "all"),
    (["--size", "0x0"], r"--size 0x0: .*multiples of 16", 2, "all"),
    (["--seed", "-1"], r"--seed -1: must be an integer from 0 to 18446744073709551615", 2, "all"),
    (["--seed", str(2 ** 64)], r"--seed 18446744073709551616: must be an integer from 0", 2, "all"),
    (["--model", "demo", "--frames", "1"], r"--frames 1: demo takes frames of the form 8k\+1, from 9", 2, "all"),
    (["--model", "demo", "--frames", "5"], r"--frames 5: .*nearest allowed: 9$", 2, "all"),
    # layouts, in flag terms
    (["--sp", "0"], r"--sp 0: the sequence-parallel degree must be an integer >= 1", 2, "all"),
    (["--ulysses", "0"], r"--ulysses 0: every degree must be an integer >= 1", 2, "all"),
    (["--ulysses", "2", "--ring", "0"], r"--ring 0: every degree must be an integer >= 1", 2, "all"),
    (["--dp", "0"], r"--dp 0: every degree must be an integer >= 1", 2, "all"),
    (["--cfg-par", "3"], r"--cfg-par 3: .*degree is 1 or 2", 2, "all"),
    (["--sp", "4"], r"needs 4 processes, but the world has 2; layouts that fit 2: --cfg-par 2; --ulysses 2", 2, "all"),
    (["--ulysses", "2", "--ring", "2"], r"\(--ulysses 2 --ring 2\): needs 4 processes", 2, "all"),
    (["--ulysses", "4"], r"--ulysses 4: is above the model's 2 attention heads.*--ulysses 2 --ring 2", 4, "all"),
    (["--sp", "2", "--ulysses", "1", "--ring", "1"], r"disagrees", 2, "all"),
    (["--experts", "split", "--stages", "5,5"], r"needs 10 processes, but the world has 2.*--stages 1,1", 2, "all"),
    (["--experts", "split", "--stages", "3"], r"--stages 3: give two GPU counts", 2, "all"),
    (["--experts", "split", "--chords", "2"], r"cannot be combined", 2, "all"),
    (["--stages", "1,1"], r"--stages needs --experts split", 2, "all"),
    (["--plan", "auto"], r"need a GPU kind", 2, "all"),
    (["--experts", "auto"], r"single device \(--experts auto\): needs 1 process, but .*; --experts split$", 2, "all"),
    (["--experts", "split", "--stages", "1,2"], r"needs 3 processes, but the world has 2.*--stages 1,1", 2, "all"),
    # a world of 1: the split-experts offer must not replace the layout's own message
    (["--sp", "2"], r"--sp 2\): needs 2 processes, but the world has 1; layouts that fit 1: no layout flags$", 1, "all"),
    (["--cfg-par", "2"], r"needs 2 processes, but the world has 1", 1, "all"),
    (["--experts", "split"], r"^--experts split: needs at least 2 processes \(one per stage\), but the world has 1; "
                             r"use: --experts colocated$", 1, "all"),
    (["--plan", "auto", "--gpu", "h100", "--sp", "2"], r"--plan auto chooses the layout itself: drop --sp", 2, "all"),
    # weight sharding
    (["--dp", "2", "--shard-weights", "sp"], r"--shard-weights sp: the layout's sequence-parallel group .*has one "
                                             r"rank.*use: --shard-weights none", 2, "all"),
    (["--chords", "2", "--shard-weights", "request"], r"CHORDS cores .*: --shard-weights sp", 2, "all"),
    (["--ulysses", "2", "--shard-weights", "sp", "--compile"], r"--shard-weights sp: sharded weights run eagerly",
     2, "all"),
    (["--ulysses", "2", "--shard-weights", "sp", "--offload", "experts"], r"--offload experts: expert offload moves "
                                                                            r"whole experts", 2, "all"),
    # CHORDS
    (["--chords", "2", "--steps", "1"], r"needs at least as many steps", 2, "all"),
    (["--chords", "2", "--chords-init", "1,3"], r"0", 2, "all"),
    (["--chords", "3"], r"the world has 2", 2, "all"),
    (["--chords", "-1"], r"--chords -1: the number of CHORDS cores must be >= 1", 2, "all"),
    (["--chords", "0"], r"--chords 0: the number of CHORDS cores must be >= 1", 2, "all"),
    (["--chords", "2", "--chords-stop", "first"], r"--chords-stop first: use hit:M", 2, "all"),
    (["--chords", "2", "--chords-stop", "residual:inf"], r"a finite TAU > 0", 2, "all"),
    (["--chords", "2", "--chords-stop", "hit:0"], r"M >= 1", 2, "all"),
    (["--chords", "2", "--chords-stop", "hit:3"], r"stop=3", 2, "all"),
    (["--chords-init", "0,4"], r"--chords-init needs --chords K", 2, "all"),
    (["--chords-stop", "hit:1"], r"--chords-stop needs --chords K", 2, "all"),
    (["--chords", "2", "--sampler", "unipc"], r"CHORDS solves with Euler steps", 2, "all"),
    # the model, prompts, image
    (["--model", "wan9"], r"neither a preset", 2, "all"),
    (["--model", "wan2.2-t2v-a14b"], r"architecture without weights.*pass the checkpoint folder", 2, "all"),
    (["--model", "{files}/not_a_checkpoint"], r"^--model .*not_a_checkpoint: not a Wan checkpoint", 2, "all"),
    (["--model", "{files}/a_file"], r"^--model .*a_file: not a preset name and not a checkpoint folder", 2, "all"),
    # an empty path was read as the current folder ('.'): "--image .: no such file", "--lora :1 ... it is a folder"
    (["--image", ""], r"^--image '': an empty path; name a file or folder$", 2, "all"),
    (["--prompts-file", ""], r"^--prompts-file '': an empty path", 2, "all"),
    (["--model", ""], r"^--model '': an empty path", 2, "all"),
    (["--components", ""], r"^--components '': an empty path", 2, "all"),
    (["--lora", ""], r"^--lora '': an empty path", 2, "all"),
    (["--components", "{files}"], r"--components is for checkpoint folders", 2, "all"),
    (["--prompt", "x", "--prompts-file", "{files}/prompts.txt"], r"--prompt and --prompts-file", 2, "all"),
    (["--prompts-file", "{files}/missing.txt"], r"no such file", 2, "all"),
    (["--prompts-file", "{files}/empty.txt"], r"has no prompts", 2, "all"),
    (["--prompts-file", "{files}/binary.txt"], r"--prompts-file .*binary.txt: not UTF-8 text \(byte 0xff", 2, "all"),
    (["--image", "{files}/image.txt"], r"--image .*image.txt: tiny is a text-to-video model", 2, "all"),
    # the machine
    (["--device", "bogus"], r"--device bogus: choose auto, cpu, cuda or cuda:N", 2, "all"),
    (["--device", "meta"], r"--device meta: choose auto, cpu, cuda or cuda:N", 2, "all"),
    (["--device", "cuda"], r"--device cuda: CUDA is not available", 2, "all"),
    (["--timeout", "0"], r"--timeout 0: the collective timeout must be a finite number of seconds", 2, "all"),
    (["--timeout", "-5"], r"--timeout -5: the collective timeout", 2, "all"),
    (["--timeout", "nan"], r"--timeout nan: the collective timeout", 2, "all"),
    (["--attention", "flash"], r"needs CUDA", 2, "all"),
    (["--quant", "fp8"], r"--quant fp8: FP8 cannot run on this machine; it needs an NVIDIA GPU of compute "
                         r"capability 8.9 or higher .* on cpu, where torchao refuses", 2, "all"),
    (["--quant", "fp8-attention"], r"--quant fp8-attention: .*a Hopper GPU", 2, "all"),
    (["--quant", "int8"], r"--quant invalid choice: 'int8'", 2, "all"),
    # outputs, before any weights load
    (["--out", "{out}.avi"], r"mp4", 2, "all"),
    (["--out", "{tmp}/adir.mp4"], r"adir.mp4 is a directory", 2, "output"),
    (["--out", "{files}/a_file/x.mp4"], r"a_file is not a directory", 2, "output"),
    (["--out", "/proc/paradit-test/x.mp4"], r"cannot create files in /proc", 2, "output"),
    (["--save-latents", "--out", "{tmp}/v.mp4"], r"v.latent.safetensors is a directory", 2, "output"),
    # a streamed hit's name taken: refused mid-run, after the weights, as 'IsADirectoryError', exit 1
    (["--chords", "2", "--steps", "2", "--chords-stream", "--out", "{tmp}/h.mp4"],
     r"^--out .*h.mp4: cannot write .*h.hit2.mp4: .*is a directory", 2, "output"),
]


def check_cli(argv: list[str], world: int, rank: int) -> None:
    """What every rank runs before building anything (paradit.generate.main, up to the build)."""
    flags = parse_args(argv if "--model" in argv else ["--model", "tiny", *argv])
    with flag_terms(flags):
        init_distributed(flags.device, flags.timeout)
    info = DistInfo(rank, world, rank, torch.device("cpu"), "gloo")
    resolve_batch(flags, resolve(flags, info), info)


@pytest.mark.parametrize("args,message,world,where", BAD_CLI, ids=[" ".join(c[0]) for c in BAD_CLI])
def test_bad_cli_input(args, message, world, where, files, tmp_path):
    if torch.cuda.is_available() and "cuda" in " ".join(args) + message:
        pytest.skip("this machine has CUDA")
    args = [a.format(files=files, out=tmp_path / "video", tmp=tmp_path) for a in args]
    (tmp_path / "adir.mp4").mkdir()
    (tmp_path / "v.latent.safetensors").mkdir()
    (tmp_path / "h.hit2.mp4").mkdir()   # the last of --chords 2's streamed hits (a preview and two)
    before = sorted(tmp_path.iterdir())
    if "--out" not in args:
        args += ["--out", str(tmp_path / "video.mp4")]
    if not LAYOUT_FLAGS & set(args):  # a layout that fits, so that the input under test is what fails
        args += ["--sp", str(world)]
    for rank in range(world):
        t0 = time.monotonic()
        if where == "output" and rank > 0:
            check_cli(args, world, rank)  # only the writing rank checks its paths
            continue
        with pytest.raises(ValueError) as err:
            check_cli(args, world, rank)
        code, text, traceback = failure(err.value)
        assert code == 2 and not traceback
        assert re.search(message, text), text
        assert "\n" not in text.strip() or "planner" in text  # one line
        assert time.monotonic() - t0 < 10, "validation is meant to take milliseconds"
    assert sorted(tmp_path.iterdir()) == before, "a refused run wrote something"


# The same, end to end, for one case of each kind: every rank prints its line, nothing is written.
BAD_CLI_TORCHRUN = [
    (2, ["--guidance", "inf"], r"--guidance inf: must be a finite number"),
    (2, ["--sp", "4"], r"needs 4 processes, but the world has 2"),
    (2, ["--device", "bogus"], r"--device bogus"),
    (2, ["--quant", "fp8", "--device", "cpu"], r"--quant fp8: FP8 cannot run on this machine"),
    (2, ["--prompt", b"caf\xe9"], r"not valid UTF-8"),
    (2, ["--out", "/proc/paradit-test/x.mp4"], r"cannot create files in /proc"),  # rank 0 checks; rank 1 hears it
    (2, ["--experts", "auto"], r"layouts that fit 2: .*--experts split"),  # on a CPU: no planner, colocated
]


@pytest.mark.parametrize("nproc,args,message", BAD_CLI_TORCHRUN, ids=[str(c[1][:2]) for c in BAD_CLI_TORCHRUN])
def test_bad_cli_input_under_torchrun(nproc, args, message, tmp_path):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "video.mp4")]
    if not LAYOUT_FLAGS & {a for a in args if isinstance(a, str)}:
        args += ["--sp", str(nproc)]
    proc, _ = torchrun(nproc, args)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert ranks_reporting(errors) == set(range(nproc)), proc.stderr[-3000:]
    assert all(re.search(message, line) for line in errors), errors
    assert not re.search(r'File ".*/paradit/', proc.stderr), proc.stderr[-3000:]  # torchrun prints its own
    assert list(tmp_path.iterdir()) == [], "a failed run left files behind"


# ---------------------------------------------------------------------------------------------
# The library and the planner, in parameter terms
BAD_LIBRARY = [
    (lambda: VideoSettings.resolve(TINY, guidance=float("inf")), r"guidance=inf: must be a finite number"),
    (lambda: VideoSettings.resolve(TINY, guidance=1e308), r"guidance=1e\+308: must be in \[0, 100\]"),
    (lambda: VideoSettings.resolve(TINY, shift=float("inf")), r"shift=inf: must be a finite number"),
    (lambda: VideoSettings.resolve(TINY, shift=float("nan")), r"shift=nan"),
    (lambda: VideoSettings.resolve(TINY, seed=-1), r"seed=-1: must be an integer from 0"),
    (lambda: VideoSettings.resolve(TINY, seed=2 ** 64), r"seed=18446744073709551616"),
    (lambda: VideoSettings.resolve(TINY, seed=1.5), r"seed=1.5"),
    (lambda: VideoSettings.resolve(TINY, steps=True), r"steps=True"),
    (lambda: VideoSettings.resolve(TINY, frames=100001), r"frames=100001: .*from 1 to 1001"),
    (lambda: VideoSettings.resolve(TINY, width=100000, height=64), r"width=100000: .*from 16 to 4096"),
    (lambda: VideoSettings.resolve(WanConfig.preset("demo"), frames=1), r"frames=1: demo takes .*from 9"),
    (lambda: ParallelConfig(dp=0), r"^dp=0: every degree must be an integer >= 1"),
    (lambda: ParallelConfig(cfg=3), r"degree is 1 or 2"),
    (lambda: ParallelConfig(ulysses=0), r">= 1"),
    (lambda: ParallelConfig(experts="both"), r"choose one of"),
    (lambda: ParallelConfig(experts="split").validate(2), r"stages"),
    (lambda: ParallelConfig(ulysses=4).validate(4, 2), r"ulysses=4: is above .*: ulysses=2, ring=2"),
    (lambda: ParallelConfig(ulysses=2).validate(4, 2), r"needs 2 processes, but the world has 4"),
    (lambda: init_distributed("cpu", 0), r"timeout_s=0"),
    (lambda: init_distributed("meta"), r"device='meta': choose auto, cpu, cuda or cuda:N"),
    (lambda: plan("tiny", 0), r"gpus=0: must be an integer from 1 to 512"),
    (lambda: plan("tiny", 100000), r"gpus=100000"),
    (lambda: plan("tiny", 2, width=0, height=0), r"width=0"),
    (lambda: plan("tiny", 2, steps=0), r"steps=0"),
    (lambda: plan("tiny", 2, GPUS["h100"].replace(matmul_tflops=0.0)), r"matmul_tflops=0.0"),
    (lambda: plan("tiny", 2, GPUS["h100"].replace(nvlink_gbps=float("nan"))), r"nvlink_gbps=nan"),
    (lambda: plan("tiny", 2, objective="speed"), r"objective='speed'"),
    (lambda: plan("tiny", 2, quant="fp4"), r"^quant='fp4': choose one of none, fp8, "),
    (lambda: load_calibration("/missing.json"), r"calibration='/missing.json': no such file"),
    (lambda: Pipeline.from_pretrained("tiny", device="cpu", quant="fp8"),
     r"^quant='fp8': FP8 cannot run on this machine; it needs an NVIDIA GPU of compute capability 8.9"),
    (lambda: Pipeline.from_pretrained("tiny", quant="int8"), r"^quant='int8': choose one of none, fp8, "),
    # types a caller can get wrong: each was a TypeError or AttributeError from deep inside, or 13 errors
    (lambda: Pipeline.from_pretrained("tiny", loras="x.safetensors"), r"^loras='x.safetensors': give a list of "
     r"LoraSpec\(path, scale, target\)"),
    (lambda: Pipeline.from_pretrained("tiny", parallel={"ulysses": 2}), r"^parallel=\{'ulysses': 2\}: give a "
     r"ParallelConfig"),
    (lambda: Pipeline.from_pretrained(None), r"^model=None: give a preset name \(tiny, demo, demo64\) or a checkpoint"),
    (lambda: Pipeline.from_pretrained(""), r"^model='': give a preset name"),      # was the current folder
    (lambda: Pipeline.from_pretrained("tiny", dtype="float16"), r"^dtype='float16': give a torch.dtype"),
    # the first frame, in the library's words (they said "--image was given", "--image PATH: no such file")
    (lambda: conditioning.check_task(TINY, "x.png"), r"^image='x.png': tiny is a text-to-video model \(preset "
     r"tiny\); image conditioning needs an I2V-A14B checkpoint .*; leave it out$"),
    (lambda: conditioning.check_task(WanConfig.preset("wan2.2-i2v-a14b"), None), r"^image=None: wan2.2-i2v-a14b is "
     r"an image-to-video model \(preset wan2.2-i2v-a14b\); give the first frame$"),
    (lambda: conditioning.load_image("/no/such.png"), r"^image='/no/such.png': no such file$"),
    (lambda: conditioning.load_image("/tmp"), r"^image='/tmp': a folder; name an image file$"),
    (lambda: conditioning.load_image(__file__), r"^image='.*test_reliability.py': not a readable image \("),
]


@pytest.mark.parametrize("call,message", BAD_LIBRARY, ids=[f"library{i}" for i in range(len(BAD_LIBRARY))])
def test_bad_library_input(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "--" not in str(err.value), "library errors speak of parameters, not flags"


def test_bad_calibration_values(tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps({"matmul_efficiency": 0.0}))
    with pytest.raises(ValueError, match=r"calibration=.*cal.json.*matmul_efficiency=0.0"):
        load_calibration(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"not a readable JSON file"):
        load_calibration(bad)


# (args, message): the planner's CLI, in-process (it is pure Python); exit 2, one line, quickly
BAD_PLAN = [
    (["--gpus", "8", "--size", "0x0"], r"--size 0x0"),
    (["--gpus", "8", "--steps", "0"], r"--steps 0: must be an integer from 1"),
    (["--gpus", "8", "--frames", "8"], r"--frames 8: .*4k\+1"),
    (["--gpus", "8", "--tflops", "0"], r"--tflops 0: must be in \(0"),
    (["--gpus", "8", "--tflops", "nan"], r"--tflops nan: must be a finite number"),
    (["--gpus", "8", "--nvlink-gbps", "-1"], r"--nvlink-gbps -1"),
    (["--gpus", "8", "--hbm-gb", "inf"], r"--hbm-gb inf"),
    (["--gpus", "8", "--calibration", "/missing.json"], r"--calibration /missing.json: no such file"),
    (["--gpus", "100000"], r"--gpus 100000: must be an integer from 1 to 512"),
    (["--gpus", "0"], r"--gpus 0"),
    (["--gpus", "8", "--top", "0"], r"--top 0"),
    (["--gpus", "8", "--max-chords", "0"], r"--max-chords 0"),
    (["--gpus", "8", "--guidance", "nan"], r"--guidance nan: must be a finite number in \[0, 100\]"),  # was planned
    (["--gpus", "8", "--guidance", "4,-inf"], r"--guidance 4,-inf: must be a finite number"),           # as guided
    (["--gpus", "8", "--guidance", "1e9"], r"--guidance 1e9: must be in \[0, 100\]"),
    ([], r"--gpus N is required"),
]


@pytest.mark.parametrize("args,message", BAD_PLAN, ids=[" ".join(a) for a, _ in BAD_PLAN])
def test_bad_planner_input(args, message, capsys):
    from paradit.plan.cli import main
    t0 = time.monotonic()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and len(err.splitlines()) == 1, err
    assert time.monotonic() - t0 < 5


def test_planner_answers_quickly_at_its_largest():
    t0 = time.monotonic()
    assert plan("wan2.2-t2v-a14b", 512, "h200").choice is not None
    assert time.monotonic() - t0 < 60  # a bound on the search, not a timing claim: 100000 GPUs ran > 120 s


# ---------------------------------------------------------------------------------------------
# Failures: injected, on one rank
FAULTS = [
    ("1:step3", 2, ["--sp", "2"]),
    ("0:step0", 4, ["--ulysses", "2", "--cfg-par", "2"]),
    ("3:round2", 4, ["--chords", "2", "--ulysses", "2"]),
    ("2:handoff", 3, ["--experts", "split", "--stages", "2,1"]),
    ("0:handoff", 3, ["--experts", "split", "--stages", "2,1"]),
]


@pytest.mark.parametrize("where,nproc,args", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_failing_rank_stops_the_job(where, nproc, args, tmp_path):
    out = tmp_path / "video.mp4"
    proc, elapsed = torchrun(nproc, args + ["--out", str(out)], env={"PARADIT_FAIL_AT": where})
    rank = where.split(":")[0]
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert ranks_reporting(errors) == set(range(nproc)), errors  # every rank says why
    assert all(f"rank {rank}" in line and "injected failure" in line for line in errors), errors
    # the promise is 30 s on CPU from the failure; start-up of the processes comes on top of it
    assert elapsed < 30 + 30, f"took {elapsed:.0f} s"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_layout_fails_on_every_rank_with_the_same_message():
    messages = spawn(bad_layout_on_every_rank, 2, dict(ulysses=2, cfg=2), timeout_s=60)
    assert messages[0] == messages[1] and "needs 4 processes, but the world has 2" in messages[0]


# ---------------------------------------------------------------------------------------------
# Outputs: a set, all or none
def test_a_failed_run_keeps_the_earlier_good_output_set(tmp_path):
    """a rerun whose latent cannot be written replaces neither the video nor the sidecar."""
    from paradit.generate import main
    out = tmp_path / "x.mp4"
    assert main(["--model", "tiny", "--steps", "2", "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["x.json", "x.mp4"]
    sidecar = json.loads(before["x.json"])
    assert sidecar["size"] == {"generated": [64, 64], "written": [128, 128]}  # small videos are enlarged
    # a run that fails while staging: every staged file goes, the earlier set stays whole
    staged = out_mod.Outputs()
    staged.video(out, np.zeros((9, 64, 64, 3), np.uint8), 8)
    staged.json(out.with_suffix(".json"), {"seed": 2})
    with pytest.raises(IsADirectoryError):
        (tmp_path / "x.latent.safetensors").mkdir()
        staged.tensors(tmp_path / "x.latent.safetensors", {"latent": torch.zeros(2)})
        staged.commit()
    staged.discard()
    (tmp_path / "x.latent.safetensors").rmdir()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_split_expert_sidecars_describe_their_own_request(tmp_path):
    """with several prompts each sidecar of split experts lists every step once (high and
    low), has the encode and denoise times, a total above the decode time, and the hand-off traffic."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    proc, _ = torchrun(2, ["--experts", "split", "--prompts-file", str(prompts), "--out", str(tmp_path / "x.mp4")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("x_000.json", "x_001.json"):
        side = json.loads((tmp_path / name).read_text())
        assert [e["expert"] for e in side["experts_per_step"]] == ["high"] * 6 + ["low"] * 2  # tiny: 8 steps, 6 high
        t = side["timings_s"]
        assert {"text_encoder_s", "denoise_s", "vae_decode_s"} <= set(t) and t["total"] >= t["vae_decode_s"]
        assert side["collectives_per_step"]["handoff_p2p_recv"]["bytes"] > 0


def test_split_low_stage_outwaits_the_collective_timeout(tmp_path):
    """The low stage waits for a hand-off in the store, not in a receive: a high stage slower than
    the collective timeout (here 4 s of steps against --timeout 2) is still a successful run."""
    proc, _ = torchrun(2, ["--experts", "split", "--timeout", "2", "--out", str(tmp_path / "x.mp4")],
                       env={"PARADIT_DELAY_AT": "0:step1:4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "x.mp4").exists()


def test_commit_puts_back_the_earlier_files_when_a_rename_fails(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("old a")
    staged = out_mod.Outputs()
    staged.json(a, {"new": 1})
    staged.json(b, {"new": 2})
    real = os.replace
    monkeypatch.setattr(out_mod.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("disk gone"))
                        if Path(d) == b else real(s, d))
    with pytest.raises(OSError, match="disk gone"):
        staged.commit()
    assert a.read_text() == "old a" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


FAKE_FFMPEG_STUCK = "#!/bin/sh\nexec sleep 600\n"   # never reads its input, never exits


def test_a_stuck_encoder_is_bounded_and_leaves_nothing(tmp_path, monkeypatch):
    """an encoder that stops reading cannot hang the run (imageio's writer waited forever)."""
    fake = tmp_path / "ffmpeg"
    fake.write_text(FAKE_FFMPEG_STUCK)
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    monkeypatch.setattr(out_mod, "encode_timeout_s", lambda frames: 2.0)
    out = tmp_path / "out" / "x.mp4"
    t0 = time.monotonic()
    with pytest.raises(OSError, match="did not finish encoding"):
        out_mod.write_video(out, np.zeros((9, 256, 256, 3), np.uint8), 8)
    assert time.monotonic() - t0 < 30
    assert list(out.parent.iterdir()) == []


def test_discard_from_another_thread_stops_the_encoder(tmp_path, monkeypatch):
    """A peer's failure (the watcher thread) while this rank encodes: ffmpeg is killed, no temporary stays."""
    fake = tmp_path / "ffmpeg"
    fake.write_text(FAKE_FFMPEG_STUCK)
    fake.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(fake))
    staged = out_mod.Outputs()
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / ".paradit-tmp99999999-0").write_bytes(b"")  # a dead run's temporary
    assert out_mod.check_writable(tmp_path / "v" / "x.mp4") is None
    errors = []
    writer = threading.Thread(target=lambda: _catch(errors, staged.video, tmp_path / "v" / "x.mp4",
                                                    np.zeros((9, 256, 256, 3), np.uint8), 8))
    writer.start()
    time.sleep(1.0)
    staged.discard()
    writer.join(30)
    assert not writer.is_alive() and errors, "the encode did not stop"
    assert list((tmp_path / "v").iterdir()) == []


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 (the test inspects it)
        errors.append(err)


def test_the_encoder_runs_no_python_in_a_forked_child(tmp_path, monkeypatch):
    """Why the write could hang: imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp, a fork that runs
    Python in the child of a process full of threads (gloo, the watcher), which can deadlock there."""
    import subprocess as sp
    seen = []
    real = sp.Popen

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(sp, "Popen", spy)
    out_mod.write_video(tmp_path / "x.mp4", np.zeros((1, 16, 16, 3), np.uint8), 8)
    assert seen and all(kw.get("preexec_fn") is None for kw in seen)
    assert (tmp_path / "x.mp4").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# The failure watcher and signals
WATCHER_EXIT = textwrap.dedent("""
    import datetime, sys, time
    import torch.distributed as dist
    from paradit.launch import faults
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
    real = faults._store()

    class SlowStore:  # holds the watcher inside a C++ store call, as a slow store round trip does
        def check(self, keys):
            try:
                real.wait(["never-set"], datetime.timedelta(seconds=2))
            except Exception:
                pass
            return False
    faults._store = lambda: SlowStore()
    watcher = faults.AbortWatcher(interval_s=0.01).start()
    time.sleep(0.5)
    watcher.stop()
    dist.destroy_process_group()
    print("clean exit", flush=True)
""")


def test_watcher_is_joined_before_the_process_group_goes(tmp_path):
    """Deterministic: the watcher is inside a store call when the run ends. Stopped but not
    joined, the interpreter's exit killed it there: 'terminate called without an active exception'."""
    script = tmp_path / "watcher_exit.py"
    script.write_text(WATCHER_EXIT % free_port())
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "clean exit" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert "terminate called" not in proc.stderr


def _start(cmd, env=None):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))


def _wait_for_line(proc, pattern: str, timeout: float = 90):
    """Read stderr until a line matches; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no {pattern!r} in:\n{''.join(lines)[-2000:]}")


LONG_RUN = ["--model", "tiny", "--steps", "1000", "--no-progress"]  # denoising for tens of seconds


def test_ctrl_c_under_torchrun_reports_on_every_rank(tmp_path):
    """Ctrl-C (SIGINT to the launcher's process group, then torchrun's SIGTERM): every rank
    prints why, nothing is written, the job ends in seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "paradit.generate", *LONG_RUN, "--sp", "2", "--out", str(tmp_path / "x.mp4")]
    proc = _start(cmd, env={"PYTHONUNBUFFERED": "1"})
    lines = _wait_for_line(proc, r"layout: ")
    time.sleep(1.0)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    errors = error_lines("".join(lines) + rest)
    assert ranks_reporting(errors) == {0, 1}, rest[-3000:]
    assert all(re.search(r"interrupted \(SIGINT\)|terminated \(SIGTERM\)", line) for line in errors), errors
    assert not re.search(r'File ".*/paradit/|Connection closed by peer', rest), rest[-3000:]  # the line alone
    assert time.monotonic() - t0 < 30 and proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_exits_with_its_code_and_a_line(sig, code, tmp_path):
    proc = _start([sys.executable, "-m", "paradit.generate", *LONG_RUN, "--out", str(tmp_path / "x.mp4")])
    _wait_for_line(proc, r"layout: ")
    time.sleep(0.5)
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == code, rest[-2000:]
    assert error_lines(rest) == [f"paradit: error (rank 0): {SIGNAL_EXITS[sig][1]}"]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The two intermittent cases, once each here (bench/stress.py runs them 50 times; the deterministic
# repros above catch their causes every time)
def test_stress_hang_and_abort_cases_briefly(tmp_path):
    result = tmp_path / "stress.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stress.py"), "--reps", "1", "--max-minutes", "4",
                           "--run-timeout", "90", "--json", str(result)], capture_output=True, text=True,
                          timeout=600)
    summary = json.loads(result.read_text())["summary"]
    assert all(s["runs"] >= 1 and s["ok"] == s["runs"] for s in summary.values()), proc.stdout[-3000:]


# ---------------------------------------------------------------------------------------------
# Numerical guard and library odds
def test_nan_guard_names_step_and_expert():
    pipe = Pipeline.from_pretrained("tiny")
    pipe.check_finite = True
    with torch.no_grad():
        pipe.experts[0].head.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 0 \(t=999\) from high-noise expert") as err:
        pipe("a red circle", output="latent", steps=4, progress=False)
    code, message, traceback = failure(err.value)
    assert code == 1 and not traceback and "not written" in message  # the CLI: one line, no traceback


def test_out_of_memory_is_one_line():
    code, message, traceback = failure(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                    "can't allocate memory: you tried to allocate 30 GB"))
    assert code == 1 and not traceback and message.startswith("out of memory") and "--size" in message


def test_library_rejects_bad_output_kind():
    pipe = Pipeline.from_pretrained("tiny")
    with pytest.raises(ValueError, match="'video' or 'latent'"):
        pipe("a red circle", output="gif")


def test_help_is_clean():
    proc = subprocess.run([sys.executable, "-m", "paradit.generate", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = proc.stdout
    assert "(default: None)" not in text and "`" not in text
    options = re.findall(r"^  (--[\w-]+)( [^ ].*)?$", text, flags=re.M)
    assert len(options) >= 25
    for flag in ("--prompt", "--steps", "--shift", "--seed", "--out", "--ulysses", "--ring", "--sampler",
                 "--no-progress", "--timeout"):
        block = re.search(rf"^  {flag}\b.*?(?=^  --|\Z)", text, flags=re.M | re.S).group(0)
        assert len(block.split()) > 3, f"{flag} has no help: {block!r}"
    assert "600 s" in text and "outputs/video.mp4" in text and "enlarged" in text

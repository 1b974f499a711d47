"""Bad input is named before heavy work on every rank; failures stop the whole job with the
failing rank's reason; outputs are never half-written. See docs/reliability.md."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paradit.launch import free_port, spawn
from paradit.parallel import ParallelConfig
from paradit.pipeline import Pipeline
from workers import bad_layout_on_every_rank

LAYOUT_FLAGS = {"--sp", "--ulysses", "--ring", "--cfg-par", "--dp", "--chords", "--experts", "--plan"}
HANG_GUARD_S = 120  # a run that takes longer than this has hung (normal failures take ~5-15 s)


def torchrun(nproc: int, args: list[str], env: dict | None = None, timeout: float = HANG_GUARD_S):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "paradit.generate", "--model", "tiny", "--no-progress", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}))
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.txt").write_text("\n\n")
    (d / "not_a_checkpoint").mkdir()
    return d


# (nproc, args, what the message must say); every case must exit non-zero and write nothing
BAD_CLI = [
    (2, ["--model", "wan9"], "neither a preset"),
    (2, ["--model", "{files}/not_a_checkpoint"], "not a Wan checkpoint"),
    (2, ["--size", "100x64"], "multiples of 16"),
    (2, ["--size", "64"], "WIDTHxHEIGHT"),
    (2, ["--frames", "8"], "4k\\+1"),
    (2, ["--steps", "0"], "steps=0"),
    (2, ["--shift", "-1"], "shift"),
    (2, ["--guidance", "a,b"], "--guidance"),
    (2, ["--guidance", "1,2,3"], "one number or two"),
    (2, ["--sp", "4"], "needs 4 processes, but the world has 2"),
    (2, ["--ulysses", "2", "--ring", "2"], "needs 4 processes"),
    (2, ["--sp", "2", "--cfg-par", "2"], "needs 4 processes"),
    (4, ["--ulysses", "4"], "above the model's 2 attention heads"),
    (2, ["--sp", "2", "--ulysses", "1", "--ring", "1"], "disagrees"),
    (2, ["--chords", "2", "--steps", "1"], "needs at least as many steps"),
    (2, ["--chords", "2", "--chords-init", "1,3"], "0"),
    (2, ["--chords", "2", "--chords-stop", "first"], "hit:M"),
    (2, ["--chords", "3"], "the world has 2"),
    (2, ["--chords", "2", "--chords-stop", "hit:3"], "stop=3"),
    (2, ["--experts", "split", "--stages", "1,2"], "needs 3 processes"),
    (2, ["--experts", "split", "--stages", "3"], "two GPU counts"),
    (2, ["--experts", "split", "--chords", "2"], "cannot be combined"),
    (2, ["--out", "{out}.avi"], "mp4"),
    (2, ["--prompts-file", "{files}/missing.txt"], "no such file"),
    (2, ["--prompts-file", "{files}/empty.txt"], "has no prompts"),
    (2, ["--plan", "auto"], "need a GPU kind"),
    (2, ["--device", "cuda"], "CUDA is not available"),
    (2, ["--attention", "flash"], "needs CUDA"),
]


@pytest.mark.parametrize("nproc,args,message", BAD_CLI, ids=[" ".join(a) for _, a, _ in BAD_CLI])
def test_bad_cli_input(nproc, args, message, files, tmp_path):
    if torch.cuda.is_available() and "cuda" in args + [message]:
        pytest.skip("this machine has CUDA")
    out = tmp_path / "video"
    args = [a.format(files=files, out=out) for a in args]
    if "--out" not in args:
        args += ["--out", f"{out}.mp4"]
    if not LAYOUT_FLAGS & set(args):  # a layout that fits, so that the input under test is what fails
        args += ["--sp", str(nproc)]
    proc, _ = torchrun(nproc, args)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("paradit: error")]
    assert errors, proc.stderr[-2000:]
    import re
    assert all(re.search(message, line) for line in errors), errors
    assert {line.split(")")[0] for line in errors} == {f"paradit: error (rank {r}" for r in range(nproc)}
    assert list(tmp_path.iterdir()) == [], "a failed run left files behind"


# (where, nproc, args): the injected failure must stop every rank, naming the failing rank
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
    errors = [line for line in proc.stderr.splitlines() if line.startswith("paradit: error")]
    assert len({line.split(")")[0] for line in errors}) == nproc, errors  # every rank says why
    assert all(f"rank {rank}" in line and "injected failure" in line for line in errors), errors
    # the promise is 30 s on CPU from the failure; start-up of the processes comes on top of it
    assert elapsed < 30 + 30, f"took {elapsed:.0f} s"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_the_earlier_good_output(tmp_path):
    out = tmp_path / "video.mp4"
    good, _ = torchrun(2, ["--sp", "2", "--out", str(out)])
    assert good.returncode == 0, good.stderr[-2000:]
    before = out.read_bytes()
    bad, _ = torchrun(2, ["--sp", "2", "--out", str(out)], env={"PARADIT_FAIL_AT": "0:step5"})
    assert bad.returncode != 0
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.json", "video.mp4"]  # no temp files


def test_bad_layout_fails_on_every_rank_with_the_same_message():
    messages = spawn(bad_layout_on_every_rank, 2, dict(ulysses=2, cfg=2), timeout_s=60)
    assert messages[0] == messages[1] and "needs 4 processes, but the world has 2" in messages[0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(cfg=3), "degree is 1 or 2"),
    (dict(ulysses=0), ">= 1"),
    (dict(experts="both"), "choose one of"),
    (dict(experts="split"), "stages"),
])
def test_bad_parallel_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_nan_guard_names_step_and_expert():
    pipe = Pipeline.from_pretrained("tiny")
    pipe.check_finite = True
    with torch.no_grad():
        pipe.experts[0].head.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 0 \(t=999\) from high-noise expert"):
        pipe("a red circle", output="latent", steps=4, progress=False)


def test_library_rejects_bad_output_kind():
    pipe = Pipeline.from_pretrained("tiny")
    with pytest.raises(ValueError, match="'video' or 'latent'"):
        pipe("a red circle", output="gif")

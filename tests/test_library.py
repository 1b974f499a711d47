"""The library as a user runs it: a script under torchrun, every placement through Pipeline's calls."""
import os
import subprocess
import sys
from pathlib import Path


def test_the_library_gives_the_colocated_latent_under_split_chords_and_dp(tmp_path):
    script = Path(__file__).with_name("library_script.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-4000:]


def test_every_rank_refuses_a_request_its_peers_do_not_share(tmp_path):
    """Different seeds under Ulysses 2 mixed one latent of two seeds; different steps under CFG
    parallel returned a latent with no error; different sizes under Ring 2 aborted in gloo. The
    request is compared over its group first: every rank refuses, naming the difference. And
    from_pretrained's own arguments (experts a preset lacks, components= with a preset, seed=-1)."""
    script = Path(__file__).with_name("request_script.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=280,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    cases = ("seed", "steps", "size", "prompt", "experts_needed", "components", "build seed")
    for case in cases:
        mine = [line for line in lines if line.startswith(case + " ")]
        assert len(mine) == 2 and all(line.startswith(f"{case} ok ") for line in mine), run.stdout[-4000:]
        assert mine[0] == mine[1], mine  # the same message on both ranks

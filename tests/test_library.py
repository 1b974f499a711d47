"""The library as a user runs it: a script under torchrun, every placement through Pipeline's calls."""
import subprocess
import sys
from pathlib import Path


def test_the_library_gives_the_colocated_latent_under_split_chords_and_dp(tmp_path):
    script = Path(__file__).with_name("library_script.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-4000:]

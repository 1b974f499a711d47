"""What the launcher does once per process, in a fresh interpreter (this one's logger and threads are
the test session's): the CPU threads and the rank's log handler."""
import os
import subprocess
import sys

ONCE = """
import logging, torch
from paradit import launch
log = logging.getLogger("paradit")
launch.setup_logging(0)
first = launch.set_cpu_threads()
assert torch.get_num_threads() == first
torch.set_num_threads(3)                 # the user's choice after the first build
assert launch.set_cpu_threads() == first and torch.get_num_threads() == 3, "a later build undid it"
launch.setup_logging(1, logging.DEBUG)   # init_distributed after generate.py's call: the first stands
assert len(log.handlers) == 1 and log.level == logging.INFO, (log.handlers, log.level)
log.removeHandler(log.handlers[0])       # the handler gone (a caller's reset): made again, for rank 2
launch.setup_logging(2)
assert len(log.handlers) == 1 and log.level == logging.WARNING, (log.handlers, log.level)
log.warning("made again")
"""


def test_threads_and_the_log_handler_are_set_once_per_process():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    res = subprocess.run([sys.executable, "-c", ONCE], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("cpu threads:") == 1, res.stderr        # logged once, by the first call
    assert res.stderr.splitlines()[-1] == "[paradit r2] made again", res.stderr

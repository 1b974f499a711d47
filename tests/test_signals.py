"""Signals under torchrun at the moments the first probe missed: during the imports (the first
seconds), while a rank's collective breaks because its peer has gone, and a service stopped the
normal way. Each says one line per rank, or nothing where nothing went wrong."""
import os
import re
import signal
import subprocess
import sys
import time

from paradit.generate import EXIT_PEER_FAILED, failure
from paradit.launch import free_port
from test_reliability import error_lines, ranks_reporting


def test_sigterm_during_the_imports_says_so_on_every_rank(tmp_path):
    """torch's imports take the first seconds; a SIGTERM then ended every rank silently with -15."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torchrun then says it starts them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "paradit.generate", "--model", "tiny", "--out", str(tmp_path / "x.mp4")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    lines = []
    for line in proc.stderr:  # torchrun's warning comes as it starts the workers
        lines.append(line)
        if "OMP_NUM_THREADS" in line:
            break
    time.sleep(1.0)  # the workers are importing torch (2-3 s here, more on a busy machine)
    os.killpg(proc.pid, signal.SIGTERM)  # as a terminal's or a scheduler's stop reaches the whole job
    rest = proc.communicate(timeout=60)[1]
    errors = error_lines("".join(lines) + rest)
    assert ranks_reporting(errors) == {0, 1}, rest[-3000:]
    assert all(line.endswith("terminated (SIGTERM) while starting") for line in errors), errors
    assert list(tmp_path.iterdir()) == []


def test_a_collective_broken_by_a_vanished_peer_is_one_line():
    """A peer killed without a word (SIGKILL) breaks this rank's collective: gloo's RuntimeError was
    printed with its traceback beside the line."""
    err = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                       "[127.0.0.1]:50710")
    code, message, traceback = failure(err)
    assert code == EXIT_PEER_FAILED and not traceback
    assert message.startswith("stopping because a peer rank is gone without a reason") and "Connection closed" in message


def test_a_service_under_torchrun_stops_without_an_error(tmp_path):
    """A supervisor's SIGTERM reaches every rank; rank 1 printed "error: terminated (SIGTERM)" though
    rank 0 stopped as asked."""
    from paradit.serve.process import ServerProcess
    server = ServerProcess(["--model", "tiny", "--sp", "2"], nproc=2, state_dir=tmp_path / "state").start()
    try:
        code = server.stop(timeout_s=60)
    finally:
        server.kill()
    assert code is not None, server.output[-3000:]  # torchrun's own exit status for a SIGTERM is 1
    assert error_lines(server.output) == [] and "terminated" not in server.output, server.output[-3000:]
    assert re.search(r"paradit: stopped", server.output), server.output[-3000:]

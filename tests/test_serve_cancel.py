"""DELETE of a running job under 2 processes (Ulysses 2; CHORDS, a core on each rank; split experts,
on either stage): every rank of the ranks running it stops it at the same step boundary (a CHORDS
round), the job and its files are gone, and the lane runs the next job with generate's latent."""
from __future__ import annotations

import re
from contextlib import contextmanager

import httpx
import pytest
import torch

from paradit.serve.process import ServerProcess, wait_for
from test_serve import AUTH, KEY, PROMPT, Server, latent_of

LONG = 24
N_HIGH = 10  # the demo's high-noise steps of LONG: steps 0-9 on the high stage, 10-23 on the low one
# name: (the server's layout, rank 1 slowed before the 4th boundary of each job so that the job is
# seen running before it can finish (the 3-step jobs are not), the boundary's name in the cancel's
# message and how many a job of LONG steps has, generate's flags for the next job)
COLOCATED = {
    "ulysses": (["--ulysses", "2"], "1:step3:3", "step", LONG, ()),
    # the second core starts at step 1: each core's rank loads both experts, so that a job of 3 steps
    # may follow one of 24 (their default start, step 12 of 24, loads the low-noise one alone there);
    # the first hit, the job's end, at round 1 + 23
    "chords": (["--chords", "2", "--chords-init", "0,1"], "1:round4:3", "round", LONG, ("--chords", "2",
                                                                                         "--chords-init", "0,1")),
}


def cancel(served: Server, video_id: str, at_progress: int = 0) -> None:
    """DELETE the job once it runs with more than at_progress percent done; it is gone soon after."""
    c = served.client
    wait_for(lambda: (v := c.get(f"/v1/videos/{video_id}").json())["status"] == "in_progress"
             and v["progress"] > at_progress, 120, interval_s=0.02, what="the long job running")
    r = c.delete(f"/v1/videos/{video_id}")
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    wait_for(lambda: c.get(f"/v1/videos/{video_id}").status_code == 404, 60, what="the job gone")


def next_job_is_generates(served: Server, tmp_path, flags: tuple[str, ...] = ()) -> None:
    """Then a short job completes on the same lane, with generate's latent (generate given `flags`)."""
    from safetensors.torch import load_file

    from paradit.generate import main
    after = served.finished(served.submit(seed=5, num_inference_steps=3)["id"])
    assert after["status"] == "completed", after
    out = tmp_path / "ref.mp4"
    assert main(["--model", "demo", *flags, "--prompt", PROMPT, "--seed", "5", "--steps", "3",
                 "--save-latents", "--no-progress", "--out", str(out)]) == 0
    # fp32, the layouts' other reduction orders than one process: rounding only
    torch.testing.assert_close(latent_of(served.state_dir, after["id"]),
                               load_file(out.with_suffix(".latent.safetensors"))["latent"], rtol=1e-5, atol=1e-5)
    assert len(list(served.state_dir.glob("videos/*.mp4"))) == 1   # the cancelled jobs' files never were


@contextmanager
def two_process_server(tmp_path, name: str, layout: list[str], delay_at: str):
    """(process, Server) of a 2-process server with `layout`, its ranks slowed at PARADIT_DELAY_AT;
    on leaving, the server must still be alive (a cancel must not kill it)."""
    proc = ServerProcess([*layout, "--api-key", KEY, "--save-latents"], nproc=2, state_dir=tmp_path / "state",
                         env={"PARADIT_DELAY_AT": delay_at}).launch()
    with proc, httpx.Client(base_url=proc.url, headers=AUTH, timeout=30) as client:
        yield proc, Server(name, proc.wait_ready(), client, proc.state_dir)
        assert proc.proc.poll() is None, proc.output[-3000:]


@pytest.mark.parametrize("name", list(COLOCATED))
def test_a_running_job_is_cancelled_on_every_rank(tmp_path, name):
    layout, slow, unit, count, flags = COLOCATED[name]
    with two_process_server(tmp_path, f"cancel-{name}", layout, slow) as (proc, served):
        cancel(served, served.submit(num_inference_steps=LONG, seed=1)["id"])
        stopped = re.findall(rf"cancelled at {unit} (\d+) of {count}\b", proc.output)
        assert len(stopped) == 1 and int(stopped[0]) < count, proc.output[-3000:]
        assert not list(served.state_dir.glob("videos/*"))   # nothing written, not even in part
        next_job_is_generates(served, tmp_path, flags)


def test_split_experts_cancel_on_either_stage(tmp_path):
    # each stage slowed once a job (the high one before step 3, the low one before step 13), so that
    # the test sees the job on the stage it means to cancel it on
    with two_process_server(tmp_path, "cancel-split", ["--experts", "split"], "0:step3:3,1:step13:3") as (proc, served):
        # on the high stage: the low stage is told at the hand-off and skips the job
        cancel(served, served.submit(num_inference_steps=LONG, seed=1)["id"])
        # on the low stage, once it has run two of its steps (the high stage is free for the next job)
        cancel(served, served.submit(num_inference_steps=LONG, seed=2)["id"], at_progress=100 * (N_HIGH + 1) // LONG)
        stopped = [int(n) for n in re.findall(rf"cancelled at step (\d+) of {LONG}", proc.output)]
        assert len(stopped) == 2 and stopped[0] <= N_HIGH < stopped[1], proc.output[-3000:]
        next_job_is_generates(served, tmp_path)   # the stages still count their hand-offs alike

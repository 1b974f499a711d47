"""paradit serve after failures: a failing rank ends the service with its reason, the failing job
marked failed first; kill -9 with jobs queued and running; every restart on the same state
directory finishes or fails, with a message, every job it had accepted."""
from __future__ import annotations

import httpx

from paradit.serve.jobs import JobStore
from paradit.serve.process import ServerProcess, wait_for

PROMPT = "a yellow triangle moving down"
# With the demo model at 8 steps, steps 0-3 are high-noise and 4-7 low-noise; at 4 steps, 0-1 and
# 2-3. So under split experts this fails on rank 1 (the low-noise stage) in 8-step jobs only.
FAIL_AT = "1:step5"


def submit(c: httpx.Client, steps: int, seed: int = 0) -> str:
    r = c.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": steps, "seed": seed})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def finished(c: httpx.Client, video_id: str, timeout_s: float = 90) -> dict:
    def done():
        v = c.get(f"/v1/videos/{video_id}").json()
        return v if v["status"] in ("completed", "failed") else None
    return wait_for(done, timeout_s, what=f"job {video_id} finishing")


def statuses(state) -> dict[str, tuple[str, str | None]]:
    store = JobStore(state)
    try:
        return {j.id: (j.status, j.error) for j in store.list(100)}
    finally:
        store.close()


def test_failure_kill_and_restarts_lose_no_job(tmp_path):
    state = tmp_path / "state"
    # 1. split experts; rank 1 fails inside the second job, while the high stage works ahead
    with ServerProcess(["--experts", "split"], nproc=2, state_dir=state, env={"PARADIT_FAIL_AT": FAIL_AT}) as s:
        c = httpx.Client(base_url=s.url, timeout=30)
        ok = submit(c, 4)
        assert finished(c, ok)["status"] == "completed"
        doomed = submit(c, 8, seed=1)
        behind = [submit(c, 4, seed=k) for k in range(2, 5)]
        code = s.wait(90)
    assert code != 0, s.output[-3000:]
    errors = [line for line in s.output.splitlines() if line.startswith("paradit: error")]
    assert {line.split(")")[0] for line in errors} == {"paradit: error (rank 0", "paradit: error (rank 1"}, errors
    assert all("rank 1" in line and "injected failure at step5" in line for line in errors), errors
    after_crash = statuses(state)
    assert after_crash[ok] == ("completed", None)
    status, message = after_crash[doomed]
    assert status == "failed" and "injected failure at step5" in message, after_crash[doomed]
    assert all(after_crash[b][0] in ("queued", "completed") for b in behind), after_crash  # back in the queue

    # 2. restart on one process: the interrupted jobs run; the failed one stays failed, with its reason
    with ServerProcess([], state_dir=state) as s:
        c = httpx.Client(base_url=s.url, timeout=30)
        assert all(finished(c, b)["status"] == "completed" for b in behind)
        v = c.get(f"/v1/videos/{doomed}").json()
        assert v["status"] == "failed" and "injected failure" in v["error"]["message"]
        assert c.get(f"/v1/videos/{ok}/content").content[4:8] == b"ftyp"  # earlier videos survive restarts
        # 3. kill -9 with one job running and two queued
        running = submit(c, 60, seed=7)
        queued = [submit(c, 4, seed=k) for k in (8, 9)]
        wait_for(lambda: c.get(f"/v1/videos/{running}").json()["progress"] > 0, 60, interval_s=0.02,
                 what="the long job running")
        s.kill()
    killed = statuses(state)
    assert killed[running][0] == "in_progress" and all(killed[q][0] == "queued" for q in queued), killed

    # 4. restart: every job ever accepted ends completed, or failed with a message
    with ServerProcess([], state_dir=state) as s:
        c = httpx.Client(base_url=s.url, timeout=30)
        assert finished(c, running)["status"] == "completed"   # run again: its first attempt was killed
        for q in queued:
            assert finished(c, q)["status"] == "completed"
        listed = c.get("/v1/videos", params={"limit": 100}).json()["data"]
        # 5. SIGTERM, as a supervisor stops a service: exit 0, the running job back in the queue
        last = submit(c, 60, seed=10)
        wait_for(lambda: c.get(f"/v1/videos/{last}").json()["progress"] > 0, 60, interval_s=0.02,
                 what="the last job running")
        assert s.stop() == 0, s.output[-2000:]
    accepted = {ok, doomed, *behind, running, *queued}
    assert {v["id"] for v in listed} == accepted
    for v in listed:
        assert v["status"] == "completed" or (v["status"] == "failed" and v["error"]["message"]), v
    store = JobStore(state)
    stopped = store.get(last)
    assert (stopped.status, stopped.attempts) == ("queued", 0)  # a clean stop costs the job no attempt
    store.close()


def test_a_server_that_exits_at_once_fails_fast_with_its_status(tmp_path):
    """A server that dies while starting (here: a flag it refuses; on a GPU machine it was an import
    error) is reported at once with its exit status and last output, not after the ready timeout,
    also while a child that outlives it holds its output open (the sleep the wrapper leaves behind)."""
    import time

    import pytest
    keep_open = ["sh", "-c", 'sleep 300 & exec "$@"', "sh"]
    server = ServerProcess(["--port-typo", "1"], state_dir=tmp_path / "state", ready_timeout_s=280, wrap=keep_open)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited with status 2 before it was ready:\n(.|\n)*--port-typo"):
        server.launch().wait_ready()
    assert time.monotonic() - t0 < 120      # the whole start-up of a tiny server, not the 280 s
    assert server.proc.poll() is not None

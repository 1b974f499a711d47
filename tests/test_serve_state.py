"""paradit serve with a damaged or full state directory: a database that is not SQLite, truncated,
or another program's stops the start with the file named and the fix; one unreadable job fails
alone; a killed service's temporaries are removed at the next start; on a full disk POST answers
507 with the reason, a job whose video cannot be written fails with it, what was accepted stays,
and once space is freed jobs run again. That server listens on ::1 without a key (loopback)."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from paradit.serve.jobs import JobStore
from paradit.serve.process import ServerProcess, wait_for

PROMPT = "a green circle moving right"
REQUEST = {"prompt": PROMPT, "negative_prompt": None, "width": 16, "height": 16, "frames": 9, "steps": 2,
           "shift": 5.0, "guidance": [4.0, 3.0], "seed": 1, "sampler": "unipc"}


# ----------------------------------------------------------------------------- damaged databases
def damaged(kind: str, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(os.urandom(8192))
    elif kind == "truncated":
        store = JobStore(path.parent)
        for _ in range(200):
            store.add("demo", REQUEST | {"prompt": PROMPT * 20})
        store._run("PRAGMA wal_checkpoint(TRUNCATE)")
        store.close()
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "foreign":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE users (name TEXT)")
    elif kind == "foreign-jobs":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE jobs (id INTEGER, payload BLOB)")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "foreign", "foreign-jobs"])
def test_a_damaged_database_is_named_with_the_fix(tmp_path, kind):
    db = tmp_path / "jobs.sqlite3"
    damaged(kind, db)
    with pytest.raises(ValueError, match="is not a usable paradit job database") as err:
        JobStore(tmp_path)
    assert str(db) in str(err.value) and "move it away" in str(err.value)


def test_a_damaged_database_stops_the_service_with_the_reason(tmp_path):
    damaged("garbage", tmp_path / "jobs.sqlite3")
    proc = subprocess.run([sys.executable, "-m", "paradit.serve", "--port", "0", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"paradit: error (rank 0): --state-dir: {tmp_path / 'jobs.sqlite3'} is not a usable" in proc.stderr
    assert "move it away" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- a state directory on a small disk
def mount_wrapper(seed, mount) -> list[str] | None:
    """A command line that mounts a 96 MiB tmpfs on `mount` (in a mount namespace of the server's
    own), copies `seed` into it and execs the rest; None where this machine cannot (no unshare, or
    no user namespaces and not root)."""
    if shutil.which("unshare") is None:
        return None
    script = 'mount -t tmpfs -o size=96m tmpfs "$0" && cp -a "$1/." "$0/" && shift && exec "$@"'
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(seed)],
                           capture_output=True)
    return ["unshare", "-rm", "sh", "-c", script, str(mount), str(seed)] if probe.returncode == 0 else None


def fill(folder) -> None:
    """Write until the filesystem is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass


def finished(c: httpx.Client, video_id: str) -> dict:
    def done():
        v = c.get(f"/v1/videos/{video_id}").json()
        return v if v["status"] in ("completed", "failed") else None
    return wait_for(done, 90, what=f"job {video_id} finishing")


def test_full_disk_unreadable_job_and_leftovers(tmp_path):
    seed, mount = tmp_path / "seed", tmp_path / "state"
    store = JobStore(seed)
    good, bad = store.add("demo", REQUEST), store.add("demo", REQUEST | {"seed": 2})
    store._run("UPDATE jobs SET request = '{\"prompt\": ' WHERE seq = ?", (bad.seq,))  # unreadable JSON
    store.close()
    (seed / "videos" / ".00000007.tmp4242.mp4").write_bytes(b"half a video")   # a killed service's
    mount.mkdir()
    wrap = mount_wrapper(seed, mount)
    if wrap is None:
        message = "cannot mount a small filesystem here (unshare -rm: root or user namespaces needed)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with ServerProcess([], state_dir=mount, host="::1", wrap=wrap, env={"PARADIT_DELAY_AT": "0:step5:3"}) as s:
        assert s.url.startswith("http://[::1]:")                  # loopback: no key needed
        inside = Path(f"/proc/{s.proc.pid}/root{mount}")  # the server's view of its tmpfs
        c = httpx.Client(base_url=s.url, timeout=30)
        assert finished(c, good.id)["status"] == "completed"
        v = c.get(f"/v1/videos/{bad.id}").json()
        assert v["status"] == "failed" and "unreadable" in v["error"]["message"] and v["prompt"] is None, v
        assert len(c.get("/v1/videos").json()["data"]) == 2
        assert not list(inside.glob("videos/.*")), list(inside.glob("videos/*"))  # the leftover is gone

        # the disk fills while a job runs: POST answers 507, the running job fails with the reason
        running = c.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 8}).json()
        wait_for(lambda: c.get(f"/v1/videos/{running['id']}").json()["progress"] > 0, 60, interval_s=0.05,
                 what="the job running")
        fill(inside)
        r = c.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 2})
        assert r.status_code == 507, r.text
        assert "free space there" in r.json()["error"]["message"] and str(mount) in r.json()["error"]["message"]
        wait_for(lambda: "the state directory" in s.output and "is full" in s.output, 60,
                 what="the scheduler finding the disk full")   # the job's end waits to be recorded
        assert c.get(f"/v1/videos/{running['id']}").json()["status"] == "in_progress"
        assert c.get(f"/v1/videos/{good.id}/content").content[4:8] == b"ftyp"   # what was accepted stays
        assert not list(inside.glob("videos/.*"))                               # no half-written file

        # space again: the job's end is recorded, with the reason; jobs run
        (inside / "filler").unlink()
        failed = finished(c, running["id"])
        assert failed["status"] == "failed" and "could not be written" in failed["error"]["message"], failed
        again = c.post("/v1/videos", json={"prompt": PROMPT, "num_inference_steps": 2})
        assert again.status_code == 200, again.text
        assert finished(c, again.json()["id"])["status"] == "completed"
        assert s.proc.poll() is None
    assert "Traceback" not in s.output, s.output[-3000:]

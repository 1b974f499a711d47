"""Durable job state: one SQLite database under --state-dir, written by rank 0 only.

Every accepted job is committed before the client hears about it. A job is `queued` until the
scheduler hands it to the engine (`in_progress`, its attempt counted), then `completed` (its video
written first, atomically) or `failed` with a message. After a crash, `recover()` puts the jobs
that were running back in the queue, unless they were already interrupted MAX_ATTEMPTS times
(then they fail with that reason, so that a job that kills the service cannot do so forever).

Ids are opaque random strings, looked up as query parameters; file names come from the row's own
integer key, never from an id.

A job's first frame (an I2V / TI2V request's input_reference, stored under inputs/ by
paradit.serve.images) lives as long as the job may run: it is deleted when the job ends (completed,
failed, cancelled) or is deleted, and kept while it is queued or running, a job put back in the
queue included. Its record keeps the file's name. At start, inputs/ files no queued job names are
removed (a job accepted before this rule, or a crash between the file and its row).

A damaged database (not SQLite, truncated, another program's tables) stops the service at start
with the file named and the fix; one row whose stored request is unreadable fails that job alone.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("queued", "in_progress", "completed", "failed")
CHOOSE_FROM = 16   # queued jobs the scheduler may choose among (for fewer LoRA switches)
MAX_ATTEMPTS = 2
MIN_FREE = 64 * 2**20  # bytes free under the state directory below which no job is accepted (HTTP 507)
INPUT_NAME = re.compile(r"inputs/[0-9a-f]{32}\.png")   # paradit.serve.images.store_image's names, and no other

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT UNIQUE NOT NULL,
    status       TEXT NOT NULL,
    model        TEXT NOT NULL,
    request      TEXT NOT NULL,   -- JSON: prompt, negative_prompt and the resolved video settings
    created_at   REAL NOT NULL,
    started_at   REAL,
    completed_at REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    file         TEXT,            -- the video, relative to the state directory, once completed
    timings      TEXT             -- JSON: stage spans and step times of the finished run
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
COLUMNS = ("seq", "id", "status", "model", "request", "created_at", "started_at", "completed_at", "attempts",
           "error", "file", "timings")


@dataclass(frozen=True)
class Job:
    seq: int
    id: str
    status: str
    model: str
    request: dict
    created_at: float
    started_at: float | None
    completed_at: float | None
    attempts: int
    error: str | None
    file: str | None
    timings: dict | None
    unreadable: str | None = None   # why the stored request could not be read (the request is then {})

    @property
    def video_file(self) -> str:
        """Where this job's video goes, relative to the state directory (from the row key only)."""
        return f"videos/{self.seq:08d}.mp4"


def disk_full(err: BaseException) -> bool:
    """SQLite could not write for want of space (SQLITE_FULL)."""
    return isinstance(err, sqlite3.OperationalError) and "full" in str(err)


def _job(row) -> Job:
    d = dict(row)
    try:
        d["request"] = json.loads(d["request"])
        if not isinstance(d["request"], dict):
            raise TypeError(f"a JSON {type(d['request']).__name__}, not an object")
    except (ValueError, TypeError) as err:
        d["request"], d["unreadable"] = {}, f"its stored request is unreadable ({type(err).__name__}: {err})"
    try:
        d["timings"] = json.loads(d["timings"]) if d["timings"] else None
    except (ValueError, TypeError):
        d["timings"] = None   # only shown: a job's timings never decide anything
    return Job(**d)


def open_database(path: Path) -> sqlite3.Connection:
    """The jobs database at path, made if new; ValueError naming the file and the fix if it is not
    SQLite, is damaged, or holds tables paradit does not make."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit survives a power cut, not only a kill
        problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("damaged: " + "; ".join(problems[:3]))
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = tuple(r[1] for r in db.execute("PRAGMA table_info(jobs)"))
        if tables - {"jobs", "sqlite_sequence"} or columns not in ((), COLUMNS):
            raise sqlite3.DatabaseError(f"another program's tables ({', '.join(sorted(tables))}; jobs columns: "
                                        f"{', '.join(columns) or 'none'})")
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError as err:
        db.close()
        raise ValueError(f"--state-dir: {path} is not a usable paradit job database ({err}): move it away (the "
                         f"service then starts a new one beside the videos) or give another --state-dir") from None
    db.row_factory = sqlite3.Row
    return db


class JobStore:
    """The jobs table; every method is one transaction, safe to call from any thread."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        (self.dir / "videos").mkdir(parents=True, exist_ok=True)
        self.db = open_database(self.dir / "jobs.sqlite3")
        self.lock = threading.Lock()

    def _run(self, sql: str, args=()) -> sqlite3.Cursor:
        with self.lock:
            return self.db.execute(sql, args)

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ the API's side
    def add(self, model: str, request: dict) -> Job:
        """Insert a queued job and commit it; returns it with its new id."""
        job_id = "video_" + secrets.token_hex(16)
        self._run("INSERT INTO jobs (id, status, model, request, created_at) VALUES (?, 'queued', ?, ?, ?)",
                  (job_id, model, json.dumps(request), time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        row = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, limit: int, order: str = "desc", after: Job | None = None) -> list[Job]:
        assert order in ("asc", "desc")
        where, args = ("", ())
        if after is not None:
            where, args = ("WHERE seq > ?" if order == "asc" else "WHERE seq < ?"), (after.seq,)
        rows = self._run(f"SELECT * FROM jobs {where} ORDER BY seq {order.upper()} LIMIT ?", (*args, limit))
        return [_job(r) for r in rows.fetchall()]

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.dir).free

    def counts(self) -> dict[str, int]:
        rows = self._run("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {s: 0 for s in STATUSES} | {s: n for s, n in rows}

    def delete(self, job: Job, allowed: tuple[str, ...]) -> bool:
        """Delete the row if its status is still one of `allowed` (checked in the same statement), and
        its first frame with it."""
        marks = ",".join("?" * len(allowed))
        cur = self._run(f"DELETE FROM jobs WHERE seq = ? AND status IN ({marks})", (job.seq, *allowed))
        if cur.rowcount == 1:
            self.drop_input(job.request)
        return cur.rowcount == 1

    def drop_input(self, request: dict) -> None:
        """Delete the first frame a request stored, if any: its job has ended, or was never accepted."""
        name = request.get("image")
        if isinstance(name, str) and INPUT_NAME.fullmatch(name):
            (self.dir / name).unlink(missing_ok=True)

    def _ended(self, seq: int) -> None:
        """A job has ended: every rank of its lane read its first frame when it started, and it never runs
        again."""
        row = self._run("SELECT * FROM jobs WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            self.drop_input(_job(row).request)

    # ------------------------------------------------------------------ the scheduler's side
    def next_queued(self, choose=None) -> Job | None:
        """Take the oldest queued job, or choose(the oldest CHOOSE_FROM queued jobs) -> one of them:
        in_progress now, its attempt counted (one transaction)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                rows = self.db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT ?",
                                       (CHOOSE_FROM if choose else 1,)).fetchall()
                row = None if not rows else rows[0] if choose is None else \
                    rows[[j.seq for j in map(_job, rows)].index(choose([_job(r) for r in rows]).seq)]
                if row is not None:
                    self.db.execute("UPDATE jobs SET status = 'in_progress', started_at = ?, attempts = attempts + 1 "
                                    "WHERE seq = ?", (time.time(), row["seq"]))
                    row = self.db.execute("SELECT * FROM jobs WHERE seq = ?", (row["seq"],)).fetchone()
                self.db.execute("COMMIT")
            except BaseException:  # a full disk, say: the job stays queued
                self.db.execute("ROLLBACK")
                raise
        return None if row is None else _job(row)

    def complete(self, seq: int, file: str, timings: dict) -> None:
        self._run("UPDATE jobs SET status = 'completed', completed_at = ?, file = ?, timings = ?, error = NULL "
                  "WHERE seq = ?", (time.time(), file, json.dumps(timings), seq))
        self._ended(seq)

    def fail(self, seq: int, message: str) -> None:
        self._run("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE seq = ?",
                  (time.time(), message, seq))
        self._ended(seq)

    def requeue(self, seq: int) -> None:
        """Back in the queue without counting the attempt (the service stopped, the job did not fail)."""
        self._run("UPDATE jobs SET status = 'queued', started_at = NULL, attempts = MAX(0, attempts - 1) "
                  "WHERE seq = ? AND status = 'in_progress'", (seq,))

    def recover(self, model: str, check) -> dict[str, int]:
        """At start-up: settle what a crash or kill left behind. check(request) -> error message or
        None validates a stored request against the model this service now runs."""
        out = {"requeued": 0, "failed": 0, "missing": 0, "temporaries": self.remove_temporaries(), "inputs": 0}
        statements = []
        for job in map(_job, self._run("SELECT * FROM jobs WHERE status IN ('queued', 'in_progress')").fetchall()):
            if job.unreadable:
                message = job.unreadable
            elif job.model != model:
                message = f"accepted for model {job.model!r}, but the service restarted with {model!r}"
            elif job.status == "in_progress" and job.attempts >= MAX_ATTEMPTS:
                message = (f"the service stopped while running this job {job.attempts} times (killed or "
                           f"crashed); it is not retried again")
            else:
                message = check(job.request)
            if message is not None:
                statements.append(("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE seq = ?",
                                   (time.time(), message, job.seq)))
                out["failed"] += 1
            elif job.status == "in_progress":
                statements.append(("UPDATE jobs SET status = 'queued', started_at = NULL WHERE seq = ?", (job.seq,)))
                out["requeued"] += 1
        for job in map(_job, self._run("SELECT * FROM jobs WHERE status = 'completed'").fetchall()):
            if not (self.dir / job.file).is_file():
                statements.append(("UPDATE jobs SET status = 'failed', error = ? WHERE seq = ?",
                                   (f"its video {job.file} is missing from the state directory", job.seq)))
                out["missing"] += 1
        self._transaction(statements)
        out["inputs"] = self.remove_unused_inputs()
        return out

    def remove_unused_inputs(self) -> int:
        """At start: the first frames no queued job names (those of jobs that failed just now included)."""
        live = {_job(r).request.get("image") for r in self._run("SELECT * FROM jobs WHERE status = 'queued'")}
        found = [f for f in (self.dir / "inputs").glob("*") if f.is_file() and f"inputs/{f.name}" not in live]
        for f in found:
            f.unlink(missing_ok=True)
        return len(found)

    def remove_temporaries(self) -> int:
        """Files a killed service was writing (paradit.outputs names them `.paradit-tmpPID-N`): at
        start, before any job runs, every hidden file in videos/ is one."""
        found = [f for f in (self.dir / "videos").glob(".*") if f.is_file()]
        for f in found:
            f.unlink(missing_ok=True)
        return len(found)

    def close(self) -> None:
        with self.lock:
            self.db.close()

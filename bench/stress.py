"""Stress: the two formerly intermittent failures (a hang while writing, an abort after success),
each case run N times under torchrun.

    python bench/stress.py --reps 50            # both cases, 50 runs each (about 35 min on 2 cores)
    python bench/stress.py --reps 3 --json -    # what the test suite runs

hang:  torchrun --nproc-per-node 2 -m paradit.generate --model tiny --cfg-par 2 --guidance 1
       (the output rank writes the video while the other rank waits in the final all_reduce)
abort: torchrun --nproc-per-node 2 -m paradit.generate --model tiny --plan auto --gpu h100
       (the planner picks dp=2 for one prompt: one rank idles to the end, with its failure watcher)

A run passes if it exits 0 within --run-timeout with the video and its sidecar in place, no
temporary file beside them, and no abort message on stderr. Prints a table; writes
bench/results/<date>_<machine>_stress.json (or --json PATH, '-' for stdout only). Bounded: stops
starting runs after --max-minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import environment, machine_description, machine_tag, results_path, write_json  # noqa: E402

from paradit.launch import free_port  # noqa: E402

CASES = {
    "hang": ["--model", "tiny", "--cfg-par", "2", "--guidance", "1"],
    "abort": ["--model", "tiny", "--plan", "auto", "--gpu", "h100"],
}


def run_once(case: str, folder: Path, timeout_s: float) -> dict:
    out = folder / "x.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "paradit.generate", *CASES[case], "--out", str(out)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        verdict = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and its workers: the session started above
        stdout, stderr = proc.communicate()
        verdict = "hang"
    elapsed = time.monotonic() - t0
    files = sorted(p.name for p in folder.iterdir())
    if verdict is None:
        if "terminate called" in stderr or "SIGABRT" in stderr or "Signal 6" in stderr:
            verdict = "abort"
        elif proc.returncode != 0:
            verdict = f"exit {proc.returncode}"
        elif files != ["x.json", "x.mp4"]:
            verdict = f"files {files}"
        else:
            verdict = "ok"
    return {"case": case, "verdict": verdict, "seconds": round(elapsed, 2), "files": files,
            "stderr_tail": "" if verdict == "ok" else stderr[-1500:]}


def table(summary: dict) -> str:
    rows = [("case", "runs", "ok", "hang", "abort", "other", "median s", "max s")]
    for case, s in summary.items():
        rows.append((case, str(s["runs"]), str(s["ok"]), str(s["hang"]), str(s["abort"]), str(s["other"]),
                     f"{s['median_s']:.1f}", f"{s['max_s']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=50, help="runs of each case")
    ap.add_argument("--cases", default="hang,abort", help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--run-timeout", type=float, default=120.0, help="a run longer than this has hung (s)")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="start no run after this many minutes")
    ap.add_argument("--json", default=None, help="result path; '-': print only")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    runs, start = [], time.monotonic()
    for rep in range(args.reps):
        for case in cases:
            if time.monotonic() - start > 60 * args.max_minutes:
                break
            with tempfile.TemporaryDirectory(prefix=f"stress_{case}_") as d:
                r = run_once(case, Path(d), args.run_timeout)
            runs.append(r)
            print(f"{case} {rep + 1}/{args.reps}: {r['verdict']} ({r['seconds']:.1f} s)", flush=True)
    summary = {}
    for case in cases:
        rs = [r for r in runs if r["case"] == case]
        secs = [r["seconds"] for r in rs] or [0.0]
        summary[case] = {"runs": len(rs), "ok": sum(r["verdict"] == "ok" for r in rs),
                         "hang": sum(r["verdict"] == "hang" for r in rs),
                         "abort": sum(r["verdict"] == "abort" for r in rs),
                         "other": sum(r["verdict"] not in ("ok", "hang", "abort") for r in rs),
                         "median_s": statistics.median(secs), "max_s": max(secs)}
    print(table(summary))
    result = {"what": "stress: hang and abort cases under torchrun, 2 gloo processes",
              "machine": machine_description("cpu"), "environment": environment(), "reps": args.reps,
              "run_timeout_s": args.run_timeout, "summary": summary,
              "failures": [r for r in runs if r["verdict"] != "ok"]}
    if args.json == "-":
        print(json.dumps(summary))
    else:
        path = Path(args.json) if args.json else results_path("stress", "json", tag=machine_tag("cpu"))
        print(f"wrote {write_json(path, result)}")
    return 0 if all(s["ok"] == s["runs"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

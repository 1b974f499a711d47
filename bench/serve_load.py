"""Throughput of paradit serve under load: split experts against colocated layouts, same processes.

    python bench/serve_load.py                          # 2 processes: split, U2, CFG2, DP2; and 1 process
    python bench/serve_load.py --jobs 32 --steps 24 --layouts split,U2 --nproc 2

Each layout runs as a real service (python -m paradit.serve, under torchrun for more than one
process; bench/launcher-free: paradit.serve.process.ServerProcess, 127.0.0.1, a free port), with
the demo model. After one untimed warm-up job, --clients concurrent HTTP clients submit --jobs jobs
(the queue holds them all); the clock runs from the first POST to the moment the last job reads
completed (the list polled every 50 ms). Reported per layout: throughput (jobs per minute), makespan, mean
and max latency (accepted to completed, from the video objects' timings), and for split experts
how many jobs ran their high-noise steps while the low-noise stage ran an earlier job's (request
N+1's, or N+2's when the low stage is the slower one, while request N's low-noise steps run). Writes bench/results/<date>_<machine>_serve_load.{json,png}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
import httpx  # noqa: E402
from launcher import environment, machine_description, results_path, write_json  # noqa: E402

from paradit.serve.process import ServerProcess, wait_for  # noqa: E402

FLAGS = {"split": ["--experts", "split"], "U2": ["--ulysses", "2"], "CFG2": ["--cfg-par", "2"],
         "DP2": ["--dp", "2"], "single": []}


def run_layout(name: str, nproc: int, args, state_dir: Path) -> dict:
    body = {"prompt": "a red circle moving right", "num_inference_steps": args.steps}
    with ServerProcess([*FLAGS[name], "--max-queue", str(args.jobs + 1)], nproc=nproc, state_dir=state_dir) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        def finished(video_id):
            v = c.get(f"/v1/videos/{video_id}").json()
            return v if v["status"] in ("completed", "failed") else None
        warm = c.post("/v1/videos", json=body).json()["id"]
        wait_for(lambda: finished(warm), 300, what="the warm-up job")
        ids, lock = [], threading.Lock()

        def client(k):
            with httpx.Client(base_url=s.url, timeout=60) as own:
                for j in range(k, args.jobs, args.clients):
                    r = own.post("/v1/videos", json=body | {"seed": j})
                    r.raise_for_status()
                    with lock:
                        ids.append(r.json()["id"])
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        videos = {}
        while len(videos) < len(ids):  # one list request per poll: polling must not load the server
            listed = c.get("/v1/videos", params={"limit": 100}).json()["data"]
            videos |= {v["id"]: v for v in listed if v["id"] in ids and v["status"] in ("completed", "failed")}
            time.sleep(0.05)
        makespan = time.perf_counter() - t0
    failed = [v for v in videos.values() if v["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} jobs failed, e.g. {failed[0]['error']}")
    latencies = [v["timings"]["queued_s"] + v["timings"]["run_s"] for v in videos.values()]
    row = {"layout": name, "processes": nproc, "flags": FLAGS[name], "jobs": len(videos), "makespan_s": makespan,
           "throughput_per_min": 60 * len(videos) / makespan, "latency_mean_s": statistics.mean(latencies),
           "latency_max_s": max(latencies)}
    if name == "split":  # jobs whose high-noise steps ran while the low stage ran an earlier job's
        spans = sorted((v["timings"]["stages"] for v in videos.values()), key=lambda st: st[0]["start"])
        row["pipelined_jobs"] = sum(any(high["start"] < low["end"] and low["start"] < high["end"]
                                        for _, low in spans[:k]) for k, (high, _) in enumerate(spans))
    print(f"{name:>7} x{nproc}: {row['throughput_per_min']:6.1f} jobs/min, makespan {makespan:6.2f} s, "
          f"latency mean {row['latency_mean_s']:.2f} s" +
          (f", {row['pipelined_jobs']} of {len(spans)} jobs ran high-noise steps during an earlier job's "
           f"low-noise steps" if name == "split" else ""), flush=True)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [f"{r['layout']} ({r['processes']}p)" for r in rows]
    ax.bar(names, [r["throughput_per_min"] for r in rows], color=["#c44" if r["layout"] == "split" else "#48a"
                                                                    for r in rows])
    ax.set_ylabel("jobs per minute")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="split,U2,CFG2,DP2", help=f"of {', '.join(FLAGS)}, on --nproc processes")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--single", action=argparse.BooleanOptionalAction, default=True, help="also one process")
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=24, help="denoising steps per job (the demo model's default)")
    p.add_argument("--out-dir", help="default: bench/results")
    args = p.parse_args(argv)
    if not 1 <= args.jobs <= 99:
        p.error("--jobs: give 1 to 99 (the completed jobs are read from one page of the list)")
    plan = [(name, args.nproc) for name in args.layouts.split(",")] + ([("single", 1)] if args.single else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, nproc) in enumerate(plan):
            rows.append(run_layout(name, nproc, args, Path(tmp) / f"state{k}"))
    split = next((r for r in rows if r["layout"] == "split"), None)
    colocated = [r for r in rows if r["layout"] not in ("split", "single") and r["processes"] == args.nproc]
    ratios = {r["layout"]: split["throughput_per_min"] / r["throughput_per_min"] for r in colocated} if split else {}
    for name, ratio in ratios.items():
        print(f"split / {name}: {ratio:.2f}x throughput")
    data = {"what": "paradit serve throughput under load", "method": __doc__, "model": "demo", "steps": args.steps,
            "jobs": args.jobs, "clients": args.clients, "machine": machine_description("cpu"),
            "environment": environment(), "rows": rows, "split_over_colocated": ratios}
    path = write_json(results_path("serve_load", "json", args.out_dir), data)
    plot(rows, path.with_suffix(".png"), f"paradit serve, demo model, {args.jobs} jobs x {args.steps} steps, "
                                         f"{machine_description('cpu')}")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

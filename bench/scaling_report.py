"""scaling.py's report: the table it prints and its figures (latency, speedup, efficiency and comm
share against the world; weights per rank; measured against predicted time when the run has one
world), drawn from the points of a run or of a results JSON (--replot)."""
from __future__ import annotations

from pathlib import Path


# ============================================================================ the table
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def _ms(x) -> str:
    return "-" if x is None else f"{1e3 * x:.4g}"


def table(points: list[dict]) -> str:
    head = ("world", "layout", "attn", "measure", "step ms [min-max]", "pred ms", "fit ms", "meas/pred",
            "speedup", "eff", "comm % (pred)", "peak MB", "weights MB/rank", "MB/step/rank", "TFLOP/s/dev")
    rows = [head]
    for p in points:
        pred, fit, st = p["predicted"], p.get("predicted_fit", {}), p["step_s"]
        ratio = st["headline"] / pred["step_s"] if pred.get("step_s") else None
        moved = sum(t["bytes_per_rank_max"] for t in p["traffic_per_step"].values()) / 2**20
        rows.append((str(p["world"]), p["label"] + (" ?" if p.get("suspect") else ""), p["backend"], p["measure"],
                     f"{_ms(st['headline'])} [{_ms(st['min'])}-{_ms(st['max'])}]", _ms(pred.get("step_s")),
                     _ms(fit.get("step_s")), "-" if ratio is None else f"{ratio:.3g}",
                     "-" if p["speedup"] is None else f"{p['speedup']:.2f}",
                     "-" if p["efficiency"] is None else f"{p['efficiency']:.2f}",
                     f"{100 * p['comm_share']:.0f} ({_pct(pred.get('comm_share'))})",
                     f"{p['peak_mem_mb']['max']:.0f}", f"{p.get('weights_mb', {}).get('max', float('nan')):.3g}",
                     f"{moved:.3g}", f"{p['achieved_tflops_per_device']:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


# ============================================================================ the figures
def families(points: list[dict]) -> dict[str, list[dict]]:
    """Curve per (family, backend) over worlds; each includes the single-device baseline."""
    out: dict[str, list[dict]] = {}
    multi_backend = len({p["backend"] for p in points}) > 1
    for p in points:
        if p["measure"] != "step":
            continue
        for fam in p["families"]:
            if fam == "1":
                continue
            name = fam + (f" [{p['backend']}]" if multi_backend else "")
            out.setdefault(name, []).append(p)
    for name, pts in out.items():
        backend = pts[0]["backend"]
        base = next((p for p in points if p["world"] == 1 and p["config"]["dp"] == 1 and p["backend"] == backend
                     and p["measure"] == "step"), None)
        if base is not None and all(p["world"] > 1 for p in pts):
            pts.insert(0, base)
        pts.sort(key=lambda p: p["world"])
    return out


def plot(points: list[dict], title: str, path: Path, device_type: str, cores: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = families(points)
    worlds = sorted({p["world"] for p in points})
    if len(worlds) == 1:
        return plot_single_world(points, title, path)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_lat, ax_sp), (ax_eff, ax_comm) = axes
    unit = "GPUs" if device_type == "cuda" else "processes (1 thread each)"
    for i, (name, pts) in enumerate(sorted(curves.items())):
        color, xs = f"C{i % 10}", [p["world"] for p in pts]
        ax_lat.plot(xs, [p["latency_s"] for p in pts], "o-", color=color, label=name)
        pred = [(p["world"], p["rounds"] * p["predicted"]["step_s"]) for p in pts if p["predicted"].get("step_s")]
        if pred:
            ax_lat.plot(*zip(*pred), "x:", color=color, alpha=0.7)
        ax_sp.plot(xs, [p["speedup"] for p in pts], "o-", color=color, label=name)
        ax_eff.plot(xs, [p["efficiency"] for p in pts], "o-", color=color, label=name)
        ax_comm.plot(xs, [100 * p["comm_share"] for p in pts], "o-", color=color, label=f"{name} measured")
        pc = [(p["world"], 100 * p["predicted"]["comm_share"]) for p in pts
              if p["predicted"].get("comm_share") is not None]
        if pc:
            ax_comm.plot(*zip(*pc), "x:", color=color, alpha=0.7)
    base = next((p for p in points if p["world"] == 1 and p["measure"] == "step"), None)
    if base:
        ax_lat.plot(worlds, [base["latency_s"] / w for w in worlds], "k--", lw=1, label="ideal (1/n)")
    ax_sp.plot(worlds, worlds, "k--", lw=1, label="ideal")
    ax_eff.axhline(1.0, color="k", ls="--", lw=1, label="ideal")
    ax_lat.set(title="Latency of one request (solid: measured; dotted x: planner, shipped factors)",
               ylabel="seconds", yscale="log")
    ax_sp.set(title="Speedup over one device (dp counts requests served)", ylabel="speedup")
    top = max([1.0] + [p["efficiency"] for p in points if p["efficiency"] is not None])
    ax_eff.set(title="Efficiency = speedup / world", ylabel="efficiency", ylim=(0, 1.1 * top + 0.05))
    shares = [100 * p["comm_share"] for p in points] + \
        [100 * p["predicted"]["comm_share"] for p in points if p["predicted"].get("comm_share") is not None]
    ax_comm.set(title="Exposed communication share of a step (dotted x: planner)", ylabel="% of step",
                ylim=(0, min(100, max(10, 1.2 * max(shares)))))
    ax_lat.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel(unit)
        ax.grid(True, alpha=0.3)
        if cores and worlds[-1] > cores:   # more single-threaded ranks than cores: time-shared
            ax.axvspan(cores * 1.15, worlds[-1] * 1.1, color="0.85", alpha=0.5, lw=0)
        ax.legend(fontsize=8, loc="best")
    if cores and worlds[-1] > cores:
        title += f"\ngrey: more single-threaded processes than the machine's {cores} cores (time-shared)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(points: list[dict], title: str, path: Path) -> Path | None:
    """Weight bytes per rank against the world, one curve per layout family (sharded ones fall as
    1/n); next to `path` as <name>_weights.png. None when the run has one world."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = families(points)
    worlds = sorted({p["world"] for p in points})
    if len(worlds) == 1 or not all("weights_mb" in p for p in points):
        return None
    fig, (ax, ax_blocks) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (name, pts) in enumerate(sorted(curves.items())):
        xs, color = [p["world"] for p in pts], f"C{i % 10}"
        ax.plot(xs, [p["weights_mb"]["max"] for p in pts], "o-", color=color, label=name)
        fixed = [_fixed_mb(p) for p in pts]
        ax.plot(xs, [f + p["weights_mb"]["predicted"]["shards"] for p, f in zip(pts, fixed)], "x:", color=color,
                alpha=0.7)
        ax_blocks.plot(xs, [p["weights_mb"]["max"] - f for p, f in zip(pts, fixed)], "o-", color=color, label=name)
    base = next((p for p in points if p["world"] == 1 and p["measure"] == "step"), None)
    if base:
        blocks = base["weights_mb"]["max"] - base["weights_mb"]["predicted"]["whole"]
        ax_blocks.plot(worlds, [blocks / w for w in worlds], "k--", lw=1, label="1/n of one device's blocks")
    ax.set(title="Weights a rank holds at its fullest (measured; dotted x: predicted)", ylabel="MB per rank")
    ax_blocks.set(title="Of which its blocks' shards (measured - embeddings, head, window)", ylabel="MB per rank")
    for a in (ax, ax_blocks):
        a.set(xlabel="ranks", xscale="log", yscale="log")
        a.set_xticks(worlds, [str(w) for w in worlds])
        a.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        a.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    out = path.with_name(path.stem + "_weights.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fixed_mb(p: dict) -> float:
    """What a point's rank holds besides its blocks' shards: the embeddings and head, and with
    sharded weights the window of gathered blocks."""
    predicted = p["weights_mb"]["predicted"]
    return predicted["whole"] + (predicted["window"] if p["config"].get("shard_weights") else 0.0)


def plot_single_world(points: list[dict], title: str, path: Path) -> None:
    """One world (e.g. the one-GPU suite): measured and predicted time per point, with the rates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extrapolated = all("extrapolated" in p for p in points)
    scale = (lambda p: p["extrapolated"]["step_s"] / p["step_s"]["headline"]) if extrapolated else (lambda p: 1.0)
    names = [f"{p['label']}{' ?' if p.get('suspect') else ''}\n{p['measure']}, {p['backend']}" for p in points]
    measured = [p["step_s"]["headline"] * scale(p) for p in points]
    predicted = [(p["predicted"].get("step_s") or float("nan")) * scale(p) for p in points]
    fig, ax = plt.subplots(figsize=(max(9, 2.6 * len(points)), 5.5))
    xs = range(len(points))
    ax.bar([x - 0.2 for x in xs], measured, 0.4, label="measured")
    ax.bar([x + 0.2 for x in xs], predicted, 0.4, label="planner (shipped calibration)", alpha=0.6)
    for x, p, m in zip(xs, points, measured):
        peak = (p["extrapolated"] if extrapolated else p["peak_mem_mb"])["peak_mem_mb" if extrapolated else "max"]
        ratio = p.get("achieved_vs_matmul")
        rate = f"{p['achieved_tflops_per_device']:.3g} TFLOP/s" + (f" ({100 * ratio:.0f}% of matmul)" if ratio else "")
        ax.annotate(f"{rate}\n~{peak / 1024:.1f} GiB peak", (x - 0.2, m), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("seconds per call" + (" (extrapolated to all layers)" if extrapolated else ""))
    ax.set_ylim(0, 1.25 * max(measured + [v for v in predicted if v == v]))
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)

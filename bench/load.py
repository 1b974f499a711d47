"""Checkpoint loading: paradit.load_transformer vs diffusers' WanTransformer3DModel.from_pretrained.

    python bench/load.py                                   # ~2 GB bf16 checkpoint in a temp dir
    python bench/load.py --accelerate-dir /tmp/accel       # accelerate importable for diffusers

1. Writes a random-weight transformer in the diffusers layout (WanTransformer3DModel.save_pretrained:
   config.json, sharded safetensors and their index): the wan2.1-t2v-1.3b architecture cut to
   --layers blocks in bf16 (21 blocks: ~2.0 GB).
2. Reads every file once, so both loaders start from a warm page cache.
3. Runs each loader --repeats times, alternating, each time in a fresh subprocess (clean RSS):
   load_s   the load call alone (interpreter start and imports excluded; import_s reports them);
   ready_s  load_s plus a read of one element in every 4 KiB page of every weight, which faults in
            any page a lazily mapped weight has not touched yet: until the weights are really in memory;
   again_s  the same load once more in the same process (first-call costs such as lazy imports gone);
   import_s the loader's imports (torch and paradit, or torch and diffusers) in the fresh process;
   RSS      /proc/self/status after imports, after the load and after the read (anonymous and
            file-backed pages apart: mmap'd weights are file-backed), and the peak (VmHWM, reset
            after imports, so it includes the import baseline).
   Medians over the repeats; ratio = diffusers / paradit.
diffusers needs accelerate for this model in bf16 (without it, from_pretrained refuses:
low_cpu_mem_usage=False cannot keep its fp32 modules). paradit does not depend on accelerate, so
--accelerate-dir puts a folder holding it (pip install --target DIR accelerate psutil) on the
diffusers child's PYTHONPATH only. A loader that fails is recorded with its error.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]   # bench/ and the repository root


# ----------------------------------------------------------------------------- the checkpoint
def diffusers_config(preset: str, layers: int | None) -> dict:
    from paradit.config import WanConfig
    c = WanConfig.preset(preset)
    return dict(patch_size=list(c.patch), num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
                in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim,
                freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=layers or c.num_layers,
                cross_attn_norm=c.cross_attn_norm, eps=c.eps)


def write_checkpoint(folder: Path, config: dict, dtype_name: str, shard: str) -> dict:
    """Random weights (normal, std 0.02), built on the meta device and filled in place, saved by diffusers."""
    import torch
    from diffusers import WanTransformer3DModel

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size=shard, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    files = sorted(folder.glob("*.safetensors"))
    return dict(params=params, dtype=dtype_name, files=[f.name for f in files],
                bytes=sum(f.stat().st_size for f in files))


def warm_page_cache(folder: Path) -> float:
    """Read every file once; returns GB read."""
    total = 0
    for f in sorted(folder.iterdir()):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return total / 1e9


# ----------------------------------------------------------------------------- the child
def proc_status() -> dict:
    """VmRSS, RssAnon, RssFile, VmHWM of this process, MiB."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def touch_pages(model) -> None:
    """Read one element in every 4 KiB page of every weight: a lazily mapped weight becomes resident,
    at the cost of the page faults, not of arithmetic over all the values."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            flat = p.reshape(-1)
            flat[:: max(1, 4096 // p.element_size())].sum()
            flat[-1:].sum()


def child(loader: str, folder: str, dtype_name: str) -> dict:
    t0 = time.perf_counter()
    import torch
    if loader == "paradit":
        from paradit import load_transformer
        load = lambda: load_transformer(folder, dtype=getattr(torch, dtype_name), device="cpu")  # noqa: E731
    else:
        from diffusers import WanTransformer3DModel
        load = lambda: WanTransformer3DModel.from_pretrained(  # noqa: E731
            folder, torch_dtype=getattr(torch, dtype_name))
    import_s = time.perf_counter() - t0
    # whether diffusers can use accelerate (its own test, find_spec); importing it here would put it
    # in paradit's import baseline too, which never imports it
    has_accelerate = importlib.util.find_spec("accelerate") is not None
    after_import = proc_status()
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM: the peak of the load itself
        f.write("5")
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    after_load = proc_status()
    touch_pages(model)
    ready_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    after_read = proc_status()
    del model
    t0 = time.perf_counter()
    load()                                   # the same load again in this (now warm) process
    again_s = time.perf_counter() - t0
    return dict(loader=loader, import_s=import_s, load_s=load_s, ready_s=ready_s, again_s=again_s, params=params,
                accelerate=has_accelerate, rss_after_import=after_import,
                rss_after_load=after_load, rss_after_read=after_read, torch_threads=torch.get_num_threads())


def run_child(loader: str, folder: Path, dtype_name: str, accelerate_dir: str | None) -> dict:
    """One load in a fresh interpreter; {"error": ...} if it failed."""
    env = dict(os.environ)
    if loader == "diffusers" and accelerate_dir:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (accelerate_dir, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, __file__, "--child", loader, str(folder), "--dtype", dtype_name],
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        return dict(loader=loader, error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else
                    f"exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the report
def summarise(runs: list[dict]) -> dict:
    """Medians over the runs of one loader (times in s, memory in MiB)."""
    def med(key, sub=None):
        return statistics.median(r[key] if sub is None else r[key][sub] for r in runs)
    return dict(load_s=med("load_s"), load_min_s=min(r["load_s"] for r in runs), ready_s=med("ready_s"),
                again_s=med("again_s"), import_s=med("import_s"),
                import_and_ready_s=statistics.median(r["import_s"] + r["ready_s"] for r in runs),
                peak_rss_mib=med("rss_after_read", "VmHWM"), rss_after_import_mib=med("rss_after_import", "VmRSS"),
                anon_after_load_mib=med("rss_after_load", "RssAnon"),
                file_after_load_mib=med("rss_after_load", "RssFile"),
                anon_after_read_mib=med("rss_after_read", "RssAnon"),
                file_after_read_mib=med("rss_after_read", "RssFile"),
                accelerate=runs[0]["accelerate"], params=runs[0]["params"], repeats=len(runs))


def table(summary: dict) -> str:
    head = ("loader", "import s", "load s", "ready s", "import+ready s", "again s", "peak RSS MiB",
            "anon / file MiB after load", "anon / file after read", "accelerate")
    rows = [head]
    for name, s in summary.items():
        rows.append((name, f"{s['import_s']:.3g}", f"{s['load_s']:.3g}", f"{s['ready_s']:.3g}",
                     f"{s['import_and_ready_s']:.3g}", f"{s['again_s']:.3g}", f"{s['peak_rss_mib']:.0f}",
                     f"{s['anon_after_load_mib']:.0f} / {s['file_after_load_mib']:.0f}",
                     f"{s['anon_after_read_mib']:.0f} / {s['file_after_read_mib']:.0f}", str(s["accelerate"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--layers", type=int, default=21, help="blocks (21 of the 1.3B's 30: ~2.0 GB in bf16)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shard", default="1GB", help="max_shard_size for save_pretrained")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="checkpoint folder (default: a temp dir, removed afterwards)")
    ap.add_argument("--accelerate-dir", help="a folder with accelerate (and psutil) to add a diffusers+accelerate run")
    ap.add_argument("--out", help="results folder (default: bench/results)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.dtype)))
        return 0

    from launcher import environment, machine_description, machine_tag, results_path, write_json
    tmp = None if args.dir else tempfile.mkdtemp(prefix="paradit_load_")
    folder = Path(args.dir or tmp)
    try:
        t0 = time.time()
        ckpt = write_checkpoint(folder, diffusers_config(args.preset, args.layers), args.dtype, args.shard) \
            if not any(folder.glob("*.safetensors")) else dict(files=[f.name for f in folder.glob("*.safetensors")])
        ckpt["write_s"] = time.time() - t0
        ckpt["warm_gb"] = warm_page_cache(folder)
        print(f"checkpoint: {args.preset} x {args.layers} blocks, {args.dtype}, {ckpt['warm_gb']:.2f} GB in "
              f"{len(ckpt['files'])} shard(s), {folder}", flush=True)
        loaders = ["paradit", "diffusers"]
        runs: dict[str, list[dict]] = {v: [] for v in loaders}
        errors: dict[str, str] = {}
        for r in range(args.repeats):
            for v in (loaders if r % 2 == 0 else loaders[::-1]):   # alternate the order
                if v in errors:
                    continue
                res = run_child(v, folder, args.dtype, args.accelerate_dir)
                if "error" in res:
                    errors[v] = res["error"]
                    print(f"  {v}: failed: {res['error']}", flush=True)
                    continue
                runs[v].append(res)
                print(f"  {v}: load {res['load_s']:.3g} s, ready {res['ready_s']:.3g} s", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {v: summarise(rs) for v, rs in runs.items() if rs}
    kinds = ("load", "ready", "import_and_ready", "again")
    ratios = {v: {k: summary[v][f"{k}_s"] / summary["paradit"][f"{k}_s"] for k in kinds}
              for v in summary if v != "paradit" and "paradit" in summary}
    print(table(summary))
    for v, r in ratios.items():
        print(f"{v} / paradit: load x{r['load']:.3g}, ready x{r['ready']:.3g}, "
              f"import+ready x{r['import_and_ready']:.3g}, again x{r['again']:.3g}")
    tag = machine_tag("cpu")
    result = dict(what="load", date=time.strftime("%Y-%m-%d"), machine=tag,
                  machine_description=machine_description("cpu"), environment=environment(),
                  checkpoint=ckpt | dict(preset=args.preset, layers=args.layers),
                  summary=summary, ratio_vs_paradit=ratios, errors=errors, runs=runs, method=__doc__,
                  accelerate_dir=args.accelerate_dir)
    print(f"wrote {write_json(results_path('load', 'json', args.out, tag), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

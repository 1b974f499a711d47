"""End to end, as a user runs it: a full-size random-weight checkpoint, then the real CLI.

    python bench/e2e.py --preset wan2.2-t2v-a14b --folder /dev/shm/a14b \\
        --run 1280x720x81:3 --run 832x480x81:3 --run 1280x720x81:3:compile
    python bench/e2e.py --preset wan2.2-ti2v-5b --folder /dev/shm/ti2v --run 1280x704x121:3
    python bench/e2e.py --preset tiny --folder /tmp/tiny --run 64x48x5:2     # CPU: the whole path, small

1. Writes the preset's checkpoint in diffusers layout into --folder (skipped when a complete one is
   there): model_index.json, transformer/ (and transformer_2/ for two experts) in 5 GB shards with
   an index, an umT5-XXL-shaped text_encoder/ (the tiny presets: a tiny umT5), a word-level
   tokenizer/, the model kind's VAE (Wan2.1's for 16 latent channels, Wan2.2's for TI2V) and a
   scheduler/. Weights are random (bf16 for the transformers and the text encoder, fp32 for the
   VAE), drawn on --device (a GPU writes a full A14B folder, about 66 GB, in a minute or two; put it
   on tmpfs: /dev/shm) and scaled as a default init would (unit-scale activations), so that a
   random-weight run does the same work as a trained one.
2. Runs `python -m paradit.generate --model FOLDER --size WxH --frames F --steps N [--compile]`
   in a subprocess for every --run (SIZExFRAMES:STEPS[:compile][:flag=value...]), through
   bench/cli_probe.py, timing the process from its start to the mp4, and reads the run's JSON
   sidecar: the imports before start-up (imports_s: the interpreter, torch and the CLI's modules;
   pipeline_import_s: paradit.pipeline's libraries), start-up per component (weights, offload set-up,
   LoRA merge, the text encoder's warm-up), text encoding, every denoising step, the VAE decode, writing the mp4, peak GPU memory (allocated and reserved) per
   rank, the layout (its CFG mode too) and the settings (what bench/memory_fit.py needs to set the
   planner's prediction beside each peak); and from the probe each phase's seconds and peak
   allocated / reserved GB (`phases`: start-up, text encode, denoise, decode, write). --without-fa4
   runs each --run again with flash-attn-4 hidden, as if not installed (label `...:no-fa4`).
   --distill SIZExFRAMES adds the 4-step distilled recipe (`--steps 4 --guidance 1 --shift 5
   --sampler euler`, two random rank-64 LoRAs of the preset's real shapes from bench/lora_distill.py,
   written once into the folder).
3. With --vs-diffusers, runs diffusers' WanPipeline on the same folder and settings after every run
   (bench/e2e_diffusers.py in a subprocess: start-up, text encoding, denoise, VAE decode, writing
   the mp4 with diffusers' export_to_video, each device-synchronised, with its peak memory) and
   reports paradit / diffusers per phase (`ratios`: below 1, paradit is faster): start-up (paradit's
   build_s: config to weights on the device), text encoding, denoise, decode, decode + write, time
   to video (process start to mp4). Text-to-video presets only (WanPipeline); the memory cap does
   not apply to it; not for the distilled run.
4. Prints one table and writes bench/results/<date>_<machine>_e2e.json (--out to choose).

    python bench/e2e.py --preset wan2.2-t2v-a14b --folder /dev/shm/a14b --run 1280x720x81:3 --vs-diffusers
    python bench/e2e.py --preset wan2.2-t2v-a14b --folder /dev/shm/a14b --run 1280x720x81:3 --vs-diffusers \
        --without-fa4 --distill 1280x720x81        # the one-80-GB-GPU acceptance run

Extra generate flags go after `--`: `python bench/e2e.py ... -- --attention sdpa`.
--memory-cap-gb G runs the CLI with its CUDA memory capped at G GB (1e9 bytes;
torch.cuda.set_per_process_memory_fraction before anything is allocated, bench/cli_probe.py), so that
a larger GPU stands in for an 80 GB one: `--memory-cap-gb 80 --run 1280x720x81:3:offload=experts`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from launcher import machine_tag  # noqa: E402
from paradit.config import WanConfig  # noqa: E402
from random_checkpoint import write_checkpoint  # noqa: E402


# ----------------------------------------------------------------------------- the runs
def parse_run(text: str) -> dict:
    """SIZExFRAMES:STEPS[:compile][:flag=value ...], e.g. 1280x720x81:3:compile or 832x480x81:2:offload=experts."""
    head, steps, *opts = text.split(":")
    w, h, f = (int(v) for v in head.lower().split("x"))
    flags = []
    for o in opts:
        name, _, value = o.partition("=")
        flags += [f"--{name}"] + ([value] if value else [])
    return dict(label=text, width=w, height=h, frames=f, steps=int(steps), flags=flags)


def run_cli(folder: Path, run: dict, out_dir: Path, extra: list[str], image: Path | None,
            memory_cap_gb: float | None = None) -> dict:
    """The CLI in a subprocess, through bench/cli_probe.py (per-phase peak memory; the cap; flash-attn-4
    hidden for a run labelled no-fa4)."""
    out = out_dir / f"{run['width']}x{run['height']}x{run['frames']}_{len(list(out_dir.glob('*.mp4')))}.mp4"
    phases = out.with_suffix(".phases.json")
    probe = [str(ROOT / "bench" / "cli_probe.py"), "--phase-memory", str(phases)]
    probe += ["--memory-cap-gb", str(memory_cap_gb)] if memory_cap_gb is not None else []
    probe += ["--hide-fa4"] if run.get("hide_fa4") else []
    argv = [sys.executable, *probe, "--", "--model", str(folder), "--size", f"{run['width']}x{run['height']}",
            "--frames", str(run["frames"]), "--steps", str(run["steps"]), "--prompt", "a red circle moving left",
            "--out", str(out), "--no-progress", *run["flags"], *extra]
    if image is not None:
        argv += ["--image", str(image)]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    row = dict(run=run["label"], argv=argv[1:], returncode=res.returncode, process_s=wall,
               memory_cap_gb=memory_cap_gb, phases=json.loads(phases.read_text()) if phases.exists() else None)
    phases.unlink(missing_ok=True)
    if res.returncode != 0:
        row["error"] = (res.stderr or res.stdout)[-3000:]
        return row
    side = json.loads(out.with_suffix(".json").read_text())
    t = side["timings_s"]
    row.update(startup=t["startup"], text_encoder_s=t.get("text_encoder_s"), image_encode_s=t.get("image_encode_s"),
               step_s=t.get("step_s"), denoise_s=t.get("denoise_s"), vae_decode_s=t.get("vae_decode_s"),
               write_video_s=t.get("write_video_s"), gpu_memory_gb=side.get("gpu_memory_gb"),
               offload=side.get("offload"), loras=side.get("loras"), layout=side.get("layout"),
               settings=side.get("settings"),
               time_to_video_s=side.get("time_to_video_s"), attention=side.get("attention"),
               device=side.get("device"), mp4_bytes=out.stat().st_size)
    out.unlink()  # a random-weight video is noise; keep the numbers only
    return row


def run_diffusers(folder: Path, run: dict) -> dict:
    """bench/e2e_diffusers.py on the same folder and settings, in its own process."""
    out = folder / "diffusers_run.json"
    argv = [sys.executable, str(ROOT / "bench" / "e2e_diffusers.py"), "--folder", str(folder),
            "--size", f"{run['width']}x{run['height']}", "--frames", str(run["frames"]), "--steps", str(run["steps"]),
            "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        return dict(returncode=res.returncode, error=(res.stderr or res.stdout)[-3000:])
    row = json.loads(out.read_text())
    out.unlink()
    return dict(row, returncode=0, wall_s=time.perf_counter() - t0)


def _sum(*values):
    return sum(values) if all(v is not None for v in values) else None


# paradit's row -> seconds, diffusers' row -> seconds, per phase the acceptance compares
PHASES = {"startup": (lambda r: r["startup"].get("build_s"), lambda d: d.get("startup_s")),
          "text_encoder": (lambda r: r.get("text_encoder_s"), lambda d: d.get("text_encoder_s")),
          "denoise": (lambda r: r.get("denoise_s"), lambda d: d.get("denoise_s")),
          "decode": (lambda r: r.get("vae_decode_s"), lambda d: d.get("vae_decode_s")),
          "decode_write": (lambda r: _sum(r.get("vae_decode_s"), r.get("write_video_s")),
                           lambda d: _sum(d.get("vae_decode_s"), d.get("write_video_s"))),
          "time_to_video": (lambda r: r.get("time_to_video_s") or r.get("process_s"),
                            lambda d: d.get("time_to_video_s") or d.get("wall_s"))}


def ratios(row: dict, peer: dict) -> dict:
    """paradit / diffusers per phase (below 1: paradit faster)."""
    out = {}
    for phase, (ours, theirs) in PHASES.items():
        a, b = ours(row), theirs(peer)
        out[phase] = a / b if a and b else None
    return out


def test_image(folder: Path, width: int, height: int) -> Path:
    from PIL import Image
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    rgb = (torch.stack([x, y, 1 - x * y], -1) * 255).round().to(torch.uint8).numpy()
    path = folder / "first_frame.png"
    Image.fromarray(rgb).save(path)
    return path


def table(rows: list[dict]) -> str:
    head = ("run", "imports", "startup", "weights", "offload set-up", "LoRA merge", "text enc+warm", "vae load", "encode",
            "step (median)", "decode", "write", "to video", "peak alloc/resv GB")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if r["returncode"] != 0:
            lines.append(f"{r['run']} | failed: {r['error'].strip().splitlines()[-1][:120]}")
            continue
        s = r["startup"]
        steps = sorted(r["step_s"] or [float("nan")])
        mem = (r["gpu_memory_gb"] or {}).get("0")
        lines.append(" | ".join([
            r["run"], f"{s.get('imports_s', 0) + s.get('pipeline_import_s', 0):.1f}", f"{s.get('build_s', 0):.1f}",
            f"{s.get('weights_s', 0):.1f}", f"{offload_setup_s(s):.1f}", f"{s.get('lora_merge_s', 0):.1f}",
            f"{s.get('text_encoder_s', 0) + s.get('text_encoder_warmup_s', 0):.1f}",
            f"{s.get('vae_s', 0):.1f}", f"{r['text_encoder_s']:.2f}",
            f"{steps[len(steps) // 2]:.2f} ({len(steps)} steps)", f"{r['vae_decode_s']:.1f}", f"{r['write_video_s']:.2f}",
            f"{r['time_to_video_s'] or r['process_s']:.1f}",
            f"{mem['allocated']:.1f} / {mem['reserved']:.1f}" if mem else "-"]))
    return "\n".join(lines)


def offload_setup_s(startup: dict) -> float:
    """Offload's share of start-up: page-locking the experts' host buffers (read into at load time,
    inside weights_s) and apply_offload's (the text encoder's copy into pinned memory)."""
    return startup.get("host_buffers_s", 0.0) + startup.get("offload_s", 0.0)


def phase_table(rows: list[dict]) -> str:
    """Per phase, paradit's (and diffusers') seconds and peak allocated / reserved GB."""
    names = ("startup", "text_encode", "denoise", "decode", "write")
    lines = ["run | " + " | ".join(names), " | ".join("---" for _ in range(len(names) + 1))]

    def cells(phases: dict) -> str:
        return " | ".join("-" if not p else f"{p['s']:.1f} s" + (
            f", {p['allocated_gb']:.1f} / {p['reserved_gb']:.1f} GB" if "allocated_gb" in p else "")
            for p in (phases.get(n) for n in names))
    for r in rows:
        if r.get("phases"):
            lines.append(f"{r['run']} | " + cells(r["phases"]))
        if (r.get("diffusers") or {}).get("phases"):
            lines.append(f"{r['run']} diffusers | " + cells(r["diffusers"]["phases"]))
    return "\n".join(lines)


def vs_diffusers(rows: list[dict]) -> list[str]:
    """A line per run with a diffusers peer: paradit / diffusers per phase and diffusers' own seconds, or why
    the peer did not run."""
    lines = []
    for r in rows:
        if "ratios" in r:
            d = r["diffusers"]
            lines.append(f"{r['run']} vs diffusers (paradit / diffusers, below 1: paradit faster): " + ", ".join(
                f"{k} {v:.2f}" for k, v in r["ratios"].items() if v is not None)
                + f"; diffusers: start-up {d['startup_s']:.1f} s, denoise {d['denoise_s']:.1f} s, "
                  f"decode {d['vae_decode_s']:.1f} s ({d['vae_dtype']}, tiling {d['vae_tiling']}), "
                  f"write {d.get('write_video_s') or 0:.1f} s, to video {d.get('time_to_video_s') or 0:.1f} s")
        elif "diffusers" in r:
            lines.append(f"{r['run']} vs diffusers: "
                         f"{r['diffusers'].get('skipped') or r['diffusers'].get('error', '')[-500:]}")
    return lines


DISTILL = ("guidance=1", "shift=5", "sampler=euler")     # the 4-step recipe, with its two LoRAs


def distill_run(folder: Path, cfg: WanConfig, size: str) -> dict:
    """The step-distilled recipe at SIZExFRAMES: 4 steps, guidance 1, shift 5, Euler, with two random
    rank-64 LoRAs of the preset's real shapes (bench/lora_distill.py; written once into the folder)."""
    import lora_distill
    loras = folder / "distill_loras"
    if not (loras / "loras.json").exists():
        lora_distill.write(cfg, loras, 64, torch.bfloat16, 0)
    run = parse_run(":".join([f"{size}:4", *DISTILL, f"lora-high={loras / 'high_noise.safetensors'}",
                              f"lora-low={loras / 'low_noise.safetensors'}"]))
    return dict(run, label=f"{size}:distill-4-steps")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", required=True, help="the architecture to write, e.g. wan2.2-t2v-a14b")
    p.add_argument("--folder", required=True, type=Path, help="where the checkpoint goes (reused if complete)")
    p.add_argument("--run", action="append", default=[], type=parse_run,
                   help="SIZExFRAMES:STEPS[:compile][:flag=value]; repeatable (none: only write the folder)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the random weights are drawn")
    p.add_argument("--memory-cap-gb", type=float, help="cap the CLI's CUDA memory at this many GB (1e9 bytes)")
    p.add_argument("--out", type=Path, help="the results JSON (default bench/results/<date>_<machine>_e2e.json)")
    p.add_argument("--vs-diffusers", action="store_true",
                   help="also run diffusers' WanPipeline on the folder after every run; per-phase ratios")
    p.add_argument("--without-fa4", action="store_true",
                   help="run every --run a second time with flash-attn-4 hidden, as if not installed "
                        "(bench/cli_probe.py --hide-fa4); diffusers runs once either way")
    p.add_argument("--distill", metavar="SIZExFRAMES",
                   help="also run the 4-step distilled recipe (two rank-64 LoRAs, guidance 1), e.g. 1280x720x81")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    t0 = time.perf_counter()
    written = write_checkpoint(args.preset, args.folder, torch.device(args.device))
    print(f"checkpoint {args.folder}: {json.dumps(written)} in {time.perf_counter() - t0:.1f} s", flush=True)
    cfg = WanConfig.preset(args.preset)
    out = args.out or ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}_{machine_tag()}_e2e_{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = [*args.run, *([distill_run(args.folder, cfg, args.distill)] if args.distill else [])]
    for run in runs:
        image = test_image(args.folder, run["width"], run["height"]) if cfg.task == "i2v" else None
        hide = args.without_fa4 and "distill" not in run["label"]
        variants = [run] + ([dict(run, label=run["label"] + ":no-fa4", hide_fa4=True)] if hide else [])
        mine = [run_cli(args.folder, v, args.folder, extra, image, args.memory_cap_gb) for v in variants]
        if args.vs_diffusers and "distill" not in run["label"]:   # once per size: flash-attn-4 is not its
            peer = (dict(skipped="WanPipeline is text-to-video; I2V is WanImageToVideoPipeline") if cfg.task == "i2v"
                    else run_diffusers(args.folder, run))
            for row in mine:
                row["diffusers"] = peer
                if row["returncode"] == 0 and peer.get("returncode") == 0:
                    row["ratios"] = ratios(row, peer)
        rows += mine
        for row in mine:
            print(json.dumps({k: v for k, v in row.items() if k != "argv"}), flush=True)
        out.write_text(json.dumps(dict(method=__doc__, preset=args.preset, machine=machine_tag(), torch=torch.__version__,
                                       gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                       checkpoint=written, runs=rows), indent=1))  # after every run
    if not rows:
        return 0
    print(table(rows))
    print(phase_table(rows))
    for line in vs_diffusers(rows):
        print(line)
    print(f"wrote {out}")
    return 0 if all(r["returncode"] == 0 and r.get("diffusers", {}).get("returncode", 0) == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

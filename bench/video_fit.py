"""The planner's time-to-video constants from measured runs: no GPU needed.

    python bench/video_fit.py bench/results/*_h100x1_e2e_*.json                   # the rates each run gives
    python bench/video_fit.py bench/results/*_h100x1_e2e_*.json --write-calibration paradit/plan/calibration.json

Every successful run of bench/e2e.py's results files gives, for the GPU kind it ran on (paradit.plan.video
describes each constant):
    weights_gbps        the bytes its first rank read (experts, text encoder, VAE) / weights_s (runs
                        without LoRAs: a merge runs inside the read)
    offload_setup_gbps  the bytes its offload mode pins / the start-up its host buffers add (runs that
                        keep experts in host memory): host_buffers_s, the sum of the offloaded experts'
                        set-ups (allocating, page-locking once read into), over those experts, which
                        are set up side by side, each in its loading thread
    lora_merge_gbps     the expert bytes LoRAs merged into / lora_merge_s (runs with LoRAs)
    encode_s            text_encoder_s (runs with the text encoder resident: an offloaded one's copy is
                        a host copy, counted apart)
    decode_s_per_gpix   vae_decode_s / (pixel-frames x the share a rank of the decode group decodes)
    write_s_per_gpix    write_video_s / pixel-frames
Each constant is the median over the runs that give it; --write-calibration writes them under
gpus.<kind> of a calibration file, keeping that entry's other factors, with a video_source note;
--only NAME (repeatable) writes those constants alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import paradit.plan as pl  # noqa: E402
from memory_fit import point_of  # noqa: E402
from paradit.config import WanConfig  # noqa: E402
from paradit.plan.hardware import GB  # noqa: E402
from paradit.plan.model import decode_share, param_count, text_encoder_gb, vae_gb  # noqa: E402
from paradit.plan.memory import pinned_gb  # noqa: E402
from paradit.residency import experts_on_host, offloads_text_encoder  # noqa: E402


def run_rates(row: dict, preset: str, gpu: str | None) -> tuple[str, dict] | None:
    """(the GPU kind, {constant: value}) of one e2e run; None if it failed or cannot be read."""
    point, _ = point_of(row, preset, gpu)
    if point is None or "startup" not in row:
        return None
    m, layout, start = WanConfig.preset(preset), point["layout"], row["startup"]
    p = pl.make_problem(m, layout.world_size, point["gpu"], point["width"], point["height"], point["frames"],
                        point["steps"], loras=point["loras"])
    experts = 1 if layout.stages else m.num_experts          # what the first rank holds
    expert_gb = param_count(m) * 2 / GB
    gpix = p.width * p.height * p.frames / 1e9
    rates = {}
    if not point["loras"] and start.get("weights_s"):
        rates["weights_gbps"] = (experts * expert_gb + text_encoder_gb(m) + vae_gb(m, p.width, p.height)
                                 ["weights"]) / start["weights_s"]
    if experts_on_host(point["offload"], experts) and start.get("host_buffers_s"):
        added_s = start["host_buffers_s"] / experts    # the sum of `experts` concurrent set-ups: about one
        rates["offload_setup_gbps"] = pinned_gb(p, point["offload"], experts, True) / added_s
    if point["loras"] and start.get("lora_merge_s"):
        rates["lora_merge_gbps"] = experts * expert_gb / start["lora_merge_s"]
    if row.get("text_encoder_s") and not offloads_text_encoder(point["offload"]):
        rates["encode_s"] = row["text_encoder_s"]
    u, r, _ = layout.stage_degrees[-1]
    if row.get("vae_decode_s"):
        rates["decode_s_per_gpix"] = row["vae_decode_s"] / (gpix * decode_share(p.width, u * r))
    if row.get("write_video_s"):
        rates["write_s_per_gpix"] = row["write_video_s"] / gpix
    return point["gpu"], rates


def fit(paths: list[str]) -> dict[str, dict[str, list[float]]]:
    """{GPU kind: {constant: every run's value}} over the results files."""
    out: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data.get("runs", []):
            got = run_rates(row, data["preset"], data.get("gpu"))
            if got:
                kind, rates = got
                for k, v in rates.items():
                    out.setdefault(kind, {}).setdefault(k, []).append(v)
    return out


def write_calibration(path: str, base_path: str | None, kind: str, constants: dict, note: str) -> None:
    """The calibration file (base_path, default the shipped one) with `constants` under gpus.<kind>."""
    def edit(raw: dict) -> None:
        entry = raw.setdefault("gpus", {}).setdefault(kind, {})
        entry.update({k: float(f"{v:.4g}") for k, v in constants.items()}, video_source=note)
    pl.rewrite_calibration(path, base_path, edit)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench/e2e.py results files")
    ap.add_argument("--calibration", help="the calibration to write into (default: the shipped one)")
    ap.add_argument("--write-calibration", metavar="FILE", help="write the medians under gpus.<kind> of FILE")
    ap.add_argument("--only", action="append", metavar="NAME", help="write this constant only (repeatable)")
    args = ap.parse_args(argv)
    per_gpu = fit(args.results)
    if not per_gpu:
        raise SystemExit("no successful runs with timings in " + ", ".join(args.results))
    base = args.calibration
    for kind, values in per_gpu.items():
        medians = {k: statistics.median(v) for k, v in values.items()}
        print(f"{kind}: " + ", ".join(f"{k} {medians[k]:.4g} (of {len(v)} runs)" for k, v in values.items()))
        if args.only:
            unknown = set(args.only) - set(medians)
            if unknown:
                raise SystemExit(f"--only {', '.join(sorted(unknown))}: not given by these runs on {kind} "
                                 f"(they give {', '.join(medians)})")
            medians = {k: medians[k] for k in args.only}
        if args.write_calibration:
            what = f" ({', '.join(medians)})" if args.only else ""
            note = (f"time-to-video constants{what}: medians by bench/video_fit.py over "
                    f"{', '.join(sorted(Path(p).name for p in args.results))}")
            write_calibration(args.write_calibration, base, kind, medians, note)
            base = args.write_calibration   # several kinds: each written on top of the last
            print(f"wrote gpus.{kind} of {args.write_calibration}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

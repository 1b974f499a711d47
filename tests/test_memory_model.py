"""The planner's memory model and its time to video: each mode moves memory and time the right way, the
choice ranks by time to video, configurations measured to fit are never refused, and the fit of the
memory constants (bench/memory_fit.py) recovers known constants from synthetic measurements."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from paradit.cli.flags import UsageError, parse_args
from paradit.cli.layout import resolve_layout
from paradit.cli.spec import video_settings
from paradit.config import WanConfig
from paradit.plan import GPUS, ParallelConfig, evaluate, load_calibration, make_problem, plan
from paradit.plan.cli import main
from paradit.plan.memory import memory_limit
from paradit.plan.model import activation_gb

ROOT = Path(__file__).resolve().parents[1]
A14B = WanConfig.preset("wan2.2-t2v-a14b")
U1 = ParallelConfig()


def mem(offload="none", cfg_mode="batched", guidance=True, layout=U1, gpus=1, gpu="h100", size=(1280, 720, 81),
        loras=0, model=A14B):
    p = make_problem(model, gpus, gpu, *size, steps=4, offload=offload, cfg_mode=cfg_mode, guidance=guidance,
                     loras=loras)
    return evaluate(p, layout).breakdown.mem_gb


def test_each_mode_moves_memory_the_right_way():
    guided, unguided = mem(), mem(guidance=False)
    in_turn = mem(cfg_mode="in-turn")
    # guidance 1 has no uncond forward: half the batched activations, nothing else changes
    assert unguided.phases.denoise < guided.phases.denoise
    assert guided.phases.denoise - unguided.phases.denoise == pytest.approx(
        load_calibration().for_gpu("h100").activation_scale * activation_gb(A14B, 75_600, 1, False))
    # CFG in turn: batch-1 activations, as without guidance
    assert in_turn.phases.denoise == pytest.approx(unguided.phases.denoise)
    assert in_turn.total < guided.total
    # the text encoder off the GPU: 11.4 GB less in every phase but the encode, which copies it in
    text = mem(offload="text-encoder")
    assert guided.phases.denoise - text.phases.denoise == pytest.approx(11.4, abs=1e-6)
    assert text.phases.encode == pytest.approx(guided.phases.encode)
    # the experts offloaded: one of two on the GPU
    experts = mem(offload="experts")
    assert guided.phases.denoise - experts.phases.denoise == pytest.approx(28.577, abs=1e-3)
    assert experts.experts_on_gpu == 1 and mem(offload="all").total < experts.total
    # CFG-parallel: each group runs one sequence
    cfg2 = mem(layout=ParallelConfig(cfg=2), gpus=2)
    assert cfg2.phases.denoise == pytest.approx(in_turn.phases.denoise)
    # sequence parallel: a quarter of the tokens each; Ring's buffers cost more than Ulysses' none
    u4, r4 = mem(layout=ParallelConfig(ulysses=4), gpus=4), mem(layout=ParallelConfig(ring=4), gpus=4)
    assert u4.phases.denoise < guided.phases.denoise and r4.phases.denoise > u4.phases.denoise
    # the spread decode: a column tile each
    assert u4.phases.decode < guided.phases.decode
    # LoRAs merge on the GPU as each weight is read (an offloaded expert's too): a workspace at load,
    # nothing after
    lora = mem(loras=2)
    assert lora.phases.load > guided.phases.load and lora.phases.denoise == guided.phases.denoise
    assert mem(offload="experts", loras=2).phases.load - experts.phases.load == pytest.approx(
        lora.phases.load - guided.phases.load)


def test_decode_tiles_fit_what_is_left():
    # on a GPU with little room after the weights the runtime decodes in tiles that fit its share of
    # free memory: the decode phase never exceeds the limit because of the VAE
    p = make_problem(A14B, 1, GPUS["h100"].replace(hbm_gb=72), 1280, 720, 81, offload="none", guidance=False)
    m = evaluate(p, U1).breakdown.mem_gb
    whole = mem(guidance=False).phases.decode - mem(guidance=False).phases.load
    assert m.phases.decode - m.phases.load < whole
    assert m.phases.decode <= memory_limit(p)


def test_the_distilled_recipe_on_one_h100_runs_without_offload():
    # 4 steps, guidance 1, two LoRAs at 720p x 81: measured 78.4 GB allocated with --offload none --force,
    # 87 s to the mp4 (181 s with the experts offloaded, which the planner chose when it counted
    # batched-CFG activations at guidance 1)
    p = plan(A14B, 1, "h100", 1280, 720, 81, 4, guidance=False, loras=2)
    c = p.choice
    assert c.layout == U1 and c.offload == "none"
    assert c.mem_gb == pytest.approx(78.4, rel=0.05)
    offloaded = evaluate(p.problem, U1, "experts")
    # offloading costs its set-up (read straight into pinned host buffers: ~2 s at the rate fitted to
    # the final H100 runs of 2026-12-06) and the swaps; the merge costs the same either way
    assert offloaded.feasible and offloaded.time_to_video_s > c.time_to_video_s + 1
    assert offloaded.video.lora_merge == c.video.lora_merge > 0
    assert offloaded.video.offload_setup > 1 and c.video.offload_setup == 0


def test_guided_on_one_h100_chooses_in_turn_if_it_fits_else_offload():
    p = plan(A14B, 1, "h100", 1280, 720, 81, 4, loras=2)
    in_turn = evaluate(dataclasses.replace(p.problem, cfg_mode="in-turn"), U1, "none")
    if in_turn.feasible:
        assert p.choice.layout.cfg_mode == "in-turn" and p.choice.offload == "none"
    # with less memory (a 76 GB card) in turn without offload does not fit: an offload mode does
    small = plan(A14B, 1, GPUS["h100"].replace(hbm_gb=76), 1280, 720, 81, 4, loras=2)
    assert not evaluate(dataclasses.replace(small.problem, cfg_mode="in-turn"), U1, "none").feasible
    assert small.choice is not None and small.choice.offload != "none"
    assert in_turn.feasible     # as shipped, 78.9 GB of the 82.3 an H100 leaves the allocator (diffusers: 80.0)


def test_ranking_is_by_time_to_video_not_by_step():
    # batched CFG with the experts offloaded denoises a little faster than CFG in turn, but pinning
    # 57 GB of experts costs more start-up than in turn's extra launches cost steps
    p = make_problem(A14B, 1, "h100", 1280, 720, 81, 40)
    best = evaluate(p, U1)
    offloaded = evaluate(dataclasses.replace(p, cfg_mode="batched"), U1, "experts")
    assert best.layout.cfg_mode == "in-turn" and best.offload == "none"
    assert offloaded.latency_s < best.latency_s and offloaded.time_to_video_s > best.time_to_video_s
    v = best.video
    assert v.total == pytest.approx(v.weights + v.lora_merge + v.offload_setup + v.encode + v.denoise
                                    + v.decode + v.write)
    assert v.denoise == best.latency_s and offloaded.video.offload_setup > 1


# configurations measured to fit (allocated peak, GB), pinned: the planner must not refuse any of
# them without --force where it had 3 GB to spare on the GPU (an H100 80GB gives torch 84.9 GB)
MEASURED = [
    # issue 29, 1 x H100: 720p x 81 guided, --offload experts
    ("h100", ["--size", "1280x720", "--frames", "81", "--steps", "2", "--offload", "experts"], 59.0),
    # issue 29, 1 x H100: the distilled recipe, --offload none
    ("h100", ["--size", "1280x720", "--frames", "81", "--steps", "4", "--guidance", "1", "--shift", "5",
              "--sampler", "euler", "--lora-high", "high.safetensors", "--lora-low", "low.safetensors",
              "--offload", "none"], 78.4),
    # 1 x H200 capped at 80 GB (bench/results/2026-12-02_h200x1_e2e_cap80_*.json): fits an H100
    ("h100", ["--size", "832x480", "--frames", "81", "--steps", "3", "--offload", "text-encoder"], 69.8),
    # 1 x H200 (bench/results/2026-12-03_h200x1_e2e_vs_diffusers_720p.json), batched CFG
    ("h200", ["--size", "1280x720", "--frames", "81", "--steps", "3", "--offload", "none", "--cfg-mode",
              "batched"], 87.7),
]


@pytest.mark.parametrize("gpu,argv,measured", MEASURED, ids=[f"{g} {m}" for g, _, m in MEASURED])
def test_configurations_measured_to_fit_are_not_refused(gpu, argv, measured):
    capacity = GPUS[gpu].hbm_gb * 2**30 / 1e9 * 0.989          # torch's total_memory, 79.1 of 80 "GB" (GiB)
    assert measured + 3 <= capacity
    flags = parse_args(["--model", "wan2.2-t2v-a14b", "--gpu", gpu, *argv])
    cfg = WanConfig.preset("wan2.2-t2v-a14b")
    info = SimpleNamespace(world_size=1, rank=0)
    layout, _ = resolve_layout(flags, cfg, info, video_settings(flags, cfg, None))   # refuses what it predicts won't fit
    assert layout.world_size == 1


def test_the_cli_refuses_a_layout_predicted_not_to_fit_and_names_the_fix():
    flags = parse_args(["--model", "wan2.2-t2v-a14b", "--gpu", "h100", "--size", "1280x720", "--frames", "81",
                        "--offload", "none", "--cfg-mode", "batched"])
    cfg = WanConfig.preset("wan2.2-t2v-a14b")
    with pytest.raises(UsageError, match=r"predicted not to fit.*--cfg-mode in-turn.*--force"):
        resolve_layout(flags, cfg, SimpleNamespace(world_size=1, rank=0), video_settings(flags, cfg, None))
    # CFG in turn with CFG-parallel means nothing: the command line names the flag and the fix
    run = subprocess.run([sys.executable, "-m", "paradit.generate", "--model", "tiny", "--cfg-par", "2",
                          "--cfg-mode", "in-turn", "--out", "never.mp4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--cfg-mode in-turn" in run.stderr and "cfg=2 already runs" in run.stderr
    assert "use: --cfg-mode batched" in run.stderr and "cfg_mode" not in run.stderr


def test_planner_cli_guidance_steps_and_phases(capsys):
    base = ["--gpus", "1", "--gpu", "h100", "--size", "1280x720", "--frames", "81", "--steps", "4", "--loras", "2"]
    assert main(base + ["--guidance", "1"]) == 0
    out = capsys.readouterr().out
    assert "Choice: U1:" in out and "guidance 1 (no uncond forward)" in out
    for phase in ("time to video", "weights read", "LoRA merge", "offload set-up", "text encode", "denoise",
                  "VAE decode", "mp4 write", "memory (GB allocated"):
        assert phase in out
    assert main(base + ["--guidance", "4,3"]) == 0
    assert "Choice: U1 in-turn:" in capsys.readouterr().out
    assert main(base + ["--guidance", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["guidance"] is False and doc["steps"] == 4 and doc["loras"] == 2
    assert doc["choice"]["time_to_video_s"] == pytest.approx(sum(doc["choice"]["video_s"].values()))
    assert main(base + ["--guidance", "x"]) == 2
    assert "--guidance" in capsys.readouterr().err
    assert main(base + ["--loras", "-1"]) == 2
    assert "--loras -1" in capsys.readouterr().err


def test_memory_fit_recovers_known_constants(tmp_path):
    """bench/memory_fit.py, run as a user runs it, on synthetic e2e results whose peaks the model made
    with known constants: it finds them again and writes a calibration that reads back."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_fit

    truth = {"overhead_gb": 0.7, "activation_scale": 1.1, "decode_scale": 0.85}
    runs = []
    for preset, size, extra, gpu in [("wan2.2-t2v-a14b", "1280x720", [], "NVIDIA H200"),
                                     ("wan2.2-t2v-a14b", "1280x720", ["--guidance", "1"], "NVIDIA H200"),
                                     ("wan2.2-t2v-a14b", "832x480", ["--offload", "experts"], "NVIDIA H200"),
                                     ("wan2.2-ti2v-5b", "1280x704", [], "NVIDIA H100 80GB HBM3")]:
        argv = ["-m", "paradit.generate", "--model", "/ckpt", "--size", size, "--frames", "81", "--steps", "3", *extra]
        offload = "experts" if extra[:1] == ["--offload"] else "none"
        row = {"run": size, "argv": argv, "returncode": 0, "offload": offload,
               "loras": [], "gpu_memory_gb": {"0": {"allocated": 1.0, "reserved": 1.0}}}
        point, why = memory_fit.point_of(row, preset, gpu)
        assert not why
        made = memory_fit.predict(point, memory_fit.pl.load_calibration(), truth)
        row["gpu_memory_gb"]["0"]["allocated"] = made.mem_gb
        if preset == "wan2.2-ti2v-5b":   # the probe's per-phase peaks (bench/cli_probe.py), on one run
            phases = memory_fit.fullest(made).phases
            row["phases"] = {"denoise": {"s": 1.0, "allocated_gb": phases.denoise, "reserved_gb": 99.0},
                             "decode": {"s": 1.0, "allocated_gb": phases.decode, "reserved_gb": 99.0}}
        runs.append((preset, gpu, row))
    files = []
    for i, (preset, gpu, row) in enumerate(runs):
        files.append(tmp_path / f"e2e_{i}.json")
        files[-1].write_text(json.dumps({"preset": preset, "gpu": gpu, "runs": [row]}))
    out = tmp_path / "cal.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_fit.py"), *map(str, files), "--fit",
                          "--fit-only", ",".join(truth), "--write-calibration", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 of 4 within 5%" in run.stdout and "denoise " in run.stdout   # the probed phases, in the table
    fitted = json.loads(out.read_text())
    for k, v in truth.items():
        assert fitted[k] == pytest.approx(v, rel=1e-3), k
    assert "fitted by bench/memory_fit.py" in fitted["memory_source"]
    assert memory_fit.pl.load_calibration(str(out)).activation_scale == pytest.approx(1.1, rel=1e-3)


def test_the_service_takes_the_cfg_mode():
    """`python -m paradit.serve` shares generate's --cfg-mode: the layout it resolves carries it (on a
    CPU auto is batched: the planner does not model a CPU's memory)."""
    from paradit.serve.cli import parse_args as serve_args
    cfg, info = WanConfig.preset("tiny"), SimpleNamespace(world_size=1, rank=0)
    for given, expected in (("in-turn", "in-turn"), ("auto", "batched")):
        flags = serve_args(["--model", "tiny", "--cfg-mode", given])
        assert resolve_layout(flags, cfg, info, video_settings(flags, cfg, None))[0].cfg_mode == expected


def test_video_fit_reads_rates_from_runs(tmp_path):
    """bench/video_fit.py, as a user runs it: the time-to-video constants each run gives (by hand here),
    their medians written under gpus.<kind> of a calibration that reads back, other factors kept."""
    argv = ["--model", "/ckpt", "--size", "1280x720", "--frames", "81", "--steps", "2"]
    row = {"run": "720p", "argv": ["bench/cli_probe.py", "--", *argv, "--offload", "experts"], "returncode": 0,
           "offload": "experts", "loras": [], "gpu_memory_gb": {"0": {"allocated": 59.0, "reserved": 70.0}},
           "startup": {"weights_s": 6.9, "host_buffers_s": 11.44}, "text_encoder_s": 0.4, "vae_decode_s": 3.0,
           "write_video_s": 1.5}
    results = tmp_path / "e2e.json"
    results.write_text(json.dumps({"preset": "wan2.2-t2v-a14b", "gpu": "NVIDIA H100 80GB HBM3", "runs": [row]}))
    out = tmp_path / "cal.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "video_fit.py"), str(results), "--write-calibration",
                          str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    h100 = json.loads(out.read_text())["gpus"]["h100"]
    read_gb = 2 * 28.577 + 11.4 + 0.2538          # both experts, umT5, the Wan2.1 VAE (bf16)
    assert h100["weights_gbps"] == pytest.approx(read_gb / 6.9, rel=1e-3)
    # host_buffers_s sums the two experts' set-ups, side by side: the start-up they add is one's
    assert h100["offload_setup_gbps"] == pytest.approx(2 * 28.577 / (11.44 / 2), rel=1e-3)
    from paradit.plan import DEFAULT_CALIBRATION
    shipped = json.loads(Path(DEFAULT_CALIBRATION).read_text())["gpus"]["h100"]
    # no run had LoRAs: the shipped rate is kept, not refitted
    assert h100["encode_s"] == 0.4 and h100.get("lora_merge_gbps") == shipped.get("lora_merge_gbps")
    gpix = 1280 * 720 * 81 / 1e9
    assert h100["decode_s_per_gpix"] == pytest.approx(3.0 / gpix, rel=1e-3)
    assert h100["write_s_per_gpix"] == pytest.approx(1.5 / gpix, rel=1e-3)
    assert h100["matmul_efficiency"] == shipped["matmul_efficiency"]      # the entry's other factors kept
    assert load_calibration(str(out)).for_gpu("h100").weights_gbps == pytest.approx(read_gb / 6.9, rel=1e-3)
    only = subprocess.run([sys.executable, str(ROOT / "bench" / "video_fit.py"), str(results), "--only",
                           "offload_setup_gbps", "--write-calibration", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert only.returncode == 0, only.stderr[-3000:]
    h100 = json.loads(out.read_text())["gpus"]["h100"]
    assert h100.get("weights_gbps") == shipped.get("weights_gbps") and h100["offload_setup_gbps"] == pytest.approx(2 * 28.577 / 5.72, rel=1e-3)

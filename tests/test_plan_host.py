"""The planner's host memory: the pinned copies of each offload mode, per rank and per host, held to
what the host has available (paradit.plan.memory's docstring)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from paradit.cli.flags import UsageError, parse_args
from paradit.cli.layout import resolve_layout
from paradit.cli.spec import video_settings
from paradit.checkpoint import save_diffusers_layout
from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.launch import spawn
from paradit.plan import GPUS, Infeasibility, ParallelConfig, evaluate, make_problem, plan, rank_roles
from paradit.plan.cli import main
from paradit.plan.hardware import available_host_gb
from paradit.plan.memory import HOST_MARGIN_GB, host_gb
from paradit.runspec import build_spec
from paradit.settings import VideoSettings

A14B = "wan2.2-t2v-a14b"
EXPERT, TEXT = 28.6, 11.4            # GB of bf16: one A14B expert, umT5
H100_48 = GPUS["h100"].replace(hbm_gb=48)   # a card that holds one expert only with offload


def test_each_offload_mode_pins_what_the_runtime_pins():
    # one rank holding both experts and encoding: the figures the runtime's buffers take
    # (paradit.offload.HostWeights: experts and all both experts, layers both and umT5)
    p = make_problem(A14B, 1, "h100", 1280, 720, 81)
    expected = {"none": 0, "text-encoder": TEXT, "experts": 2 * EXPERT, "all": 2 * EXPERT + TEXT,
                "layers": 2 * EXPERT + TEXT}
    for mode, gb in expected.items():
        cand = evaluate(p, ParallelConfig(), mode)
        need = host_gb(p, cand, mode)[1]
        assert need == pytest.approx(gb + HOST_MARGIN_GB if gb else 0.0, abs=0.1), mode


def test_the_choice_moves_with_host_memory():
    # 8 x 48 GB at 720p: unchecked, the fastest is U8 with the experts offloaded (57.2 GB pinned a rank,
    # 8 ranks on one host); a 200 GB host cannot pin that, and the planner moves to a layout that fits
    free = plan(A14B, 8, H100_48, 1280, 720, 81, shard_weights="none")
    assert free.choice.offload == "experts" and "host memory: not checked" in free.explain()
    assert host_gb(free.problem, free.choice, "experts")[1] > 400
    held = plan(A14B, 8, H100_48, 1280, 720, 81, shard_weights="none", host_gb=200)
    assert held.choice is not None and held.choice.offload in ("none", "text-encoder")
    assert host_gb(held.problem, held.choice, held.choice.offload)[1] <= 200
    assert held.choice.time_to_video_s > free.choice.time_to_video_s     # fitting costs time here
    assert any(c.why is Infeasibility.HOST_MEMORY for c in held.infeasible)
    assert "host memory: 200.0 GB available on each host, 8 rank(s) per host" in held.explain()
    # one GPU at 480p needs an offloaded expert; a 30 GB host has room for none: nothing runs, and why
    small = plan(A14B, 1, H100_48, 832, 480, 81, host_gb=30)
    assert small.choice is None and "host memory (1)" in small.explain()
    assert plan(A14B, 1, H100_48, 832, 480, 81, host_gb=70).choice.offload == "experts"


def test_ranks_on_one_host_share_it():
    p1 = make_problem(A14B, 8, H100_48, 1280, 720, 81, offload="experts", host_gb=130, ranks_per_host=2)
    p4 = make_problem(A14B, 8, H100_48, 1280, 720, 81, offload="experts", host_gb=130, ranks_per_host=4)
    u8 = ParallelConfig(ulysses=8)
    assert evaluate(p1, u8).feasible                                   # 2 x (57.15 + 2) = 118.3 GB
    cand = evaluate(p4, u8)                                           # 4 x (57.15 + 2) = 236.6 GB
    assert cand.why is Infeasibility.HOST_MEMORY
    assert "4 ranks on one host" in cand.reason and "236.6 GB > 130.0 GB" in cand.reason
    # the text encoder is pinned on the encoding ranks only: one per replica (paradit.plan.placement)
    for layout in (ParallelConfig(ulysses=8), ParallelConfig(dp=8), ParallelConfig(ulysses=2, dp=4),
                   ParallelConfig(experts="split", stages=((4, 1, 1), (4, 1, 1)), dp=1)):
        p = make_problem(A14B, 8, "h200", 1280, 720, 81, offload="text-encoder", ranks_per_host=8)
        encoders = sum(rank_roles(layout, r).encodes for r in range(8))
        cand = evaluate(p, layout, "text-encoder")
        assert host_gb(p, cand, "text-encoder")[1] == pytest.approx(encoders * TEXT + 8 * HOST_MARGIN_GB, abs=0.1)


def test_the_cli_refuses_a_mode_the_host_cannot_pin_and_names_the_fix():
    flags = parse_args(["--model", A14B, "--gpu", "h100", "--size", "1280x720", "--frames", "81",
                        "--ulysses", "8", "--offload", "layers"])
    cfg = WanConfig.preset(A14B)
    settings = video_settings(flags, cfg, None)
    host = SimpleNamespace(world_size=8, rank=0, host_gb=125.0, ranks_per_host=8)
    with pytest.raises(UsageError) as err:
        resolve_layout(flags, cfg, host, settings)
    text = str(err.value)
    for part in ("--offload layers", "this host", "offload layers pins 57.2 GB of experts per rank",
                 "11.4 GB of text encoder", "8 ranks on one host", "> 125.0 GB available", "the planner suggests",
                 "--force"):
        assert part in text, part
    # the same run on a host with room for it, or with --force, is not refused
    roomy = SimpleNamespace(world_size=8, rank=0, host_gb=600.0, ranks_per_host=8)
    assert resolve_layout(flags, cfg, roomy, settings)[0].world_size == 8
    forced = parse_args(["--model", A14B, "--gpu", "h100", "--size", "1280x720", "--frames", "81",
                         "--ulysses", "8", "--offload", "layers", "--force"])
    assert resolve_layout(forced, cfg, host, video_settings(forced, cfg, None))[0].world_size == 8


def configs_only(root, preset: str) -> str:
    """A checkpoint folder of `preset` holding its JSON configs and no weights: all build_spec reads."""
    cfg = WanConfig.preset(preset)
    for name in ("transformer", "transformer_2")[:cfg.num_experts]:
        save_diffusers_layout(SimpleNamespace(cfg=cfg), root / name, config_only=True)
    for name, config in (("vae", {"z_dim": cfg.z_dim}), ("text_encoder", {"d_model": cfg.text_dim}), ("tokenizer", {})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"boundary_ratio": cfg.boundary}))
    return str(root)


def test_the_library_holds_offload_to_the_host(tmp_path, monkeypatch):
    # Pipeline.from_pretrained's build (build_spec) on one L40S, patched in (this machine has no GPU), with
    # the host's MemAvailable patched where the launcher reads it: A14B at 720p fits the card only with its
    # experts and text encoder in host memory (all or layers: 57.2 + 11.4 GB pinned, 2 GB besides)
    folder = configs_only(tmp_path, A14B)
    monkeypatch.setattr("paradit.launch.planner_gpu", lambda device: "l40s")
    monkeypatch.setattr("paradit.launch.available_host_gb", lambda: 200.0)
    assert build_spec(folder, offload="auto").offload == "all"
    monkeypatch.setattr("paradit.launch.available_host_gb", lambda: 40.0)
    for mode in ("auto", "all", "experts"):   # chosen or given, a mode the host cannot pin is refused
        with pytest.raises(ParameterError) as err:
            build_spec(folder, offload=mode)
        assert err.value.param == "offload" and err.value.value == mode
        for part in ("host memory", "57.2 GB of experts per rank", "> 40.0 GB available", "force=True"):
            assert part in str(err.value), (mode, part)
    assert build_spec(folder, offload="all", force=True).offload == "all"
    assert build_spec(folder, offload="text-encoder").offload == "text-encoder"   # 13.4 GB: it fits


def test_planner_cli_shows_and_takes_the_host_figure(capsys):
    base = ["--gpus", "8", "--gpu", "h100", "--hbm-gb", "48", "--shard-weights", "none"]
    assert main(base + ["--host-gb", "200", "--ranks-per-host", "8"]) == 0
    out = capsys.readouterr().out
    assert "host memory: 200.0 GB available on each host, 8 rank(s) per host" in out and "offload experts" not in \
        out.split("Choice:")[1].split("\n")[0]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "host memory: not checked" in out and "Choice: U8 offload experts" in out
    if available_host_gb() is not None:
        assert "This machine has" in out and "--host-gb" in out
    assert main(base + ["--host-gb", "0"]) == 2 and "--host-gb" in capsys.readouterr().err


def _host_figures():
    from paradit.launch import init_distributed
    info = init_distributed("cpu")
    return info.host_gb, info.ranks_per_host


def test_the_launcher_gives_every_rank_the_same_host_figure():
    got = spawn(_host_figures, 2)
    here = available_host_gb()
    assert got[0] == got[1] and got[0][1] == 2         # LOCAL_WORLD_SIZE unset: both ranks on this host
    if here is not None:      # the least of the ranks' reads; the machine's memory moves a little meanwhile
        assert math.isclose(got[0][0], here, abs_tol=4.0)


def fake_host(monkeypatch, kind: str, host_gb: float, world: int = 1):
    """This process as one rank of `world` on a `kind` GPU (patched in: this machine has none) whose host has
    `host_gb` available, all the world's ranks on it: the figures build_spec reads from the launcher."""
    from paradit.launch import DistInfo
    info = DistInfo(0, world, 0, torch.device("cpu"), "gloo" if world > 1 else None, host_gb, world)
    monkeypatch.setattr("paradit.launch.planner_gpu", lambda device: kind)
    monkeypatch.setattr("paradit.launch.init_distributed", lambda *args, **kwargs: info)
    return info


def test_the_library_plans_offload_for_the_video_it_is_given(tmp_path, monkeypatch):
    # A14B on one L40S with 60 GB of host memory: at its default 1280x720x81 only all or layers fit the card,
    # and neither fits the host (57.2 + 11.4 GB pinned, 2 besides); at 832x480x17 experts fits both (59.2 GB)
    folder = configs_only(tmp_path, A14B)
    fake_host(monkeypatch, "l40s", 60.0)
    small = VideoSettings.resolve(WanConfig.preset(A14B), 832, 480, 17)
    with pytest.raises(ParameterError) as err:
        build_spec(folder, offload="auto")
    assert err.value.param == "offload" and "force=True" in str(err.value)
    assert build_spec(folder, offload="auto", settings=small).offload == "experts"
    with pytest.raises(ParameterError) as err:   # an explicit mode the host cannot pin: refused at any video
        build_spec(folder, offload="all", settings=small)
    assert err.value.param == "offload" and "> 60.0 GB available" in str(err.value) and "force=True" in str(err.value)
    assert build_spec(folder, offload="all", settings=small, force=True).offload == "all"
    assert build_spec(folder, offload="auto", settings=small, gpu="h100").offload == "none"   # 80 GB: no offload
    with pytest.raises(ParameterError, match="^gpu='h1000'"):
        build_spec(folder, offload="auto", settings=small, gpu="h1000")
    with pytest.raises(ParameterError, match="^settings=.*VideoSettings"):
        build_spec(folder, offload="auto", settings={"width": 832})


def test_the_cli_plans_offload_once_for_its_run(tmp_path, monkeypatch):
    # generate's --offload auto is the library's offload="auto" planned for the run's video and --gpu: one
    # planning (runspec.plan_offload, in build_spec), not the CLI's then a check at the model's default video
    from paradit import runspec
    from paradit.cli.spec import resolve
    folder = configs_only(tmp_path, A14B)
    info = fake_host(monkeypatch, "l40s", 60.0)
    calls = []
    planned = runspec.plan_offload
    monkeypatch.setattr(runspec, "plan_offload", lambda *args, **kw: calls.append(args) or planned(*args, **kw))
    spec = resolve(parse_args(["--model", folder, "--size", "832x480", "--frames", "17"]), info)
    assert spec.build.offload == "experts" and len(calls) == 1
    mode, _, _, kind, video = calls[0][:5]
    assert (mode, kind, video) == ("auto", "l40s", spec.settings)
    assert build_spec(folder, offload="auto", settings=spec.settings).offload == spec.build.offload
    h100 = resolve(parse_args(["--model", folder, "--size", "832x480", "--frames", "17", "--gpu", "h100"]), info)
    assert h100.build.offload == "none" and calls[-1][3] == "h100"
    # an explicit --offload layers where the experts fit whole is still the CLI's refusal (141 GB, 400 GB host)
    info = fake_host(monkeypatch, "l40s", 400.0)
    with pytest.raises(UsageError, match="^--offload layers: .* holds its experts whole on h200"):
        resolve(parse_args(["--model", folder, "--size", "832x480", "--frames", "17", "--gpu", "h200", "--offload",
                            "layers"]), info)


def test_auto_sharding_holds_offload_to_the_host(tmp_path, monkeypatch):
    # A14B over Ulysses 2 on two L40S of one host. With room to pin both experts on each rank (2 x 59.2 GB,
    # the text encoder's 11.4 besides), the weights stay whole and the experts are offloaded; on a 100 GB host
    # they cannot be pinned, and shard_weights="auto" shards each expert over the pair instead (no expert
    # offloaded), as the CLI plans it
    folder = configs_only(tmp_path, A14B)
    u2 = ParallelConfig(ulysses=2, shard_weights="auto")
    fake_host(monkeypatch, "l40s", 400.0, world=2)
    roomy = build_spec(folder, u2, offload="auto")
    assert roomy.layout.shard_weights == "none" and roomy.offload in ("experts", "all")
    fake_host(monkeypatch, "l40s", 100.0, world=2)
    held = build_spec(folder, u2, offload="auto")
    assert held.layout.shard_weights == "sp" and held.offload in ("none", "text-encoder")


def counting(fn, calls: list):
    """fn, recording each call's result in `calls`."""
    return lambda *args, **kw: calls.append(fn(*args, **kw)) or calls[-1]


def test_fp8_is_never_planned_with_an_offload_that_moves_experts(tmp_path, monkeypatch):
    # FP8 weights do not move through the experts' host buffers (residency.runs_with_quant; check_quant
    # refuses experts, all and layers with it). A14B on one L40S at 832x480x17: in bf16 offload "auto" keeps the
    # experts in host memory; with quant="fp8" the library plans a mode FP8 runs with, as the CLI does (the
    # CLI's own memory check refuses it, the bf16 figures not fitting, until --force), never experts
    from paradit.cli.spec import resolve
    monkeypatch.setattr("paradit.models.quant.fp8_linears_missing", lambda device: [])   # as on an FP8 GPU
    folder = configs_only(tmp_path, A14B)
    info = fake_host(monkeypatch, "l40s", 400.0)
    small = VideoSettings.resolve(WanConfig.preset(A14B), 832, 480, 17)
    assert build_spec(folder, offload="auto", settings=small).offload == "experts"
    fp8 = build_spec(folder, offload="auto", quant="fp8", settings=small)
    assert fp8.offload == "text-encoder"          # the least memory of the modes that move no expert
    argv = ["--model", folder, "--size", "832x480", "--frames", "17", "--quant", "fp8"]
    with pytest.raises(UsageError, match=r"predicted not to fit on l40s \(for bf16 weights: --quant fp8 is not "
                                         r"modelled.*--force"):
        resolve(parse_args(argv), info)
    assert resolve(parse_args(argv + ["--force"]), info).build.offload == fp8.offload
    for mode in ("experts", "all", "layers"):     # given: refused, on every path, before the build
        with pytest.raises(ParameterError, match=rf"^quant='fp8': the expert offload \(offload {mode}\) does not"):
            build_spec(folder, offload=mode, quant="fp8", settings=small)
    # fp8-attention makes no FP8 weight: its experts move as bf16's do, and are planned so
    monkeypatch.setattr("paradit.models.quant.fp8_attention_missing", lambda device: [])
    assert build_spec(folder, offload="auto", quant="fp8-attention", settings=small).offload == "experts"
    # auto sharding is none with FP8 (FSDP2 gathers the loaded dtype): where bf16 shards, FP8 builds whole
    fake_host(monkeypatch, "l40s", 100.0, world=2)
    u2 = ParallelConfig(ulysses=2, shard_weights="auto")
    assert build_spec(folder, u2, offload="auto").layout.shard_weights == "sp"
    held = build_spec(folder, u2, offload="auto", quant="fp8")
    assert held.layout.shard_weights == "none" and held.offload in ("none", "text-encoder")


def test_auto_sharding_is_never_planned_with_compile(tmp_path, monkeypatch):
    # compiled blocks run whole weights (plan.sharding.check_shard_options). A14B over Ulysses 2 on two L40S
    # of a 100 GB host, the text encoder offloaded: in bf16 shard_weights="auto" shards over sp; with
    # compile=True the planner keeps the weights whole (before: it planned sp and build_spec then refused it,
    # naming shard_weights), in the library, in generate's --compile and in the planner's own search
    from paradit.cli.spec import resolve
    folder = configs_only(tmp_path, A14B)
    info = fake_host(monkeypatch, "l40s", 100.0, world=2)
    u2 = ParallelConfig(ulysses=2, shard_weights="auto")
    assert build_spec(folder, u2, offload="text-encoder").layout.shard_weights == "sp"
    compiled = build_spec(folder, u2, offload="text-encoder", compile=True)
    assert compiled.layout.shard_weights == "none" and compiled.compile
    argv = ["--model", folder, "--ulysses", "2", "--offload", "text-encoder", "--compile", "--force"]
    assert resolve(parse_args(argv), info).layout == compiled.layout
    with pytest.raises(ParameterError, match=r"^shard_weights='sp': sharded weights run eagerly"):   # asked for
        build_spec(folder, ParallelConfig(ulysses=2, shard_weights="sp"), offload="text-encoder", compile=True)
    searched = plan(A14B, 2, "l40s", compile=True, host_gb=100.0, ranks_per_host=2)
    assert {c.layout.shard_weights for c in searched.candidates} == {"none"}
    assert "sp" in {c.layout.shard_weights for c in plan(A14B, 2, "l40s", host_gb=100.0, ranks_per_host=2).candidates}


def test_split_stages_without_sizes_follow_the_run_steps(tmp_path, monkeypatch):
    # experts="split" without stages takes its sizes from the step split of the video build_spec plans for:
    # A14B over 4 ranks, 40 steps at shift 12 (the model's) run 26 high-noise steps (3 + 1 GPUs); 10 at shift 1,
    # 2 of them (1 + 3), as generate's --experts split --steps 10 --shift 1 splits them
    from paradit.cli.spec import resolve
    folder = configs_only(tmp_path, A14B)
    info = fake_host(monkeypatch, "h100", 400.0, world=4)
    split = ParallelConfig(experts="split")
    assert build_spec(folder, split).layout.stage_sizes == (3, 1)
    run = VideoSettings.resolve(WanConfig.preset(A14B), 832, 480, 17, steps=10, shift=1.0)
    library = build_spec(folder, split, settings=run)
    assert library.layout.stage_sizes == (1, 3) and library.experts_needed == frozenset({0})
    cli = resolve(parse_args(["--model", folder, "--size", "832x480", "--frames", "17", "--steps", "10", "--shift",
                              "1", "--experts", "split"]), info)
    assert cli.layout == library.layout


def test_the_cli_splits_stages_by_the_library_s_function(tmp_path, monkeypatch):
    # one calculation of split stages (runspec.resolve_stages: the step split, or the sizes given, each stage's
    # sp from the heads, cfg groups checked), for experts="split" and generate's --experts split alike
    from paradit import runspec
    from paradit.cli.spec import resolve
    folder = configs_only(tmp_path, A14B)
    info = fake_host(monkeypatch, "h100", 400.0, world=4)
    calls = []
    monkeypatch.setattr(runspec, "resolve_stages", counting(runspec.resolve_stages, calls))
    argv = ["--model", folder, "--size", "832x480", "--frames", "17", "--experts", "split"]
    assert resolve(parse_args(argv), info).layout.stages == calls[-1].stages and len(calls) == 1
    assert resolve(parse_args(argv + ["--stages", "1,3"]), info).layout.stage_sizes == (1, 3) and len(calls) == 2
    with pytest.raises(UsageError, match=r"^--cfg-par 2: a stage of 3 GPUs \(split 3\+1\) cannot hold 2 CFG-parallel "
                                         r"groups; give stage sizes divisible by 2, or use: --cfg-par 1$"):
        resolve(parse_args(argv + ["--stages", "3,1", "--cfg-par", "2"]), info)
    with pytest.raises(ParameterError, match=r"^cfg=2: a stage of 3 GPUs \(split 3\+1\) .*or use: cfg=1$"):
        build_spec(folder, ParallelConfig(experts="split", cfg=2), settings=VideoSettings.resolve(
            WanConfig.preset(A14B), 832, 480, 17))


def test_plan_auto_plans_the_offload_with_the_layout(tmp_path, monkeypatch):
    # --plan auto: the planner's search chooses the layout and its offload mode together (2 x L40S at
    # 832x480x17: U1 cfg2, experts offloaded); the build takes that choice, with no second evaluation of it
    # (before: build_spec's plan_offload and the CLI's memory check each evaluated the layout again)
    import paradit.plan as planner
    from paradit.cli.spec import resolve
    folder = configs_only(tmp_path, A14B)
    info = fake_host(monkeypatch, "l40s", 400.0, world=2)
    plans, evaluations = [], []
    monkeypatch.setattr(planner, "plan", counting(planner.plan, plans))
    monkeypatch.setattr(planner, "evaluate", counting(planner.evaluate, evaluations))
    spec = resolve(parse_args(["--model", folder, "--plan", "auto", "--size", "832x480", "--frames", "17"]), info)
    choice = plans[0].choice
    assert len(plans) == 1 and evaluations == []
    assert (spec.layout, spec.build.offload) == (choice.layout, choice.offload) and choice.offload == "experts"
    # the library takes the same choice (planned=), and plans the same without it
    assert build_spec(folder, choice.layout, settings=spec.settings, offload="auto", planned=choice).offload == "experts"
    assert build_spec(folder, choice.layout, settings=spec.settings, offload="auto").offload == "experts"
    assert len(evaluations) == 1
    with pytest.raises(ParameterError, match=r"^planned=.*planned for another build"):
        build_spec(folder, ParallelConfig(ulysses=2), settings=spec.settings, offload="auto", planned=choice)
    with pytest.raises(ParameterError, match=r"^planned=.*planned for another build"):
        build_spec(folder, choice.layout, settings=spec.settings, offload="none", planned=choice)

"""Opt-in FP8 (paradit/models/quant.py): which layers are quantised, the refusals, the CLI flag, and
torchao's float8 recipe wired into the model (emulated on the CPU, where torchao itself refuses it).

The refusals on every rank, in flag and parameter terms, are rows of tests/test_reliability.py's
BAD_CLI, BAD_CLI_TORCHRUN and BAD_LIBRARY tables.
"""
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from paradit.cli.flags import UsageError, parse_args
from paradit.cli.spec import resolve
from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.launch import DistInfo
from paradit.models import quant
from paradit.models.transformer import WanTransformer
from paradit.plan.layout import ParallelConfig
from paradit.settings import QUANT_MODES, quant_parts

CPU = torch.device("cpu")
# dims multiples of 16, as torch._scaled_mm needs; 2 blocks
SMALL = WanConfig.preset("tiny").replace(dim=64, ffn_dim=128, num_heads=2, num_layers=2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- what is quantised -----------------------------------------------------------------------
def test_modes_and_their_parts():
    assert QUANT_MODES == ("none", "fp8", "fp8-attention", "fp8-all")
    assert [quant_parts(m) for m in QUANT_MODES] == [(), ("linears",), ("attention",), ("linears", "attention")]
    with pytest.raises(ParameterError, match=r"quant='int4': choose one of none, fp8, fp8-attention, fp8-all"):
        quant_parts("int4")


def test_linears_of_every_block_and_nothing_else():
    with torch.device("meta"):
        model = WanTransformer(SMALL)
    per_block = [f"self_attn.{p}" for p in "qkvo"] + [f"cross_attn.{p}" for p in "qkvo"] + ["ffn.0", "ffn.2"]
    assert quant.fp8_linear_names(model) == [f"blocks.{i}.{n}" for i in range(2) for n in per_block]


def test_a14b_keeps_embeddings_modulation_and_head():
    with torch.device("meta"):
        model = WanTransformer(WanConfig.preset("wan2.2-t2v-a14b"))
    names = set(quant.fp8_linear_names(model))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(names) == 40 * 10
    assert sorted(linears - names) == ["head.head", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                       "time_embedding.2", "time_projection.1"]
    # the rest (1.6% of the linear weights: mostly the time projection, 5120 -> 6 x 5120) runs on one
    # token per sample, not on the 75,600 video tokens
    share = sum(model.get_submodule(n).weight.numel() for n in names) / sum(
        model.get_submodule(n).weight.numel() for n in linears)
    assert share > 0.98


# ---- refusals ---------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("mode", ["fp8", "fp8-all"])
def test_cpu_is_refused_naming_what_is_needed(mode):
    with pytest.raises(ParameterError) as err:
        quant.check_quant(mode, CPU)
    text = str(err.value)
    assert text.startswith(f"quant={mode!r}: FP8 cannot run on this machine")
    assert "compute capability 8.9 or higher" in text and "on cpu" in text and "without FP8" in text


def test_fp8_attention_names_what_is_missing():
    with pytest.raises(ParameterError, match=r"a Hopper GPU \(compute capability 9\.x.*on cpu") as err:
        quant.check_quant("fp8-attention", CPU)
    if importlib.util.find_spec("flash_attn_interface") is None:
        assert "FlashAttention-3 (the flash_attn_interface module" in str(err.value)
    if importlib.util.find_spec("cudnn") is None:
        assert "or a Hopper GPU (compute capability 9.x) for cuDNN's FP8 attention" in str(err.value)
        assert "pip install nvidia-cudnn-frontend" in str(err.value)


@pytest.fixture
def fp8_machine(monkeypatch):
    """Pretend this machine runs FP8 (paradit's checks only): the refusals that follow the machine's."""
    monkeypatch.setattr(quant, "fp8_linears_missing", lambda device: [])
    monkeypatch.setattr(quant, "fp8_attention_missing", lambda device: [])


def test_offload_and_ring_are_refused(fp8_machine):
    assert quant.check_quant("none", CPU, "all", ParallelConfig(ring=2)) == ()
    assert quant.check_quant("fp8", CPU, "text-encoder", ParallelConfig(ring=2)) == ("linears",)
    for mode in ("experts", "all", "layers"):   # each moves experts through host buffers of the loaded dtype
        with pytest.raises(ParameterError, match=rf"quant='fp8': the expert offload \(offload {mode}\)"):
            quant.check_quant("fp8", CPU, mode)
    assert quant.check_quant("fp8", CPU, "auto") == ("linears",)   # build_spec plans auto without them
    with pytest.raises(ParameterError, match=r"quant='fp8-all': Ring attention merges .* log-sum-exp"):
        quant.check_quant("fp8-all", CPU, "none", ParallelConfig(ulysses=2, ring=2))
    split = ParallelConfig(experts="split", stages=((1, 2, 1), (1, 1, 1)))
    with pytest.raises(ParameterError, match=r"Ring attention"):
        quant.check_quant("fp8-attention", CPU, "none", split)
    assert quant.check_quant("fp8-attention", CPU, "none", ParallelConfig(ulysses=2)) == ("attention",)


def emulated_fp8_attention(calls: list):
    """FP8 self-attention as cuDNN's kernel rounds it (q, k, v in float8 e4m3, one scale per tensor), then
    SDPA in the inputs' dtype: the FP8 kernels run on Hopper only; this stands in for them on the CPU."""
    def attention(q, k, v):                             # (B, S, H, D) each
        calls.append(q.shape)
        q, k, v = ((t8.to(t.dtype) * scale.to(t.dtype)).transpose(1, 2)   # (B, H, S, D)
                   for t in (q, k, v) for t8, scale in [quant._e4m3(t)])
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)   # (B, S, H, D)
    return attention


def test_fp8_attention_runs_with_every_offload_mode(fp8_machine, monkeypatch):
    # fp8-attention quantises no weight (only self-attention's q, k, v, inside the kernel), so the experts move
    # through their host buffers as loaded, as without FP8 (residency.runs_with_quant; before, check_quant
    # refused experts, all and layers with it). The tiny model offloaded gives the same latent as kept on the
    # device, with the FP8 kernel (emulated) bound to both experts, on every step
    from paradit.pipeline import Pipeline
    for mode in ("experts", "all", "layers"):
        assert quant.check_quant("fp8-attention", CPU, mode) == ("attention",)
    calls = []
    monkeypatch.setattr("paradit.pipeline.fp8_attention", lambda: emulated_fp8_attention(calls))
    kw = dict(steps=4, seed=3, progress=False, output="latent")
    plain = Pipeline.from_pretrained("tiny")("a red circle", **kw)
    kept = Pipeline.from_pretrained("tiny", quant="fp8-attention")("a red circle", **kw)
    per_run = len(calls)
    assert per_run == 4 * 2 and rel(kept, plain) > 1e-4   # 4 steps x 2 blocks (CFG batched): it ran, and rounds
    for mode in ("experts", "layers"):
        pipe = Pipeline.from_pretrained("tiny", quant="fp8-attention", offload=mode)
        before = len(calls)
        assert torch.equal(pipe("a red circle", **kw), kept) and len(calls) - before == per_run, mode
        assert sorted({e for step in pipe.record.residency for e in step}) == [0, 1], mode   # both moved in turn


def test_fp32_and_odd_shapes_are_refused(fp8_machine):
    pytest.importorskip("torchao")
    with pytest.raises(ParameterError, match=r"the model is in torch.float32; FP8 linear layers take bf16"):
        quant.quantize_experts([WanTransformer(SMALL)], "fp8")
    odd = WanTransformer(WanConfig.preset("tiny")).to(torch.bfloat16)      # dim 24
    with pytest.raises(ParameterError, match=r"blocks.0.self_attn.q is 24 -> 24; .*multiples of 16"):
        quant.quantize_experts([odd], "fp8")


def test_library_refuses_before_building(monkeypatch):
    from paradit.pipeline import Pipeline
    monkeypatch.setattr("paradit.pipeline.build_components", lambda *a, **k: pytest.fail("built before refusing"))
    with pytest.raises(ParameterError, match=r"quant='fp8'"):
        Pipeline.from_pretrained("tiny", device="cpu", quant="fp8")


# ---- the CLI flag -----------------------------------------------------------------------------
def spec(argv, rank=0, world=1):
    flags = parse_args(["--out", "/tmp/paradit-quant-test/v.mp4", *argv])
    info = DistInfo(rank, world, rank, CPU, "gloo")
    return resolve(flags, info)


def test_flag_parsing():
    assert parse_args([]).quant == "none"
    for mode in QUANT_MODES:
        assert parse_args(["--quant", mode]).quant == mode
    with pytest.raises(UsageError, match=r"--quant invalid choice: 'fp4' \(choose from 'none', 'fp8'"):
        parse_args(["--quant", "fp4"])
    assert spec(["--model", "tiny", "--quant", "none"]).build.quant == "none"


def test_flag_refusals_in_flag_terms(fp8_machine):
    with pytest.raises(UsageError, match=r"^--quant fp8: the tiny preset runs in fp32"):
        spec(["--model", "tiny", "--quant", "fp8"])
    with pytest.raises(UsageError, match=r"^--quant fp8: the expert offload \(offload all\)"):
        spec(["--model", "demo", "--quant", "fp8", "--offload", "all"])
    for rank in range(2):
        with pytest.raises(UsageError, match=r"^--quant fp8-attention: Ring attention"):
            spec(["--model", "demo", "--quant", "fp8-attention", "--ring", "2"], rank, 2)


# ---- torchao's recipe in the model ------------------------------------------------------------
@pytest.fixture
def torchao_on_cpu(fp8_machine, monkeypatch):
    """torchao refuses its float8 recipe off a GPU (an assert on the compute capability); lifted here
    so that its Float8Tensor runs on the CPU: the wiring, not the GPU kernel, is under test."""
    pytest.importorskip("torchao")
    a, scale = torch.ones(16, 16).to(torch.float8_e4m3fn), torch.ones(16, 1)
    try:   # the emulation needs the CPU _scaled_mm with per-row scales (torch 2.11's has per-tensor only)
        torch._scaled_mm(a, a.t(), scale_a=scale, scale_b=scale.t(), out_dtype=torch.bfloat16)
    except RuntimeError as err:
        pytest.skip(f"this torch's CPU _scaled_mm takes no per-row scales ({str(err).splitlines()[0][:80]})")
    import torchao.quantization.quant_api as quant_api
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


def test_fp8_forward_against_bf16(torchao_on_cpu, caplog):
    from torchao.quantization import Float8Tensor
    torch.manual_seed(0)
    model = WanTransformer(SMALL).to(torch.bfloat16).eval().requires_grad_(False)
    x = torch.randn(1, SMALL.in_channels, 1, 8, 8, dtype=torch.bfloat16)
    t, ctx = torch.tensor([500.0]), torch.randn(1, SMALL.text_len, SMALL.text_dim, dtype=torch.bfloat16)
    ref = model(x, t, ctx)
    with caplog.at_level(logging.INFO, logger="paradit"):
        report = quant.quantize_experts([model, None], "fp8")
    assert report["linears"]["layers_per_expert"] == [20] and report["attention"] is None
    assert "FP8 linear layers, 20 per expert" in caplog.text            # never silent
    names = set(quant.fp8_linear_names(model))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert isinstance(m.weight, Float8Tensor) == (name in names), name
    assert model.blocks[0].modulation.dtype == torch.bfloat16 and type(model.blocks[0].modulation) is nn.Parameter
    err = rel(model(x, t, ctx), ref)
    # e4m3 keeps 3 mantissa bits: each quantised operand is off by ~2^-4/sqrt(3) = 3.6% RMS, one
    # linear's output by ~5%; through two blocks, whose residual stream is not quantised, the
    # output measured 9e-3 here (seed 0); 0.05 is five times that, and a missed or wrong scale is
    # off by O(1). Above 1e-3: the bf16 model run twice gives exactly 0, so a smaller error would
    # mean that nothing was quantised.
    assert 1e-3 < err < 0.05, err


def test_bench_smoke_on_cpu(torchao_on_cpu, tmp_path):
    """bench/quant.py end to end at small shapes: the GPU run's plumbing, not its numbers."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("bench_quant", bench / "quant.py")
    bench_quant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_quant)
    path = bench_quant.main(["--cpu-emulation", "--demo-steps", "2", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads(Path(path).read_text())
    assert re.match(r"\d{4}-\d\d-\d\d_cpu\d+_quant\.json", Path(path).name)
    assert result["emulated"] and 0 < result["forward"]["fp8"]["rel_err"] < 0.2
    assert result["step_s"]["eager"]["bf16"] > 0 and result["step_s"]["eager"]["fp8"] > 0
    assert result["quantised"]["linears"]["layers_per_expert"] == [20]
    assert result["demo"]["steps"] == 2 and 0 < result["demo"]["fp8_vs_bf16"]["rel_err"] < 0.5
    assert result["demo"]["fp8_vs_bf16"]["psnr_db"] > 0 and set(result["demo"]["judge"]) == {"fp32", "bf16", "fp8"}
    big = bench_quant.demo_latents(torch.device("cpu"), "fp8", True, 2, "demo64")   # --model demo64's denoise
    assert big["prompt"] == "a red circle moving right slowly" and 0 < big["fp8_vs_bf16"]["rel_err"] < 0.5
    assert big["judge"]["fp8"]["speed"] is not None


def test_from_pretrained_quantises_after_loading(torchao_on_cpu, monkeypatch):
    """The pipeline's wiring: the report on the pipeline, the experts' linears in float8, a denoise
    that runs (tiny's layout at dim 64, in bf16)."""
    from torchao.quantization import Float8Tensor

    from paradit import config
    from paradit.pipeline import Pipeline
    monkeypatch.setitem(config.PRESETS, "tiny", SMALL)
    pipe = Pipeline.from_pretrained("tiny", device="cpu", dtype=torch.bfloat16, quant="fp8")
    assert pipe.quant["mode"] == "fp8" and pipe.quant["linears"]["layers_per_expert"] == [20, 20]
    assert all(isinstance(m.blocks[1].ffn[2].weight, Float8Tensor) for m in pipe.experts)
    latent = pipe("a red circle", steps=2, output="latent", progress=False)
    assert torch.isfinite(latent).all()

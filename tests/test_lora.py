"""LoRAs merged at load time: every published file layout gives what diffusers' WanPipeline gives
after load_lora_weights (high-noise LoRA into transformer, low-noise into transformer_2); the
deltas diffusers does not read (norms, modulation, convolutions) are checked against their own
definition; bad LoRAs fail on every rank before any weight is read."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt_workers import NEGATIVE, PROMPT, SIZE, TINY_T2V, write_checkpoint
from paradit.config import WanConfig
from paradit.launch import free_port
from paradit.models.loading import load_transformer, to_diffusers_name
from paradit.models.lora import LoraError, LoraSpec, check_loras, lora_specs, model_shapes, parse_lora
from paradit.pipeline import Pipeline
from paradit.schedulers.registry import make_scheduler
from paradit.settings import VideoSettings

RANK = 3
TINY = WanConfig.preset("tiny")
# two steps at shift 5: t = 1000 on the high-noise expert, t = 833 on the low-noise one
RUN = dict(negative_prompt=NEGATIVE, frames=9, steps=2, shift=5.0, seed=7, progress=False, **SIZE["t2v"])
SCALES = {"high": 0.7, "low": 1.3}
FORMATS = ("diffusers", "kohya", "original_ab")
# paradit merges the LoRA into the weights (fp32), PEFT adds B(A(x)) beside the base layer: the
# same sums in another order. The base pipelines agree to ~3e-7 relative (4 steps of two experts);
# 2e-5 leaves a margin for the extra rounding, while a wrong scale or name is > 1e-2.
RTOL = 2e-5


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def linears(cfg) -> list[str]:
    """Every attention and FFN linear of the model (original Wan names, without .weight)."""
    return [f"blocks.{i}.{m}" for i in range(cfg.num_layers) for m in
            [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]]


def random_lora(cfg, fmt: str, seed: int, rank: int = RANK) -> tuple[dict, dict | None]:
    """A LoRA on every linear in one of the published layouts, with bias deltas and (original
    layouts) the head's full delta: (tensors, safetensors metadata). Every linear gets a bias delta:
    diffusers (PEFT's lora_bias) leaves the ones a file lacks unset."""
    g = torch.Generator().manual_seed(seed)
    shapes = model_shapes(cfg)
    out = {}
    for j, module in enumerate(linears(cfg)):
        n_out, n_in = shapes[module + ".weight"]
        down = torch.randn(rank, n_in, generator=g) * 0.3
        up = torch.randn(n_out, rank, generator=g) * 0.1
        bias = torch.randn(n_out, generator=g) * 0.05
        if fmt == "diffusers":
            name = "transformer." + to_diffusers_name(module + ".weight").removesuffix(".weight")
            out |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.lora_B.bias": bias}
            continue
        name = "diffusion_model." + module
        a, b = ("lora_down", "lora_up") if fmt == "kohya" else ("lora_A", "lora_B")
        out |= {f"{name}.{a}.weight": down, f"{name}.{b}.weight": up, f"{name}.diff_b": bias}
        if fmt == "kohya":
            out[f"{name}.alpha"] = torch.tensor(float(1 + j % 4))   # alpha != rank, one per module
    if fmt == "diffusers":  # diffusers' save_lora_weights writes the PEFT config, alpha != rank
        config = dict(r=rank, lora_alpha=2.0 * rank + 1, target_modules=sorted(
            k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in out if k.endswith("lora_A.weight")),
            lora_bias=True, use_dora=False, rank_pattern={}, alpha_pattern={})
        return out, {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    n_out, n_in = shapes["head.head.weight"]
    out["diffusion_model.head.head.diff"] = torch.randn(n_out, n_in, generator=g) * 0.05
    out["diffusion_model.head.head.diff_b"] = torch.randn(n_out, generator=g) * 0.05
    return out, None


def write_lora(path, cfg, fmt, seed):
    tensors, metadata = random_lora(cfg, fmt, seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("lora_ckpt"))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {(fmt, expert): write_lora(d / f"{fmt}_{expert}.safetensors", TINY_T2V, fmt, seed)
            for seed, (fmt, expert) in enumerate((f, e) for f in FORMATS for e in ("high", "low"))}


def diffusers_latent(ckpt, high, low, cond, uncond, sigmas, noise):
    """diffusers' WanPipeline on the same weights and the original Wan schedule (UniPC on paradit's
    sigmas), the LoRAs loaded as diffusers loads Wan2.2 LoRAs."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2,
                                    predict_x0=True, solver_type="bh2", lower_order_final=True,
                                    num_train_timesteps=1000, flow_shift=1.0)  # the sigmas are shifted already
    set_timesteps = sched.set_timesteps
    sched.set_timesteps = lambda n, device=None: set_timesteps(sigmas=sigmas[:-1].numpy(), device=device)
    experts = [WanTransformer3DModel.from_pretrained(ckpt / n).eval() for n in ("transformer", "transformer_2")]
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched, transformer=experts[0],
                       transformer_2=experts[1], boundary_ratio=TINY_T2V.boundary)
    pipe.load_lora_weights(str(high), adapter_name="high")
    pipe.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    pipe.transformer.set_adapters(["high"], [SCALES["high"]])
    pipe.transformer_2.set_adapters(["low"], [SCALES["low"]])
    g = TINY_T2V.guidance
    with torch.no_grad():
        out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=RUN["height"], width=RUN["width"],
                   num_frames=RUN["frames"], num_inference_steps=RUN["steps"], guidance_scale=g[0],
                   guidance_scale_2=g[1], latents=noise[None], output_type="latent", return_dict=False)[0]
    return out[0]


@pytest.fixture(scope="module")
def base(ckpt):
    """paradit without LoRAs: its latent, prompt embeddings, sigmas and noise for diffusers."""
    pipe = Pipeline.from_pretrained(str(ckpt))
    latent = pipe(PROMPT, output="latent", **RUN)
    s = VideoSettings.resolve(pipe.cfg, RUN["width"], RUN["height"], RUN["frames"], RUN["steps"], RUN["shift"],
                              None, RUN["seed"], "unipc")
    cond, uncond = pipe.encode_prompts(PROMPT, NEGATIVE, s.guidance)
    return dict(latent=latent, cond=cond, uncond=uncond, sigmas=make_scheduler("unipc", s.shift, s.steps).sigmas,
                noise=pipe.denoiser.initial_noise(s))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_layout_matches_diffusers(fmt, ckpt, loras, base):
    specs = [LoraSpec(loras[fmt, e], SCALES[e], e) for e in ("high", "low")]
    pipe = Pipeline.from_pretrained(str(ckpt), loras=specs)
    ours = pipe(PROMPT, output="latent", **RUN)
    ref = diffusers_latent(ckpt, loras[fmt, "high"], loras[fmt, "low"], base["cond"], base["uncond"],
                           base["sigmas"], base["noise"])
    assert [k for _, k, _ in pipe.record.trace] == [0, 1]   # one step on each expert
    assert rel_err(ours, ref) < RTOL, fmt
    assert rel_err(ours, base["latent"]) > 1e-2  # the LoRAs change the result: the check above can fail
    assert set(pipe.startup) >= {"lora_check_s", "lora_merge_s"}
    assert pipe.load_stats["transformer"]["lora"]["files"] == [str(loras[fmt, "high"])]
    assert pipe.load_stats["transformer_2"]["lora"]["files"] == [str(loras[fmt, "low"])]


def test_each_rank_merges_only_the_experts_it_loads(ckpt, loras):
    specs = [LoraSpec(loras["kohya", e], SCALES[e], e) for e in ("high", "low")]
    pipe = Pipeline.from_pretrained(str(ckpt), loras=specs, experts_needed={1})
    assert pipe.experts[0] is None and "transformer" not in pipe.load_stats
    assert pipe.load_stats["transformer_2"]["lora"]["files"] == [str(loras["kohya", "low"])]
    base = load_transformer(ckpt / "transformer_2").state_dict()
    merged = pipe.experts[1].state_dict()
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    # every linear's weight and bias (LoRA and diff_b), and the head (diff, diff_b)
    assert changed == {f"{m}.{p}" for m in linears(TINY_T2V) + ["head.head"] for p in ("weight", "bias")}


# ----------------------------------------------------------------------------- what diffusers does not read
def test_full_deltas_and_conv_lora_follow_their_definition(ckpt, tmp_path):
    """diff / diff_b of norms, modulation tables and the patch embedding are full deltas (diffusers
    drops them); a conv LoRA on the patch embedding is its two convolutions; bf16 weights get the
    fp32 merge, rounded once."""
    g = torch.Generator().manual_seed(5)
    base = load_transformer(ckpt / "transformer").state_dict()
    diffs = {n: torch.randn(base[n].shape, generator=g) for n in (
        "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.1.self_attn.norm_q.weight",
        "blocks.0.modulation", "head.modulation", "patch_embedding.bias")}
    down = torch.randn(2, *base["patch_embedding.weight"].shape[1:], generator=g)      # (r, C, 1, 2, 2)
    up = torch.randn(base["patch_embedding.weight"].shape[0], 2, 1, 1, 1, generator=g)  # (D, r, 1, 1, 1)
    tensors = {"diffusion_model." + n.removesuffix(".weight").removesuffix(".bias")
               + (".diff_b" if n.endswith(".bias") else ".diff"): d for n, d in diffs.items()}
    tensors |= {"diffusion_model.patch_embedding.lora_down.weight": down,
                "diffusion_model.patch_embedding.lora_up.weight": up,
                "diffusion_model.patch_embedding.alpha": torch.tensor(3.0)}
    save_file(tensors, tmp_path / "deltas.safetensors")
    spec = LoraSpec(tmp_path / "deltas.safetensors", 0.5)
    model = load_transformer(ckpt / "transformer", loras=[spec])
    merged = model.state_dict()
    for n, d in diffs.items():
        torch.testing.assert_close(merged[n], base[n] + 0.5 * d, rtol=0, atol=1e-6)  # fp32 add: rounding
    x = torch.randn(1, *base["patch_embedding.weight"].shape[1:2], 3, 6, 10, generator=g)
    conv = torch.nn.functional.conv3d
    stride = tuple(base["patch_embedding.weight"].shape[2:])
    lora_out = conv(conv(x, down, stride=stride), up) * 0.5 * 3.0 / 2     # scale x alpha / rank
    torch.testing.assert_close(conv(x, merged["patch_embedding.weight"], stride=stride),
                               conv(x, base["patch_embedding.weight"], stride=stride) + lora_out,
                               rtol=1e-5, atol=1e-5)  # two fp32 convolutions against one
    bf16 = load_transformer(ckpt / "transformer", dtype=torch.bfloat16, loras=[spec]).state_dict()
    for n, d in diffs.items():
        assert torch.equal(bf16[n], (base[n].bfloat16().float() + 0.5 * d).bfloat16()), n


def test_every_expert_lora_is_the_same_as_naming_both(tmp_path):
    path = write_lora(tmp_path / "a.safetensors", TINY, "kohya", 11)
    both = Pipeline.from_pretrained("tiny", loras=[LoraSpec(path, 0.6)])
    each = Pipeline.from_pretrained("tiny", loras=[LoraSpec(path, 0.6, "high"), LoraSpec(path, 0.6, "low")])
    plain = Pipeline.from_pretrained("tiny")
    for k in range(2):
        a, b, c = (p.experts[k].state_dict() for p in (both, each, plain))
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert not torch.equal(a["blocks.0.ffn.0.weight"], c["blocks.0.ffn.0.weight"])
    assert set(both.startup) >= {"lora_check_s", "lora_merge_s"}


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """One file per way a LoRA can be wrong (for the tiny model), and a good one."""
    d = tmp_path_factory.mktemp("bad_loras")
    good, _ = random_lora(TINY, "kohya", 3)
    other = TINY.replace(dim=32, ffn_dim=48, num_heads=2)   # another model's shapes
    wrong, _ = random_lora(other, "kohya", 4)
    files = {"good": good, "wrong_shape": wrong,
             "not_a_lora": {"blocks.0.self_attn.q.weight": torch.zeros(24, 24)},
             "names_nothing": {k.replace("blocks.", "blocks.9"): v for k, v in good.items() if "head" not in k},
             "half_names": {k: v for k, v in good.items() if "blocks.0." in k}
             | {k.replace("blocks.1.", "blocks.7."): v for k, v in good.items() if "blocks.1." in k},
             "no_partner": {k: v for k, v in good.items() if "lora_up" not in k},
             "dora": good | {"diffusion_model.blocks.0.ffn.0.dora_scale": torch.ones(1, 24)},
             "bad_alpha": good | {"diffusion_model.blocks.0.ffn.0.alpha": torch.ones(2)}}
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, d / f"{name}.safetensors")
    (d / "text.safetensors").write_text("not a safetensors file")
    return d


# (file, what the message must say); each alone, the library's check
BAD_FILES = [
    ("missing", r"--lora .*missing.safetensors:1 \(target='all'\): no such file"),
    ("text", r"not a safetensors LoRA file"),
    ("not_a_lora", r"not a LoRA: none of its 1 tensors \(blocks.0.self_attn.q.weight\)"),
    ("wrong_shape", r"does not fit tiny: diffusion_model.blocks.0.cross_attn.k.lora_up.weight \(32, 3\) @ "
                    r"diffusion_model.blocks.0.cross_attn.k.lora_down.weight \(3, 32\) .* blocks.0.cross_attn.k.weight "
                    r"\(24, 24\).*diff_b has shape \(32,\), expected \(24,\).*and \d+ more"),
    ("names_nothing", r"changes nothing in tiny: .*blocks.90"),
    ("no_partner", r"diffusion_model.blocks.0.cross_attn.k.lora_down.weight has no up matrix beside it"),
    ("dora", r"cannot merge \(DoRA \(dora_scale\)\): diffusion_model.blocks.0.ffn.0.dora_scale"),
    ("bad_alpha", r"diffusion_model.blocks.0.ffn.0.alpha has shape \(2,\), expected one number"),
]


@pytest.mark.parametrize("name,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_lora_is_named(name, message, bad):
    with pytest.raises(LoraError, match=message):
        check_loras([LoraSpec(bad / f"{name}.safetensors")], TINY)


def test_bad_specs_and_flags(bad):
    with pytest.raises(LoraError, match=r"--lora-low .*good.safetensors:1 \(target='low'\): wan2.1-t2v-1.3b has "
                                        r"one expert.*--lora \(target='all'\)"):
        check_loras([LoraSpec(bad / "good.safetensors", target="low")], WanConfig.preset("wan2.1-t2v-1.3b"))
    with pytest.raises(LoraError, match=r"target='mid'.*all, high, low"):
        LoraSpec("x.safetensors", target="mid")
    for path in (None, "", 3):   # None was a TypeError from os.fspath, "" the current folder
        with pytest.raises(LoraError, match=rf"^LoraSpec\(path={path!r}\): give the \.safetensors file's path"):
            LoraSpec(path)
    with pytest.raises(LoraError, match=r"--lora-high 'x.safetensors:strong': write PATH or PATH:SCALE"):
        parse_lora("x.safetensors:strong", "high")
    with pytest.raises(LoraError, match=r"^--lora 'x.safetensors:nan': write PATH or PATH:SCALE with a finite "
                                        r"number SCALE"):   # it said "a number", which nan is
        parse_lora("x.safetensors:nan")
    colon = bad / "with:colon.safetensors"        # an existing file whose name has a colon is a path
    colon.write_bytes((bad / "good.safetensors").read_bytes())
    assert lora_specs(["a.safetensors:0.5"], None, [str(colon), "d.safetensors"]) == [
        LoraSpec("a.safetensors", 0.5), LoraSpec(str(colon), 1.0, "low"), LoraSpec("d.safetensors", 1.0, "low")]
    with pytest.raises(LoraError, match=r"pass expert='high' or 'low'"):
        load_transformer("unused", loras=[LoraSpec(bad / "good.safetensors", target="high")])  # before reading


def test_partial_match_warns_and_merges_the_rest(bad, caplog):
    pipe = Pipeline.from_pretrained("tiny", loras=[LoraSpec(bad / "half_names.safetensors")])
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "40 of its tensors (10 modules) name nothing in tiny and are skipped" in warning[0]
    assert "diffusion_model.blocks.7.self_attn.q," in warning[0]
    plain = Pipeline.from_pretrained("tiny")
    for k in range(2):
        a, b = pipe.experts[k].state_dict(), plain.experts[k].state_dict()
        assert not torch.equal(a["blocks.0.self_attn.q.weight"], b["blocks.0.self_attn.q.weight"])
        assert torch.equal(a["blocks.1.self_attn.q.weight"], b["blocks.1.self_attn.q.weight"])


def torchrun(args: list[str]):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "paradit.generate", "--no-progress", "--sp", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("model,flags,messages", [
    ("tiny", [f"--lora={{d}}/{name}.safetensors" for name, _ in BAD_FILES] + ["--lora-high={d}/good.safetensors"],
     [m for _, m in BAD_FILES]),
    ("wan2.1-t2v-1.3b", ["--lora-low", "{d}/good.safetensors"], [r"wan2.1-t2v-1.3b has one expert"]),
], ids=["every-bad-file", "low-on-one-expert"])
def test_bad_loras_under_torchrun(model, flags, messages, bad, tmp_path):
    """Every bad LoRA is named on every rank in one message (the CLI checks them all before it
    builds anything), the good one is not; nothing is written."""
    out = tmp_path / "video.mp4"
    proc = torchrun(["--model", model, "--out", str(out)] + [f.format(d=bad) for f in flags])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("paradit: error")]
    assert {line.split(")")[0] for line in errors} == {"paradit: error (rank 0", "paradit: error (rank 1"}, proc.stderr[-3000:]
    for line in errors:
        assert all(re.search(m, line) for m in messages), line
        assert len(messages) == 1 or f"{len(messages)} LoRAs cannot be used" in line  # not the good one
    assert list(tmp_path.iterdir()) == []


def test_cli_flags_reach_the_weights(bad, tmp_path):
    from safetensors.torch import load_file

    from paradit.generate import main

    out = tmp_path / "video.mp4"
    lora = bad / "good.safetensors"
    assert main(["--model", "tiny", "--prompt", PROMPT, "--lora", f"{lora}:0.5", "--lora-low", str(lora), "--steps", "2", "--shift", "5",
                 "--seed", "3", "--out", str(out), "--save-latents", "--no-progress"]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["loras"] == [dict(path=str(lora), scale=0.5, target="all"), dict(path=str(lora), scale=1.0, target="low")]
    assert set(side["timings_s"]["startup"]) >= {"lora_check_s", "lora_merge_s"}
    pipe = Pipeline.from_pretrained("tiny", loras=[LoraSpec(lora, 0.5), LoraSpec(lora, 1.0, "low")])
    latent = pipe(PROMPT, negative_prompt=None, steps=2, shift=5.0, seed=3, output="latent", progress=False)
    assert torch.equal(load_file(out.with_suffix(".latent.safetensors"))["latent"], latent)


def test_distill_bench_writes_loras_of_the_presets_shapes(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import lora_distill

    assert lora_distill.main(["--preset", "tiny", "--rank", "4", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "loras.json").read_text())
    files = check_loras([LoraSpec(tmp_path / "high_noise.safetensors", 1.0, "high"),
                         LoraSpec(tmp_path / "low_noise.safetensors", 1.0, "low")], TINY)
    for lf in files:   # every attention and FFN linear (weight and bias) of every block, nothing skipped
        assert {p.param for p in lf.patches} == {f"{m}.{w}" for m in linears(TINY) for w in ("weight", "bias")}
        assert not lf.skipped and {p.rank for p in lf.patches if p.param.endswith(".weight")} == {4}
    assert info["rank"] == 4 and set(info["files"]) == {"high_noise", "low_noise"}


# ----------------------------------------------------------------------------- values that wreck the video
@pytest.fixture(scope="module")
def wrecking(tmp_path_factory):
    """LoRAs whose merge would give NaN or overflowing weights (an all-black video): NaN in one up
    matrix, an infinite alpha, and a good file for a strength of 1e30."""
    d = tmp_path_factory.mktemp("wrecking")
    good, _ = random_lora(TINY, "kohya", 5)
    nan = dict(good)
    nan["diffusion_model.blocks.1.ffn.2.lora_up.weight"] = good["diffusion_model.blocks.1.ffn.2.lora_up.weight"].clone()
    nan["diffusion_model.blocks.1.ffn.2.lora_up.weight"][2, 1] = float("nan")
    inf = good | {"diffusion_model.blocks.0.self_attn.v.alpha": torch.tensor(float("inf"))}
    key = "diffusion_model.blocks.1.self_attn.q.lora_up.weight"
    huge = good | {key: good[key] * 1e6}                     # finite, but its merge overflows fp16
    for name, tensors in {"good": good, "nan": nan, "inf_alpha": inf, "huge": huge}.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, d / f"{name}.safetensors")
    return d


@pytest.mark.parametrize("name,scale,message", [
    ("nan", 1.0, r"nan.safetensors:1 .*its tensor diffusion_model.blocks.1.ffn.2.lora_up.weight holds NaN"),
    ("inf_alpha", 1.0, r"inf_alpha.safetensors:1 .*strength x alpha / rank = inf for "
                       r"diffusion_model.blocks.0.self_attn.v.lora_up.weight .*is not finite"),
    ("good", 1e30, r"good.safetensors:1e\+30 .*strength x alpha / rank = \S+e\+(29|30) for "
                     r"diffusion_model.blocks.\d.\S+ .*beyond any useful strength"),
], ids=["nan-weights", "inf-alpha", "strength-1e30"])
def test_merges_that_would_wreck_the_video_are_refused(name, scale, message, wrecking, ckpt):
    """Refused at the merge, naming the file and the tensor: built in memory (tiny) and read from a
    checkpoint (the reader merges as it reads)."""
    spec = LoraSpec(wrecking / f"{name}.safetensors", scale)
    with pytest.raises(LoraError, match=message):
        Pipeline.from_pretrained("tiny", loras=[spec])
    with pytest.raises(LoraError, match=message):
        load_transformer(ckpt / "transformer", loras=[spec])


def test_a_merge_that_overflows_its_dtype_is_refused(wrecking, ckpt):
    """Finite LoRA tensors and strength whose merged weight overflows fp16 (max 65504): the check of
    each merged tensor."""
    spec = LoraSpec(wrecking / "huge.safetensors")
    with pytest.raises(LoraError, match=r"merging .*huge.safetensors \(diffusion_model.blocks.1.self_attn.q.lora_up"
                                        r".weight\) into blocks.1.self_attn.q.weight gives values that are not "
                                        r"finite in torch.float16"):
        load_transformer(ckpt / "transformer", dtype=torch.float16, loras=[spec])


def test_cli_refuses_a_nan_lora_and_writes_nothing(wrecking, tmp_path):
    """Issue 28's all-black video: the CLI exits 2 naming the file and the tensor, no mp4 written."""
    out = tmp_path / "video.mp4"
    run = subprocess.run([sys.executable, "-m", "paradit.generate", "--model", "tiny", "--prompt", PROMPT, "--lora",
                          str(wrecking / "nan.safetensors"), "--steps", "2", "--out", str(out), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "nan.safetensors" in run.stderr and "diffusion_model.blocks.1.ffn.2.lora_up.weight holds NaN" in run.stderr
    assert list(tmp_path.iterdir()) == []

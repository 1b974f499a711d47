"""Image conditioning (I2V-A14B, TI2V-5B), the text encoder's convention, the tiled and spread VAE
decode, and regional compile: each against the reference behaviour it reproduces."""
import json
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ckpt_workers import (PROMPT, RUN, SIZE, SPREAD_CASES, TILE, TINY_I2V, TINY_T2V, TINY_TI2V, components,
                          conditioned, conditioning_ranks, sample_image)
from paradit import conditioning
from paradit.launch import spawn
from paradit.models.transformer import patchify
from paradit.models.vae import VideoVAE, tiled_decode
from paradit.pipeline import Pipeline

# 4 ranks (ulysses 2 x cfg 2) against 1: fp32, another summation order; rounding near 1e-7 relative.
RTOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- VAE decode
@pytest.mark.parametrize("z,hw", SPREAD_CASES)
def test_tiled_decode_is_diffusers_tiled_decode(z, hw):
    vae = VideoVAE.tiny(z, tile=TILE[z])                           # a ragged last row and column of tiles
    latent = torch.randn(1, z, 2, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tiled_decode(vae.vae, latent), vae.vae.decode(latent, return_dict=False)[0])


# ----------------------------------------------------------------------------- the condition
def test_i2v_mask_is_the_originals():
    frames, h, w = 17, 3, 5
    msk = torch.ones(1, frames, h, w)                              # wan/image2video.py, step by step
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, h, w).transpose(1, 2)[0]
    mine = conditioning.i2v_mask(frames, (h, w))
    assert torch.equal(mine, msk) and mine.shape == (4, 5, h, w)
    assert mine[:, 0].eq(1).all() and mine[:, 1:].eq(0).all()      # 1 exactly on latent frame 0


@pytest.mark.parametrize("cfg", [TINY_I2V, TINY_TI2V], ids=["i2v", "ti2v"])
def test_condition_is_diffusers_prepare_latents(cfg):
    from diffusers import WanImageToVideoPipeline

    size = SIZE[cfg.task]
    vae = VideoVAE.tiny(cfg.z_dim)                                 # diffusers' default tiles: one tile here
    pixels = conditioning.image_pixels(sample_image(), size["width"], size["height"], cfg.task)
    mine = conditioning.condition_from_pixels(cfg, vae, pixels, 9)
    ti2v = cfg.task == "ti2v"
    fake = SimpleNamespace(vae=vae.vae, vae_scale_factor_temporal=4, vae_scale_factor_spatial=cfg.vae_stride[1],
                           config=SimpleNamespace(expand_timesteps=ti2v))
    out = WanImageToVideoPipeline.prepare_latents(fake, pixels[None], 1, cfg.z_dim, size["height"], size["width"],
                                                  9, torch.float32, "cpu", torch.Generator().manual_seed(0))
    # the same encoder on the same pixels; normalised as (z - mean) * (1 / std) there, (z - mean) / std here
    torch.testing.assert_close(mine, out[1][0], rtol=1e-6, atol=1e-6)
    assert mine.shape == conditioning.condition_shape(cfg, size["width"], size["height"], 9)
    if ti2v:  # diffusers' per-token timesteps: the first-frame mask at patch stride, times t
        c = conditioning.shard_condition(cfg, mine, cfg.latent_shape(size["width"], size["height"], 9), 0, 18, "cpu")
        t = torch.tensor(937.0)
        assert torch.equal(conditioning.timesteps(t, c), (out[2][0][0][:, ::2, ::2] * t).flatten())


def test_model_input_is_patchify_of_the_channel_concat():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 16, 3, 6, 10, generator=g), torch.randn(1, 20, 3, 6, 10, generator=g)
    p = (1, 2, 2)
    c = conditioning.Condition(y=patchify(y, p)[0], patch_numel=4)
    assert torch.equal(conditioning.model_input(patchify(x, p)[0], c), patchify(torch.cat([x, y], 1), p)[0])


def test_ti2v_first_frame_tokens():
    shape = TINY_TI2V.latent_shape(96, 64, 9)                      # (48, 3, 4, 6): 6 tokens a frame
    z = torch.randn(48, 1, *shape[2:], generator=torch.Generator().manual_seed(0))
    c = conditioning.shard_condition(TINY_TI2V, z, shape, 4, 14, "cpu")  # a shard across frames 0 and 1
    assert c.keep.tolist() == [False, False] + [True] * 8
    x = torch.randn(10, 4 * 48)
    after = conditioning.after_step(x, c)
    frame0 = patchify(torch.cat([z, z.new_zeros(48, 2, 4, 6)], 1)[None], (1, 2, 2))[0][4:6]
    assert torch.equal(after[:2], frame0) and torch.equal(after[2:], x[2:])


def test_output_size_for_an_image():
    a14b, ti2v = TINY_I2V.replace(size=(1280, 720)), TINY_TI2V.replace(size=(1280, 704))
    assert conditioning.size_for_image(a14b, 1920, 1080) == (1280, 720)
    assert conditioning.size_for_image(a14b, 1080, 1920) == (720, 1280)
    for iw, ih in ((1920, 1080), (1000, 1000), (640, 1136)):
        w, h = conditioning.size_for_image(ti2v, iw, ih)
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 1280 * 704
        assert abs(math.log((w / h) / (iw / ih))) < 0.1
    img = conditioning.image_pixels(sample_image(100, 70), 96, 64, "ti2v")
    assert img.shape == (3, 64, 96) and -1 <= img.min() and img.max() <= 1


def test_image_flag_checks():
    with pytest.raises(ValueError, match="text-to-video"):
        conditioning.check_task(TINY_T2V, "x.png")
    with pytest.raises(ValueError, match=r"^image=None: .*image-to-video model"):
        conditioning.check_task(TINY_I2V, None)
    conditioning.check_task(TINY_TI2V, None)                       # TI2V-5B without an image: text-to-video
    with pytest.raises(ValueError, match="no such file"):
        conditioning.load_image("/nonexistent.png")


# ----------------------------------------------------------------------------- text encoder
def test_text_encoder_follows_the_original():
    from paradit.models.text_encoder import TextEncoder
    from paradit.prompts import clean_prompt

    assert clean_prompt("  a  red &amp;amp; blue\n circle ") == "a red & blue circle"
    enc = TextEncoder.tiny(32, 16)
    prompts = ["a red circle moving left", "  a   blue square &amp; a ring ", "red " * 30]  # the last truncated
    ids = enc.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=16, truncation=True,
                        add_special_tokens=True, return_tensors="pt")
    seq_lens = ids.attention_mask.gt(0).sum(dim=1)                 # wan/modules/t5.py: run, trim, zero-pad
    with torch.no_grad():
        ctx = enc.model(ids.input_ids, ids.attention_mask).last_hidden_state
    ref = torch.stack([torch.cat([u[:v], u.new_zeros(16 - v, u.shape[1])]) for u, v in zip(ctx, seq_lens)])
    assert torch.equal(enc.encode(prompts), ref)
    assert seq_lens.tolist()[2] == 16 and ids.input_ids[2, -1].item() == enc.tokenizer.eos_token_id


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def single():
    return {"i2v": conditioned("i2v", None, video=True), "ti2v": conditioned("ti2v", None)}


def test_single_process(single):
    (i2v, video), (ti2v, _) = single["i2v"], single["ti2v"]
    assert i2v.shape == (16, 3, 6, 10) and ti2v.shape == (48, 3, 4, 6) and video.shape == (9, 48, 80, 3)
    z = conditioning.encode_condition(TINY_TI2V, components(TINY_TI2V)[2], sample_image(), 96, 64, 9)
    assert torch.equal(ti2v[:, :1], z)                             # frame 0 is the image latent, exactly
    assert ti2v[:, 1:].abs().mean() > 1e-2
    other, _ = conditioned("i2v", None, image=sample_image().transpose(0))  # the image mirrored
    assert rel_err(other, i2v) > 1e-3                             # the image conditions the video


@pytest.fixture(scope="module")
def four_ranks():
    return spawn(conditioning_ranks, 4, dict(ulysses=2, cfg=2), timeout_s=280)


def test_four_ranks_match_one(four_ranks, single):
    for rank, out in enumerate(four_ranks):
        for kind in ("i2v", "ti2v"):
            assert rel_err(out[kind][0], single[kind][0]) < RTOL, f"rank {rank}: {kind}"
    # uint8 of latents equal to 1e-6 (decoded in tiles spread over ranks 0, 1): one level at most
    assert (four_ranks[0]["i2v"][1].int() - single["i2v"][1].int()).abs().max() <= 1
    assert all(out["i2v"][1] is None for out in four_ranks[1:])


def test_spread_decode_equals_tiled_decode(four_ranks):
    for z in (16, 48):
        res = four_ranks[0]["spread"][z]
        assert torch.equal(res["spread"], res["ref"]), f"z_dim {z}: spread decode differs"
        assert torch.equal(res["given"], res["given_ref"]), f"z_dim {z}: spread decode in given tiles differs"
        assert res["frames"].shape[0] == 5 and res["frames"].dtype == torch.uint8
    assert all(r["spread"] is None and r["frames"] is None and r["given"] is None
               for out in four_ranks[1:] for z, r in out["spread"].items() if z != "planned")
    planned = four_ranks[0]["spread"]["planned"]                   # tiles cut for the 4 ranks
    assert planned["tiles"] is not None and all(out["spread"]["planned"]["tiles"] == planned["tiles"]
                                                for out in four_ranks)
    assert torch.equal(planned["frames"], planned["ref"])
    assert all(out["spread"]["planned"]["frames"] is None for out in four_ranks[1:])


# ----------------------------------------------------------------------------- compile
def test_regional_compile_and_warmup():
    """Blocks compiled one by one; the warm-up (one step per expert, across the boundary) builds
    every graph, so the run itself compiles nothing and computes what eager mode computes."""
    from torch._dynamo.utils import counters

    from paradit.compile import compile_blocks

    cfg, kw = TINY_I2V, dict(RUN, steps=2, **SIZE["i2v"])        # t = 999 (high expert), 833 (low)
    eager = Pipeline(cfg, *components(cfg))
    ref = eager(PROMPT, image=sample_image(), output="latent", **kw)
    assert [k for _, k, _ in eager.record.trace] == [0, 1]
    compiled = Pipeline(cfg, *components(cfg))
    torch._dynamo.reset()
    assert compile_blocks(compiled.experts) == cfg.num_experts * cfg.num_layers
    compiled.warmup(**kw)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and compiled.startup["compile_s"] > 0
    out = compiled(PROMPT, image=sample_image(), output="latent", **kw)
    assert counters["stats"]["unique_graphs"] == graphs         # nothing compiled inside the run
    # inductor fuses the fp32 elementwise work differently: rounding-level differences only
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_generate_cli_image_to_video(tmp_path):
    from ckpt_workers import write_checkpoint
    from paradit.generate import main

    root = write_checkpoint(tmp_path / "i2v", TINY_I2V)
    sample_image().save(tmp_path / "first.png")
    out = tmp_path / "video.mp4"
    assert main(["--model", str(root), "--image", str(tmp_path / "first.png"), "--size", "80x48", "--frames", "9",
                 "--steps", "2", "--compile", "--out", str(out), "--no-progress"]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["preset"] == "wan2.2-i2v-a14b" and side["image"].endswith("first.png")
    assert side["timings_s"]["startup"]["compile_s"] > 0 and out.stat().st_size > 0
    assert [e["expert"] for e in side["experts_per_step"]] == ["high", "low"]


@pytest.mark.parametrize("image", ["missing.png", "not_an_image.png"])
def test_a_bad_image_is_refused_before_any_weight_loads(tmp_path, image):
    """With --size given too, the image is still opened and checked up front (it was found only after
    every weight had loaded): exit 2, one line naming --image, no start-up, nothing written."""
    from ckpt_workers import write_checkpoint

    root = write_checkpoint(tmp_path / "i2v", TINY_I2V)
    (tmp_path / "not_an_image.png").write_text("plain text")
    out = tmp_path / "out" / "video.mp4"
    res = subprocess.run([sys.executable, "-m", "paradit.generate", "--model", str(root), "--image",
                          str(tmp_path / image), "--size", "80x48", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert re.search(r"paradit: error \(rank 0\): --image .*(no such file|not a readable image)", res.stderr)
    assert "Traceback" not in res.stderr and "start-up:" not in res.stderr   # no weight was read
    assert not out.parent.exists() or not any(out.parent.iterdir())

"""scripts/train_demo.py: demo64's codec and budget, and its recipe learning at reduced scale on a CPU
(the real run is on a GPU: docs/demo-model.md)."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from paradit.config import WanConfig
from paradit.demo.codec import TimeToDepthCodec
from paradit.demo.data import DEMO64, SPEEDS, Recipe, make_batch
from paradit.demo.judge import judge

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def train_demo():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPTS / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo64_codec_is_lossless_and_matches_the_preset():
    cfg = WanConfig.preset("demo64")
    videos, _ = make_batch(2, torch.Generator().manual_seed(0), DEMO64)
    assert videos.shape[1:4] == (cfg.frames, *cfg.size)
    codec = TimeToDepthCodec.for_config(cfg)
    z = codec.encode(videos)
    assert z.shape[1:] == cfg.latent_shape(*cfg.size, cfg.frames) == (96, 5, 32, 32)
    assert torch.equal(codec.decode(z), videos)
    # channel (frame 3, block row 1, column 0, blue) of latent pixel (7, 11) is pixel (15, 22) of frame 3
    ch = ((3 * 2 + 1) * 2 + 0) * 3 + 2
    value = z[0, ch, 0, 7, 11] * codec.std[ch, 0, 0, 0] + codec.mean[ch, 0, 0, 0]
    assert float(value) == pytest.approx(float(videos[0, 3, 15, 22, 2]) / 127.5 - 1, abs=1e-6)


def test_demo64_weights_fit_the_package_budget():
    from paradit.models.transformer import WanTransformer
    with torch.device("meta"):
        params = sum(p.numel() for p in WanTransformer(WanConfig.preset("demo64")).parameters())
    assert 2 * 4 * params < 30e6                               # two fp32 experts under ~30 MB


def test_minutes_sets_the_iterations_from_the_step_time(train_demo):
    args = train_demo.parse_args(["--preset", "demo64", "--minutes", "8"])
    train_demo.plan_budget(args, step_s=0.05, spent_s=10.0, log=lambda *a: None)
    steps = args.shared + 2 * args.iters                       # an expert iteration is two steps
    assert steps * 0.05 == pytest.approx(480 - 10 + 50 * 0.05, rel=0.01)
    assert args.shared == pytest.approx(3 * args.iters, rel=0.01)
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--minutes", "1"])               # shorter than the timing probe
    # --init: the experts train on from given weights; the whole budget goes to them
    args = train_demo.parse_args(["--preset", "demo64", "--minutes", "8", "--init", "paradit/assets/demo64"])
    train_demo.plan_budget(args, step_s=0.05, spent_s=10.0, log=lambda *a: None)
    assert args.shared == 0 and 2 * args.iters * 0.05 == pytest.approx(480 - 10 + 50 * 0.05, rel=0.01)
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--bf16"])                       # autocast is for CUDA only


def test_recipe_learns_at_reduced_scale(train_demo):
    """demo64's recipe (data with speed words and held-out prompts, the 2x2 spatial fold, two experts
    from one model) at 24x24 pixels, 9 frames, dim 64, 420 steps of 16 clips on one CPU thread: the
    loss falls, and the held-out prompts come out in their colour at least twice as often as chance
    (1 in 6; measured: 11 of 24)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dataclasses.replace(WanConfig.preset("demo64"), name="demo64-small", dim=64, ffn_dim=128, num_heads=1,
                                  num_layers=2, frames=9, size=(24, 24), steps=10)
        recipe = Recipe(frames=9, size=24, half=(3.0, 4.0), speeds=SPEEDS, held_out=24)
        args = train_demo.parse_args(["--preset", "demo64", "--shared", "300", "--iters", "60", "--batch", "16",
                                      "--warmup", "20", "--lr", "2e-3"])
        experts, text, codec, losses, *_ = train_demo.train(cfg, args, log=lambda *a: None, recipe=recipe)
        first = sum(losses["shared"][:20]) / 20
        assert all(sum(losses[k][-20:]) / 20 < 0.8 * first for k in ("high", "low")), losses
        pipe = train_demo.sampler(cfg, experts, text, codec, "cpu")
        # the raw decode: this dim-64 head writes 64 of a token's 384 latent values, too few for the
        # shipped model's projection onto them (paradit/demo/writable.py: it drops what demo64's
        # 192 cannot write, 3% of its clips) to keep what a model this small draws (6 colours of 24)
        pipe.vae.writable = None
        prompts = [recipe.prompt(c) for c in recipe.held_out_combos()]
        verdicts = [judge(pipe(p, seed=i, progress=False), p) for i, p in enumerate(prompts)]
        assert sum(v.colour for v in verdicts) >= 2 * len(prompts) / 6, verdicts
    finally:
        torch.set_num_threads(threads)


def test_ema_is_what_init_training_saves(train_demo, tmp_path):
    """--init with --ema: the experts train on from the shipped demo weights w0, and what is saved is
    d^3 w0 + d^2 (1 - d) w1 + d (1 - d) w2 + (1 - d) w3 over the raw weights w1..w3 after each step
    (taken from runs of 1, 2 and 3 iterations: with the warmup longer than the run, a step's
    learning rate does not depend on the run's length), not the raw w3."""
    from safetensors.torch import load_file
    cfg, init = WanConfig.preset("demo"), Path(__file__).resolve().parents[1] / "paradit" / "assets" / "demo"
    flags = ["--preset", "demo", "--init", str(init), "--batch", "2", "--warmup", "100", "--lr", "0.1"]

    def run(iters: int, *extra: str):
        args = train_demo.parse_args(flags + ["--iters", str(iters), *extra])
        return train_demo.train(cfg, args, log=lambda *a: None)

    raw = [[load_file(init / f"{name}.safetensors") for name in ("high", "low")]]
    raw += [[m.state_dict() for m in run(iters)[0]] for iters in (1, 2, 3)]
    experts, text, _, losses, *_ = run(3, "--ema", "0.6")
    train_demo.save(tmp_path, experts, text, {}, losses)
    weights = (0.6**3, 0.6**2 * 0.4, 0.6 * 0.4, 0.4)                # d = 0.6
    for k, name in enumerate(("high", "low")):
        saved = load_file(tmp_path / f"{name}.safetensors")
        assert saved.keys() == raw[0][k].keys()
        for key, value in saved.items():
            hand = sum(c * w[k][key].double() for c, w in zip(weights, raw))
            assert torch.allclose(value.double(), hand, atol=1e-6), (name, key)
        moved = max((saved[key] - raw[3][k][key]).abs().max().item() for key in saved)
        assert moved > 1e-4, (name, moved)                     # the average, not the last weights
    out, threads = tmp_path / "cli", torch.get_num_threads()   # the script keeps the raw weights in OUT/raw
    try:
        train_demo.main(flags + ["--iters", "3", "--ema", "0.6", "--out", str(out), "--docs", ""])
    finally:                                                    # main sets one thread, deterministic kernels
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    for k, name in enumerate(("high", "low")):                  # (one thread here: other bits, same weights)
        kept, averaged = load_file(out / "raw" / f"{name}.safetensors"), load_file(out / f"{name}.safetensors")
        assert all(torch.allclose(kept[key], raw[3][k][key], atol=1e-6) for key in kept)
        ours = load_file(tmp_path / f"{name}.safetensors")
        assert all(torch.allclose(averaged[key], ours[key], atol=1e-6) for key in kept)
    with pytest.raises(SystemExit):
        train_demo.parse_args(["--ema", "1"])                   # a decay of 1 would never move

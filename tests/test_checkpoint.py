"""Real checkpoint folders, built locally: the diffusers layout and the original layout load into
the same pipeline as the in-memory one, under 1 and 4 processes; each rank reads only what it needs;
broken or mismatched checkpoints fail naming the file and the tensor."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_workers import (NEGATIVE, PROMPT, RUN, SIZE, TINY_T2V, checkpoint_ranks, components, read_once_ranks,
                          small_tiles, write_checkpoint)
from paradit.checkpoint import model_config, to_diffusers_name
from paradit.demo.judge import rel_err
from paradit.launch import spawn
from paradit.models.loading import CheckpointError, to_original_name
from paradit.pipeline import Pipeline

# 4 ranks (ulysses 2 x cfg 2) against 1: fp32 with another summation order (split softmax, uneven
# shards); rounding stays near 1e-7 relative, 1e-5 leaves two orders of margin (a bug is > 1e-2).
RTOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny_t2v"))


@pytest.fixture(scope="module")
def reference():
    """The in-memory tiny pipeline built from the same seeded weights: latent, and video in small tiles."""
    pipe = Pipeline(TINY_T2V, *components(TINY_T2V))
    latent = pipe(PROMPT, output="latent", **SIZE["t2v"], **RUN)
    small_tiles(pipe.vae)
    return latent, pipe.decode(latent)


def test_written_layout_is_what_diffusers_reads(ckpt):
    from diffusers import WanTransformer3DModel

    # (from_pretrained itself needs accelerate here; a strict load of every shard checks the same)
    model = WanTransformer3DModel.from_config(json.loads((ckpt / "transformer" / "config.json").read_text()))
    shards = sorted((ckpt / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    model.load_state_dict({k: v for f in shards for k, v in load_file(f).items()}, strict=True)
    model.eval()
    ours = Pipeline(TINY_T2V, *components(TINY_T2V)).experts[0]
    x = torch.randn(1, 16, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    t, ctx = torch.tensor([700.0]), torch.randn(1, 7, TINY_T2V.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, t, ctx, return_dict=False)[0]
        # fp32, the same math with another operation order (RoPE, fused norms): rounding only
        torch.testing.assert_close(ours(x, t, ctx), ref, rtol=1e-4, atol=1e-5)
    for name in ours.state_dict():
        assert to_original_name(to_diffusers_name(name)) == name


def test_kind_and_defaults_from_the_configs(ckpt):
    cfg = model_config(ckpt)
    assert (cfg.name, cfg.task, cfg.boundary, cfg.z_dim, cfg.vae_stride) == ("wan2.2-t2v-a14b", "t2v", 0.875, 16,
                                                                            (4, 8, 8))
    assert (cfg.steps, cfg.shift, cfg.guidance, cfg.fps) == (40, 12.0, (4.0, 3.0), 16)  # the preset's
    assert cfg.negative_prompt.startswith("色调艳丽")                                    # the original's default
    arch = ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "text_dim", "text_len")
    assert all(getattr(cfg, k) == getattr(TINY_T2V, k) for k in arch)
    orig = model_config(ckpt / "original", components=ckpt)
    assert all(getattr(orig, k) == getattr(cfg, k) for k in arch + ("name", "boundary"))
    with pytest.raises(CheckpointError, match="--components"):
        model_config(ckpt / "original")


def test_both_layouts_give_the_in_memory_pipeline(ckpt, reference):
    latent, video = reference
    a = Pipeline.from_pretrained(str(ckpt))
    assert set(a.startup) >= {"config_s", "weights_s", "text_encoder_s", "vae_s", "load_s"}
    # the text encoder's first call made at start-up: the default negative prompt, encoded and cached
    assert a.startup["text_encoder_warmup_s"] > 0 and list(a.text_encoder.cache) == [a.cfg.negative_prompt]
    assert torch.equal(a(PROMPT, output="latent", **SIZE["t2v"], **RUN), latent)  # same weights, same math
    b = Pipeline.from_pretrained(str(ckpt / "original"), components=str(ckpt))
    assert torch.equal(b(PROMPT, output="latent", **SIZE["t2v"], **RUN), latent)
    assert latent.abs().mean() > 1e-2 and video.shape == (9, 48, 80, 3)


@pytest.fixture(scope="module")
def four_ranks(ckpt):
    return spawn(checkpoint_ranks, 4, str(ckpt), dict(ulysses=2, cfg=2), timeout_s=280)


def test_four_ranks_give_the_in_memory_pipeline(four_ranks, reference):
    latent, video = reference
    for rank, out in enumerate(four_ranks):
        for layout in ("diffusers", "original"):
            assert rel_err(out[layout], latent) < RTOL, f"rank {rank}, {layout} layout"
    assert four_ranks[0]["video"].shape == video.shape  # decoded in tiles spread over ranks 0 and 1
    # uint8 of latents equal to 1e-6: a pixel may round the other way, by one level at most
    assert (four_ranks[0]["video"].int() - video.int()).abs().max() <= 1
    assert all(out["video"] is None for out in four_ranks[1:])


def test_each_rank_reads_only_what_it_needs(four_ranks, ckpt):
    folder_bytes = {}
    for name in ("transformer", "transformer_2"):
        tensors = {}
        for f in (ckpt / name).glob("*.safetensors"):
            tensors.update(load_file(f))
        folder_bytes[name] = (sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors))
    for rank, out in enumerate(four_ranks):
        mine = ("transformer", "transformer_2")[out["needed"]]
        experts = {k for k in out["stats"] if k.startswith("transformer")}
        assert experts == {mine}, f"rank {rank} read {experts}"
        assert (out["stats"][mine]["bytes"], len(out["stats"][mine]["names"])) == folder_bytes[mine]
        assert out["loaded"] == [out["needed"] == 0, out["needed"] == 1]
        # the text encoder only where prompts are encoded (rank 0); the VAE there and on the decode
        # group (the sp group of cfg rank 0: ranks 0 and 1)
        assert ("text_encoder" in out["stats"]) == (rank == 0)
        assert ("vae" in out["stats"]) == (rank in (0, 1))
        assert out["has"] == dict(text_encoder=rank == 0, vae=rank in (0, 1))
        assert set(out["startup"]) >= {"config_s", "weights_s", "load_s"}


def expert_bytes(ckpt) -> dict[str, int]:
    return {name: sum(t.numel() * t.element_size() for f in (ckpt / name).glob("*.safetensors")
                      for t in load_file(f).values()) for name in ("transformer", "transformer_2")}


def test_read_once_per_node(ckpt):
    """4 gloo ranks of one node: each expert's files are read once between the ranks that load it
    (a share each, balanced by bytes; the tiny model's largest tensor is ~6% of an expert), and every
    rank ends with the plain load's weights."""
    total = expert_bytes(ckpt)
    results = spawn(read_once_ranks, 4, str(ckpt), timeout_s=280)
    for rank, out in enumerate(results):
        for case in ("all", "split"):
            assert out[case]["same"] and all(out[case]["same"]), f"rank {rank}, {case}"
        assert out["all"]["loaded"] == [True, True] and out["split"]["loaded"] == [rank % 2 == 0, rank % 2 == 1]
    for name, size in total.items():
        # every rank loads both experts: a quarter each
        got = [out["all"]["stats"][name] for out in results]
        assert sum(read for read, _ in got) == size                          # the node read each byte once
        assert all(read + received == size and 0.15 * size < read < 0.35 * size for read, received in got)
        # one expert per rank (ranks 0, 2 the high-noise one, 1, 3 the low-noise one): a half each
        got = [out["split"]["stats"][name] for out in results if name in out["split"]["stats"]]
        assert len(got) == 2 and sum(read for read, _ in got) == size
        assert all(read + received == size and 0.4 * size < read < 0.6 * size for read, received in got)


# ----------------------------------------------------------------------------- broken checkpoints
@pytest.fixture
def broken(ckpt, tmp_path):
    """A private copy to break."""
    return shutil.copytree(ckpt, tmp_path / "ckpt")


def test_missing_shard_names_file_and_tensors(broken):
    shard = sorted((broken / "transformer_2").glob("*-of-*.safetensors"))[1]
    lost = set(load_file(shard))
    shard.unlink()
    with pytest.raises(CheckpointError, match="incomplete") as err:
        Pipeline.from_pretrained(str(broken))
    message = str(err.value)
    assert str(shard) in message and any(f"{name}" in message for name in lost), message


def test_wrong_shape_names_file_and_tensor(broken):
    name = "blocks.1.attn1.to_q.weight"
    shard = next(f for f in (broken / "transformer").glob("*-of-*.safetensors") if name in load_file(f))
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=rf"'{name}'.*in {shard}.*has shape"):
        Pipeline.from_pretrained(str(broken))


def test_truncated_shard_names_file(broken):
    shard = sorted((broken / "transformer").glob("*-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"cannot read {shard}"):
        Pipeline.from_pretrained(str(broken))


def test_image_for_a_text_to_video_checkpoint(ckpt, tmp_path):
    from ckpt_workers import sample_image
    from paradit.cli.spec import parse_args, resolve
    from paradit.launch import init_distributed

    sample_image().save(tmp_path / "image.png")
    args = parse_args(["--model", str(ckpt), "--image", str(tmp_path / "image.png"), "--out", str(tmp_path / "v.mp4")])
    with pytest.raises(ValueError, match=r"text-to-video.*transformer/config.json: in_channels 16"):
        resolve(args, init_distributed())  # refused while validating, before any weight is read
    pipe = Pipeline(TINY_T2V, *components(TINY_T2V))
    with pytest.raises(ValueError, match="text-to-video"):
        pipe(PROMPT, image=tmp_path / "image.png", **RUN)


def _edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("parts,changes,message", [
    (["vae"], dict(z_dim=48), r"TI2V-5B needs .*transformer/config.json has in_channels 16 \(input dim of "
                            r"patch_embedding.weight\).*vae/config.json has z_dim 48"),
    (["text_encoder"], dict(d_model=64), r"text_encoder/config.json has d_model 64.*text_embedding.0.weight"),
    (["transformer_2"], dict(num_layers=3), r"experts disagree.*transformer_2/config.json.*num_layers"),
    (["transformer", "transformer_2"], dict(in_channels=20), r"in_channels 20 \(input dim of patch_embedding.weight\)"),
])
def test_mismatched_configs(broken, parts, changes, message):
    for part in parts:
        _edit_json(broken / part / "config.json", **changes)
    with pytest.raises(CheckpointError, match=message):
        Pipeline.from_pretrained(str(broken))


def test_missing_low_noise_expert(broken):
    shutil.rmtree(broken / "transformer_2")
    with pytest.raises(CheckpointError, match=r"lists transformer_2.*does not exist"):
        model_config(broken)


def test_generate_cli_on_a_checkpoint(ckpt, tmp_path):
    from paradit.generate import main

    out = tmp_path / "video.mp4"
    assert main(["--model", str(ckpt), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--size", "80x48",
                 "--frames", "9", "--steps", "2", "--out", str(out), "--save-latents", "--no-progress"]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 0 and out.with_suffix(".latent.safetensors").exists()
    assert set(side["timings_s"]["startup"]) >= {"imports_s", "validate_s", "pipeline_import_s", "config_s",
                                                 "weights_s", "text_encoder_s", "text_encoder_warmup_s", "vae_s",
                                                 "build_s", "first_step_s"}
    assert side["preset"] == "wan2.2-t2v-a14b"

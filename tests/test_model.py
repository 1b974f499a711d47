"""The Wan DiT and its checkpoint loading.

Parity with diffusers' WanTransformer3DModel on tiny random configurations, through every checkpoint
layout paradit reads; load errors that name the problem; patchify / patch embedding / timestep
properties; meta-device loading.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from paradit import WanConfig, WanTransformer, load_transformer
from paradit.models import CheckpointError, patchify, unpatchify
from paradit.models.loading import save_original_layout, to_original_name

TEXT_DIM, TEXT_TOKENS, FFN_DIM, LAYERS = 32, 7, 32, 2


@dataclass(frozen=True)
class Case:
    heads: int
    head_dim: int
    grid: tuple[int, int, int]          # latent (F, H, W); the patch grid is (F, H / 2, W / 2)
    batch: int = 1
    channels: tuple[int, int] = (16, 16)  # (in, out)
    per_token_t: bool = False           # t of shape (B, L), as TI2V-5B uses

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


CASES = {
    "2x12-t2v-F3H10W6": Case(2, 12, (3, 10, 6)),
    "3x8-t2v-F1H6W14-b2": Case(3, 8, (1, 6, 14), batch=2),
    "4x16-t2v-F5H2W2-b2": Case(4, 16, (5, 2, 2), batch=2),
    "2x12-i2v-36to16-b2": Case(2, 12, (3, 4, 6), batch=2, channels=(36, 16)),
    "3x8-ti2v-48to48-per-token-b2": Case(3, 8, (3, 6, 10), batch=2, channels=(48, 48), per_token_t=True),
    "4x16-t2v-per-token-b2": Case(4, 16, (2, 4, 6), batch=2, per_token_t=True),
    "1x128-t2v-F2H4W4": Case(1, 128, (2, 4, 4)),  # head_dim 128: heads inferable without config.json
}


# ---- helpers ------------------------------------------------------------------------------------
def diffusers_model(case: Case, seed: int = 0, **extra) -> WanTransformer3DModel:
    """diffusers' Wan DiT with random weights; norms and modulation tables moved off their init,
    so that a swapped or dropped norm / modulation mapping changes the output."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=case.heads, attention_head_dim=case.head_dim,
        in_channels=case.channels[0], out_channels=case.channels[1], text_dim=TEXT_DIM, freq_dim=256,
        ffn_dim=FFN_DIM, num_layers=LAYERS, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=32, **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift_table" in name:  # init 1 / 0 / randn * D^-0.5
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def random_inputs(case: Case, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, F, H, W), t (B,) or (B, L) with distinct integer timesteps, text (B, S, text_dim)."""
    g = torch.Generator().manual_seed(seed)
    b, (f, h, w) = case.batch, case.grid
    x = torch.randn(b, case.channels[0], f, h, w, generator=g)
    shape = (b, f * (h // 2) * (w // 2)) if case.per_token_t else (b,)
    t = torch.randint(1, 1000, shape, generator=g).float()
    if not case.per_token_t and b == 2:
        t = torch.tensor([999.0, 213.0])
    return x, t, torch.randn(b, TEXT_TOKENS, TEXT_DIM, generator=g)


@lru_cache(maxsize=None)
def reference(name: str) -> tuple[WanTransformer3DModel, tuple, torch.Tensor]:
    """(diffusers model, inputs, diffusers output) for a case, built once per session."""
    case = CASES[name]
    model, inputs = diffusers_model(case), random_inputs(case)
    with torch.no_grad():
        return model, inputs, model(*inputs).sample


def run(model: WanTransformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def assert_parity(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Both sides compute the same fp32 function; they may differ only in summation order (patch
    # embedding as a matmul vs Conv3d, RMSNorm kernels): a few ulp (~1e-7) grown through two layers.
    # 1e-5 relative leaves ~100x margin, yet a wrong name, norm or modulation mapping is an O(0.1-1)
    # error (test_parity_check_catches_a_wrong_mapping shows it).
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5, f"relative error {rel_err(out, ref):.2e}"


def original_state(model: WanTransformer3DModel, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + to_original_name(k): v.contiguous() for k, v in model.state_dict().items()}


def write_folder(folder: Path, state: dict[str, torch.Tensor], config: dict | None,
                 filename: str = "diffusion_pytorch_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / filename)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def sharded(model: WanTransformer3DModel, folder: Path) -> tuple[Path, dict[str, str]]:
    """save_pretrained in several shards; returns the folder and its weight_map."""
    model.save_pretrained(folder, max_shard_size="20KB")
    weight_map = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1, "the checkpoint should be sharded"
    return folder, weight_map


# ---- checkpoint layouts: each writes the same weights and returns what load_transformer is given
def _diffusers(model, case, tmp: Path):
    model.save_pretrained(tmp / "ckpt")
    return tmp / "ckpt", None


def _diffusers_sharded(model, case, tmp: Path):
    return sharded(model, tmp / "ckpt")[0], None


def _original_folder(model, case, tmp: Path):
    """Original names + original config.json, written by paradit's own exporter from a load."""
    model.save_pretrained(tmp / "diffusers")
    save_original_layout(load_transformer(tmp / "diffusers"), tmp / "ckpt")
    assert "dim" in json.loads((tmp / "ckpt" / "config.json").read_text())
    return tmp / "ckpt", None


def _original_single_file(model, case, tmp: Path):
    """One file, `model.diffusion_model.` prefix, no config.json: the architecture comes from shapes;
    the head count cannot (q is (D, D) whatever the heads), so it is given unless head_dim is 128."""
    write_folder(tmp / "ckpt", original_state(model, "model.diffusion_model."), None, "wan.safetensors")
    heads = None if case.head_dim == 128 else WanConfig("test", dim=case.dim, ffn_dim=FFN_DIM,
                                                          num_heads=case.heads, num_layers=LAYERS)
    return tmp / "ckpt" / "wan.safetensors", heads


LAYOUTS = {"diffusers": _diffusers, "diffusers-sharded": _diffusers_sharded,
           "original-folder": _original_folder, "original-single-file": _original_single_file}


# ---- 1. parity with diffusers -------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_parity_with_diffusers(name: str, layout: str, tmp_path: Path):
    model, inputs, ref = reference(name)
    path, config = LAYOUTS[layout](model, CASES[name], tmp_path)
    ours = load_transformer(path, config=config)
    assert (ours.cfg.num_heads, ours.cfg.dim) == (CASES[name].heads, CASES[name].dim)
    assert_parity(run(ours, inputs), ref)


def _swap_q_k_norms(m):
    b = m.blocks[0].self_attn
    b.norm_q.weight, b.norm_k.weight = b.norm_k.weight, b.norm_q.weight


MUTATIONS = {  # plausible mapping mistakes; each must break parity by far more than the tolerance
    "self-attn norm_q <-> norm_k": _swap_q_k_norms,
    "cross-attn norm without bias": lambda m: m.blocks[1].norm3.bias.zero_(),
    "block shift <-> scale": lambda m: m.blocks[0].modulation.copy_(m.blocks[0].modulation[:, [1, 0, 2, 3, 4, 5]]),
    "head shift <-> scale": lambda m: m.head.modulation.copy_(m.head.modulation[:, [1, 0]]),
    "ffn gate <-> attn gate": lambda m: m.blocks[1].modulation.copy_(m.blocks[1].modulation[:, [0, 1, 5, 3, 4, 2]]),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_parity_check_catches_a_wrong_mapping(mutation: str, tmp_path: Path):
    model, inputs, ref = reference("2x12-t2v-F3H10W6")
    model.save_pretrained(tmp_path)
    ours = load_transformer(tmp_path)
    with torch.no_grad():
        MUTATIONS[mutation](ours)
    assert rel_err(run(ours, inputs), ref) > 1e-3  # 100x the parity tolerance


# ---- 2. load errors name the problem ------------------------------------------------------------
TINY = Case(2, 12, (1, 4, 4))


@pytest.fixture
def tiny_model() -> WanTransformer3DModel:
    return diffusers_model(TINY)


def test_error_path_does_not_exist(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"does not exist") as err:
        load_transformer(tmp_path / "no-such-checkpoint")
    assert "no-such-checkpoint" in str(err.value)


def test_error_folder_without_safetensors(tmp_path: Path, tiny_model):
    tiny_model.save_config(tmp_path)  # config.json alone
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_transformer(tmp_path)


def test_error_missing_tensor(tmp_path: Path, tiny_model):
    state = tiny_model.state_dict()
    del state["blocks.1.attn2.norm_k.weight"]
    write_folder(tmp_path, state, dict(tiny_model.config))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.1\.cross_attn\.norm_k\.weight'\]"):
        load_transformer(tmp_path)


def test_error_unexpected_tensor(tmp_path: Path, tiny_model):
    state = {**tiny_model.state_dict(), "blocks.0.attn1.to_gate.weight": torch.randn(24, 24)}
    write_folder(tmp_path, state, dict(tiny_model.config))
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks\.0\.attn1\.to_gate\.weight'\]"):
        load_transformer(tmp_path)


def test_error_wrong_shape_names_tensor_and_shard(tmp_path: Path, tiny_model):
    folder, weight_map = sharded(tiny_model, tmp_path)
    key = "blocks.0.ffn.net.0.proj.weight"
    shard = folder / weight_map[key]
    state = load_file(shard)
    state[key] = torch.randn(FFN_DIM + 1, TINY.dim)
    save_file(state, shard)
    with pytest.raises(CheckpointError, match=r"has shape \(33, 24\), expected \(32, 24\)") as err:
        load_transformer(folder)
    assert key in str(err.value) and str(shard) in str(err.value)


def test_error_index_names_missing_shard(tmp_path: Path, tiny_model):
    folder, weight_map = sharded(tiny_model, tmp_path)
    gone = sorted(set(weight_map.values()))[1]
    (folder / gone).unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) that do not exist") as err:
        load_transformer(folder)
    assert gone in str(err.value)


def test_error_same_tensor_in_two_files(tmp_path: Path, tiny_model):
    state = tiny_model.state_dict()
    write_folder(tmp_path, state, dict(tiny_model.config))
    write_folder(tmp_path, state, None, "diffusion_pytorch_model.fp16.safetensors")  # a stray variant
    with pytest.raises(CheckpointError, match=r"stored twice"):
        load_transformer(tmp_path)


def test_error_head_count_not_inferable(tmp_path: Path, tiny_model):
    write_folder(tmp_path, original_state(tiny_model, "model.diffusion_model."), None)
    with pytest.raises(CheckpointError, match=r"dim 24 is not a multiple of 128.*pass config="):
        load_transformer(tmp_path)


def test_error_wan21_i2v_with_config(tmp_path: Path):
    diffusers_model(TINY, added_kv_proj_dim=TINY.dim, image_dim=16).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"Wan2\.1 I2V .*CLIP image branch.*does not support"):
        load_transformer(tmp_path)


def test_error_wan21_i2v_single_file(tmp_path: Path):
    model = diffusers_model(TINY, added_kv_proj_dim=TINY.dim, image_dim=16)
    write_folder(tmp_path, original_state(model, "model.diffusion_model."), None)
    with pytest.raises(CheckpointError, match=r"does not support.*image-branch tensors: .*add_k_proj"):
        load_transformer(tmp_path, config=WanConfig("t", dim=24, ffn_dim=FFN_DIM, num_heads=2, num_layers=2))


# ---- 3. model properties ------------------------------------------------------------------------
def tiny_paradit(channels: tuple[int, int] = (16, 16), seed: int = 0) -> WanTransformer:
    torch.manual_seed(seed)
    cfg = WanConfig("test", dim=24, ffn_dim=FFN_DIM, num_heads=2, num_layers=LAYERS, text_dim=TEXT_DIM,
                    in_channels=channels[0], out_channels=channels[1])
    model = WanTransformer(cfg).eval()
    with torch.no_grad():  # LayerNorm / RMSNorm weights off their init of ones, biases off zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("channels", [(16, 16), (36, 16), (48, 48)])
def test_output_shape(channels: tuple[int, int]):
    case = Case(2, 12, (3, 10, 6), batch=2, channels=channels)
    x, t, ctx = random_inputs(case)
    assert run(tiny_paradit(channels), (x, t, ctx)).shape == (2, channels[1], 3, 10, 6)


GRIDS = [((3, 10, 6), (1, 2, 2)), ((1, 6, 14), (1, 2, 2)), ((5, 2, 2), (1, 2, 2)), ((4, 6, 10), (2, 2, 2))]


@pytest.mark.parametrize("shape,patch", GRIDS)
def test_patchify_round_trip_and_token_order(shape, patch):
    x = torch.randn(2, 5, *shape)
    grid = tuple(s // p for s, p in zip(shape, patch))
    tokens = patchify(x, patch)
    assert torch.equal(unpatchify(tokens, grid, patch), x)  # pure reshapes: exact
    # token (f, h, w) in row-major order holds its patch as (pt, ph, pw, C), channel fastest
    f, h, w = grid[0] - 1, grid[1] // 2, grid[2] - 1
    (pt, ph, pw), i = patch, (f * grid[1] + h) * grid[2] + w
    patch_x = x[:, :, f * pt:(f + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]  # (B, C, pt, ph, pw)
    assert torch.equal(tokens[:, i], patch_x.permute(0, 2, 3, 4, 1).reshape(2, -1))


@pytest.mark.parametrize("channels", [(16, 16), (48, 48)])
def test_embed_patches_equals_conv3d(channels):
    model = tiny_paradit(channels)
    x = torch.randn(2, channels[0], 3, 10, 6)
    with torch.no_grad():
        conv = model.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, L, D)
        linear = model.embed_patches(patchify(x, model.cfg.patch))
    # the same sums of 4*C products in another order: fp32 rounding only (~1e-7 relative)
    torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-5)


def test_constant_per_token_t_equals_per_batch_t():
    model = tiny_paradit((48, 48))
    x, t, ctx = random_inputs(Case(2, 12, (3, 6, 4), batch=2, channels=(48, 48)))
    per_token = t[:, None].expand(2, 3 * 3 * 2)  # (B, L)
    # the same per-row ops on L copies of each row; only matmul blocking may differ: fp32 rounding
    torch.testing.assert_close(run(model, (x, per_token, ctx)), run(model, (x, t, ctx)), rtol=1e-5, atol=1e-5)
    # and t does matter (the comparison above can fail)
    assert rel_err(run(model, (x, t.flip(0), ctx)), run(model, (x, t, ctx))) > 1e-3


# ---- 4. meta-device loading ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_materialises_every_tensor_in_dtype_and_counts_bytes(dtype, tmp_path: Path, tiny_model):
    folder, weight_map = sharded(tiny_model, tmp_path)
    stats: dict = {}
    model = load_transformer(folder, dtype=dtype, stats=stats)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not [n for n, p in tensors.items() if p.is_meta or p.device.type != "cpu"]
    assert {p.dtype for p in tensors.values()} == {dtype}
    stored = [t for shard in set(weight_map.values()) for t in load_file(folder / shard).values()]
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in stored)
    assert sorted(stats["names"]) == sorted(model.state_dict())

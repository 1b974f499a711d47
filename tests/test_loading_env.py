"""Loading in the environment diffusers users have: accelerate installed, which makes diffusers build
its models under accelerate's `init_empty_weights` (a process-wide patch of
nn.Module.register_parameter). A pipeline folder saved by diffusers itself, with the real Wan2.1 VAE
architecture, loads with every parameter of every component real, and gives the same latent on every
load, however the concurrent reads interleave."""
import pytest
import torch

pytest.importorskip("accelerate", reason="the regression needs accelerate; it is in the test extras")

PROMPT = "a red circle moving left"
RUN = dict(width=64, height=48, frames=5, steps=2, seed=3, progress=False)
LOADS = 3  # the old code left the text encoder on the meta device in 5 of 6 loads; 3 clean loads in a row
#            happen by chance with probability < 1e-2 if the race is there


def diffusers_pipeline_folder(root):
    """A WanPipeline (two tiny experts, a tiny umT5, the default = real Wan2.1 AutoencoderKLWan, random
    weights) written by diffusers' own save_pretrained."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from paradit.config import WanConfig
    from paradit.models.text_encoder import TextEncoder

    cfg = WanConfig.preset("tiny")
    torch.manual_seed(0)
    experts = [WanTransformer3DModel(patch_size=cfg.patch, num_attention_heads=cfg.num_heads,
                                     attention_head_dim=cfg.head_dim, in_channels=16, out_channels=16,
                                     text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
                                     num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
               for _ in range(2)]
    text = TextEncoder.tiny(cfg.text_dim, cfg.text_len)
    pipe = WanPipeline(tokenizer=text.tokenizer, text_encoder=text.model, vae=AutoencoderKLWan(),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=cfg.shift),
                       transformer=experts[0], transformer_2=experts[1], boundary_ratio=cfg.boundary)
    pipe.save_pretrained(root)
    return root


def meta_tensors(pipe) -> list[str]:
    parts = {"transformer": pipe.experts[0], "transformer_2": pipe.experts[1],
             "text_encoder": pipe.text_encoder.model, "vae": pipe.vae.vae}
    return [f"{part}.{name}" for part, module in parts.items()
            for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def load_and_run(folder: str):
    from paradit.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder)
    return meta_tensors(pipe), pipe(PROMPT, output="latent", **RUN)


def test_a_diffusers_folder_loads_whole_every_time(tmp_path):
    folder = str(diffusers_pipeline_folder(tmp_path / "wan"))
    runs = [load_and_run(folder) for _ in range(LOADS)]
    for meta, _ in runs:
        assert meta == [], f"parameters left on the meta device: {meta[:5]}"
    for _, latent in runs[1:]:
        assert torch.equal(latent, runs[0][1])  # same weights, same math: bit for bit


def test_the_text_encoder_and_vae_equal_the_libraries_own_loads(tmp_path):
    """paradit builds the umT5 and the VAE on the meta device and reads their weights itself: the
    same tensors, names and dtypes as transformers' and diffusers' from_pretrained."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    from paradit.models.text_encoder import TextEncoder
    from paradit.models.vae import VideoVAE

    folder = diffusers_pipeline_folder(tmp_path / "wan")
    for dtype in (torch.float32, torch.bfloat16):
        ours = TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer", 16, dtype=dtype).model
        ref = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype)
        assert_same_module(ours, ref)
    ours = VideoVAE.from_pretrained(folder / "vae").vae
    assert_same_module(ours, AutoencoderKLWan.from_pretrained(folder / "vae"))


def assert_same_module(ours, ref):
    a, b = dict(ours.state_dict()), dict(ref.state_dict())
    assert a.keys() == b.keys()
    for name, t in b.items():
        assert a[name].dtype == t.dtype, name
        assert torch.equal(a[name], t), name
    # tied weights stay tied (umT5's shared embedding is the encoder's token embedding)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in ref.named_parameters()}

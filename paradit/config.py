"""Model presets and video settings.

A `WanConfig` describes one Wan DiT architecture plus the sampling defaults of its release
(the original Wan code's configs, wan/configs/). Presets are looked up by name with `WanConfig.preset(name)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WanConfig:
    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    cross_attn_norm: bool = True
    # sampling defaults of the release
    steps: int = 50
    shift: float = 5.0
    guidance: tuple[float, float] = (5.0, 5.0)  # (high-noise expert, low-noise expert)
    boundary: float | None = None               # t >= boundary * 1000 runs the high-noise expert
    fps: int = 16
    frames: int = 81
    size: tuple[int, int] = (1280, 720)         # (width, height)
    # latent codec
    vae: str = "wan2.1"                         # "wan2.1" (z16, 4x8x8) | "wan2.2" (z48, 4x16x16) | "tiny" | "demo" (lossless, 8x1x1)
    z_dim: int = 16
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    task: str = "t2v"                           # "t2v" | "i2v" | "ti2v"
    negative_prompt: str = ""                   # used when the caller gives none (the original Wan's rule)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_experts(self) -> int:
        return 1 if self.boundary is None else 2

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE stride x patch)."""
        return self.vae_stride[1] * self.patch[1]

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
        """[C, F_lat, H_lat, W_lat] of the latent of a video of this size."""
        self.check_video(width, height, frames)
        st, sh, sw = self.vae_stride
        return (self.z_dim, (frames - 1) // st + 1, height // sh, width // sw)

    def num_tokens(self, width: int, height: int, frames: int) -> int:
        _, f, h, w = self.latent_shape(width, height, frames)
        pt, ph, pw = self.patch
        return (f // pt) * (h // ph) * (w // pw)

    def check_video(self, width: int, height: int, frames: int) -> None:
        m, st = self.size_multiple, self.vae_stride[0]
        if width <= 0 or height <= 0 or width % m or height % m:
            lo_w, lo_h = max(m, width // m * m), max(m, height // m * m)
            raise ValueError(
                f"size {width}x{height} is not allowed for {self.name}: width and height must be "
                f"positive multiples of {m} (VAE stride x patch); nearest below is {lo_w}x{lo_h}")
        if frames < 1 or (frames - 1) % st:
            lo = max(1, (frames - 1) // st * st + 1)
            raise ValueError(f"frames={frames} is not allowed for {self.name}: frames must be of the "
                             f"form {st}k+1 ({1}, {st + 1}, {2 * st + 1}, ...); nearest below is {lo}")

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def preset(name: str) -> "WanConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; known presets: "
                             f"{', '.join(sorted(PRESETS))}") from None

    @staticmethod
    def names() -> list[str]:
        return sorted(PRESETS)


# The original Wan's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt).
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                       "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, steps=40, negative_prompt=WAN_NEGATIVE_PROMPT)

PRESETS: dict[str, WanConfig] = {c.name: c for c in [
    WanConfig("wan2.2-t2v-a14b", **_A14B, shift=12.0, guidance=(4.0, 3.0), boundary=0.875),
    WanConfig("wan2.2-i2v-a14b", **_A14B, in_channels=36, shift=5.0, guidance=(3.5, 3.5),
              boundary=0.900, task="i2v"),
    WanConfig("wan2.2-ti2v-5b", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30,
              in_channels=48, out_channels=48, steps=50, shift=5.0, guidance=(5.0, 5.0), fps=24,
              frames=121, size=(1280, 704), vae="wan2.2", z_dim=48, vae_stride=(4, 16, 16),
              task="ti2v", negative_prompt=WAN_NEGATIVE_PROMPT),
    WanConfig("wan2.1-t2v-14b", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
              negative_prompt=WAN_NEGATIVE_PROMPT),
    WanConfig("wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30,
              size=(832, 480), negative_prompt=WAN_NEGATIVE_PROMPT),
    # Runs a whole pipeline in seconds on a CPU; random weights; two experts like A14B.
    WanConfig("tiny", dim=24, ffn_dim=32, num_heads=2, num_layers=2, text_dim=32, text_len=16,
              steps=8, shift=12.0, guidance=(4.0, 3.0), boundary=0.875, frames=9, size=(64, 64),
              vae="tiny", fps=8),
    # Trained on synthetic moving shapes (paradit/demo, docs/demo-model.md); weights ship in the package.
    # Its codec folds 8 frames into channels (stride 8x1x1), which gives the tiny DiT the arrow of time.
    WanConfig("demo", dim=128, ffn_dim=256, num_heads=2, num_layers=3, in_channels=24, out_channels=24,
              text_dim=32, text_len=16, steps=24, shift=5.0, guidance=(4.0, 3.0), boundary=0.875,
              fps=8, frames=9, size=(16, 16), vae="demo", z_dim=24, vae_stride=(8, 1, 1)),
    # The larger demo model (docs/demo-model.md): 64x64x33, speed words; trained by scripts/train_demo.py
    # --preset demo64 on a GPU. Its codec also folds 2x2 pixels into channels (stride 8x2x2): 1280 tokens.
    # No guidance on the low-noise steps: its shapes fit their references better than at (4, 3) on 20
    # of the 24 held-out prompts, judged as often right, and those steps run one forward, not two.
    WanConfig("demo64", dim=192, ffn_dim=768, num_heads=3, num_layers=4, in_channels=96, out_channels=96,
              text_dim=32, text_len=16, steps=24, shift=5.0, guidance=(4.0, 1.0), boundary=0.875,
              fps=12, frames=33, size=(64, 64), vae="demo", z_dim=96, vae_stride=(8, 2, 2)),
]}

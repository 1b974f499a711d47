"""The video VAE: diffusers' AutoencoderKLWan behind the pipeline's small interface.

Decoding a 720p x 81-frame latent in one piece runs a GPU out of memory, so the decode is tiled:
`tiled_decode` is paradit's own copy of the procedure of diffusers' `AutoencoderKLWan.tiled_decode`
(the same overlapping spatial tiles, each decoded frame by frame with its own causal cache, then
the same in-place blend, row by row), written as pure steps: `tile_origins`, `decode_tile`,
`blend_tiles`. Every tile is decoded independently, so paradit.parallel.vae spreads the tiles over
the ranks of a group and blends on one of them: the same numbers as `tiled_decode`, which gives
the same numbers as diffusers (tests/test_conditioning.py proves both).
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify as vae_unpatchify

Tensor = torch.Tensor
DEFAULT_TILE = (256, 192)  # (tile size, tile stride) in pixels: diffusers' defaults


# ----------------------------------------------------------------------------- tiled decode
def tile_geometry(vae: AutoencoderKLWan) -> dict:
    """Tile sizes in latent and in decoded (possibly patchified) pixels, as diffusers derives them."""
    ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
    g = dict(lat_h=vae.tile_sample_min_height // ratio, lat_w=vae.tile_sample_min_width // ratio,
             lat_stride_h=vae.tile_sample_stride_height // ratio,
             lat_stride_w=vae.tile_sample_stride_width // ratio,
             stride_h=vae.tile_sample_stride_height // patch, stride_w=vae.tile_sample_stride_width // patch)
    g["blend_h"] = vae.tile_sample_min_height // patch - g["stride_h"]
    g["blend_w"] = vae.tile_sample_min_width // patch - g["stride_w"]
    return g


def needs_tiling(vae: AutoencoderKLWan, z: Tensor) -> bool:
    g = tile_geometry(vae)
    return vae.use_tiling and (z.shape[-1] > g["lat_w"] or z.shape[-2] > g["lat_h"])


def tile_origins(vae: AutoencoderKLWan, z: Tensor) -> list[list[tuple[int, int]]]:
    """Latent (row, col) origin of every tile, as rows of tiles."""
    g = tile_geometry(vae)
    return [[(i, j) for j in range(0, z.shape[-1], g["lat_stride_w"])]
            for i in range(0, z.shape[-2], g["lat_stride_h"])]


@torch.no_grad()
def decode_tile(vae: AutoencoderKLWan, z: Tensor, origin: tuple[int, int]) -> Tensor:
    """One tile, decoded frame by frame with a fresh causal cache: (B, C', F', h, w), unclamped."""
    g, (i, j) = tile_geometry(vae), origin
    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    frames = []
    for k in range(z.shape[2]):
        tile = z[:, :, k:k + 1, i:i + g["lat_h"], j:j + g["lat_w"]]
        frames.append(vae.decoder(vae.post_quant_conv(tile), feat_cache=cache, feat_idx=[0], first_chunk=k == 0))
    return torch.cat(frames, dim=2)


def _ramp(n: int, device) -> tuple[Tensor, Tensor]:
    """(1 - y/n, y/n) for y < n, each rounded from float64 to float32 as diffusers' Python scalars are."""
    return (torch.tensor([1 - y / n for y in range(n)], device=device),
            torch.tensor([y / n for y in range(n)], device=device))


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """b's first `extent` entries along dim := a's last ones faded into b's (in place, returns b)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    w_a, w_b = _ramp(extent, b.device)
    shape = [1] * b.ndim
    shape[dim] = extent
    a_tail, b_head = a.narrow(dim, a.shape[dim] - extent, extent), b.narrow(dim, 0, extent)
    b_head.copy_(a_tail * w_a.view(shape).to(a.dtype) + b_head * w_b.view(shape).to(b.dtype))
    return b


def blend_tiles(vae: AutoencoderKLWan, rows: list[list[Tensor]], lat_hw: tuple[int, int]) -> Tensor:
    """Blend decoded tiles (modified in place, in diffusers' order) into the video (B, 3, F', H, W) in [-1, 1]."""
    g = tile_geometry(vae)
    patch = vae.config.patch_size or 1
    ratio = vae.spatial_compression_ratio
    height, width = lat_hw[0] * ratio // patch, lat_hw[1] * ratio // patch  # of the (patchified) video
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, g["blend_h"], dim=3)
            if j > 0:
                tile = _blend(row[j - 1], tile, g["blend_w"], dim=4)
            out_row.append(tile[:, :, :, :g["stride_h"], :g["stride_w"]])
        out_rows.append(torch.cat(out_row, dim=-1))
    video = torch.cat(out_rows, dim=3)[:, :, :, :height, :width]
    if vae.config.patch_size is not None:
        video = vae_unpatchify(video, patch_size=vae.config.patch_size)
    return video.clamp(-1.0, 1.0)


def tiled_decode(vae: AutoencoderKLWan, z: Tensor) -> Tensor:
    """The single-rank reference: every tile here, then the blend."""
    rows = [[decode_tile(vae, z, o) for o in row] for row in tile_origins(vae, z)]
    return blend_tiles(vae, rows, z.shape[-2:])


# ----------------------------------------------------------------------------- the adapter
class VideoVAE:
    """Normalised latents in, uint8 frames out (and back), with tiling on by default.

    tile: (size, stride) of the decode tiles in pixels; diffusers' (256, 192) unless given.
    """

    def __init__(self, vae: AutoencoderKLWan, device="cpu", dtype=torch.float32, tiling: bool = True,
                 tile: tuple[int, int] | None = None):
        self.vae = vae.eval().requires_grad_(False).to(device)
        if dtype != torch.float32:  # diffusers warns on a .to(dtype) that is a no-op
            self.vae.to(dtype)
        self.device, self.dtype = torch.device(device), dtype
        c = vae.config
        self.mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        self.std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)
        if tiling:
            size, stride = tile or DEFAULT_TILE
            self.vae.enable_tiling(size, size, stride, stride)

    @property
    def z_dim(self) -> int:
        return self.vae.config.z_dim

    def to_model_space(self, latent: Tensor) -> Tensor:
        """Normalised latent (C, F, H, W) -> the VAE's input (1, C, F, H, W) on its device."""
        return (latent[None].float() * self.std + self.mean).to(self.device, self.dtype)

    @staticmethod
    def to_frames(video: Tensor) -> Tensor:
        """VAE output (1, 3, F, H, W) in [-1, 1] -> uint8 frames (F, H, W, 3) on the CPU."""
        video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, F, H, W)
        return video.permute(1, 2, 3, 0).cpu()

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """latent (C, F, H, W), normalised -> uint8 frames (F', H', W', 3); in tiles where it is large."""
        z = self.to_model_space(latent)
        if needs_tiling(self.vae, z):
            return self.to_frames(tiled_decode(self.vae, z))
        return self.to_frames(self.vae.decode(z, return_dict=False)[0])

    @torch.no_grad()
    def encode_pixels(self, x: Tensor) -> Tensor:
        """Pixels (3, F, H, W) in [-1, 1] -> normalised latent (C, F', H', W') fp32 (distribution mode)."""
        z = self.vae.encode(x[None].to(self.device, self.dtype)).latent_dist.mode().float().cpu()
        return ((z - self.mean) / self.std)[0]

    def encode(self, frames: Tensor) -> Tensor:
        """uint8 frames (F, H, W, 3) -> normalised latent (C, F', H', W') fp32 (distribution mode)."""
        return self.encode_pixels(frames.permute(3, 0, 1, 2).float() / 127.5 - 1)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype=torch.float32, stats: dict | None = None,
                        **kw) -> "VideoVAE":
        """diffusers' save_pretrained folder, as its from_pretrained would load it, but built on the
        meta device under paradit's BUILD_LOCK and read by paradit's reader, straight to `device`."""
        from paradit.models.loading import assign_weights, build_on_meta, index_folder, read_tensors
        config = AutoencoderKLWan.load_config(folder)
        vae = build_on_meta(lambda: AutoencoderKLWan.from_config(config))
        index = index_folder(folder)
        vae = assign_weights(vae, read_tensors(index, index.names, dtype, device, stats=stats), str(folder))
        return cls(vae, device, dtype, **kw)

    @classmethod
    def tiny(cls, z_dim: int = 16, seed: int = 0, device="cpu", **kw) -> "VideoVAE":
        """A randomly initialised VAE of the Wan2.1 kind (z_dim 16, stride 4x8x8) or, for z_dim 48,
        of the Wan2.2 kind (residual blocks, 2x2 pixel patches, stride 4x16x16)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            common = dict(dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
            if z_dim == 48:  # latent statistics of no meaning, but not 0 and 1, so normalisation is exercised
                vae = AutoencoderKLWan(base_dim=12, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                                       patch_size=2, scale_factor_spatial=16, **common,
                                       latents_mean=torch.linspace(-0.5, 0.5, 48).tolist(),
                                       latents_std=torch.linspace(0.5, 2.0, 48).tolist())
            else:            # Wan2.1's latent statistics (diffusers' defaults)
                vae = AutoencoderKLWan(base_dim=3, z_dim=z_dim, **common)
        return cls(vae, device, **kw)

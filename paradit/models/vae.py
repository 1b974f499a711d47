"""The video VAE: diffusers' AutoencoderKLWan behind the pipeline's small interface.

Precision and tiling follow the memory there is. On a GPU the VAE runs in bf16 (as diffusers'
WanPipeline runs it when loaded in bf16); elsewhere in fp32. A latent is decoded whole, frame by
frame with the causal cache, when the estimated peak (`decode_bytes`) fits in the device's free
memory; otherwise in the fewest tiles that fit (`plan_tiles`). At 720p x 81 in bf16 the whole
decode needs about 9.8 GB (`decode_bytes`), so on one large GPU it is one piece and does no
overlapping tile's work twice.

Tiles follow the procedure of diffusers' `AutoencoderKLWan.tiled_decode` (overlapping spatial
tiles, each decoded frame by frame with its own causal cache, then the same in-place blend, row by
row), written as pure steps of an explicit `Tiles` geometry: `tile_origins`, `decode_tile`,
`blend_tiles`. Every tile is decoded independently, so paradit.parallel.vae spreads the tiles
over the ranks of a group and blends on one of them: the same numbers as `tiled_decode` with the
same tiles, which gives the same numbers as diffusers (tests/test_conditioning.py proves both).
Fixed tiles (`VideoVAE(tile=...)`, `tiling=True`, or the module's `enable_tiling`) are used as
given, on every layout; otherwise the tiles are chosen per call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from paradit.models.vae_memory import (decode_bytes, encode_bytes, video_bytes,  # noqa: F401 (imported from here too)
                                       work_bytes)

try:   # imported with the pipeline, as before; only a Wan VAE needs it (wan_autoencoder), not the demo's codec
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify as vae_unpatchify
    MISSING = None
except ImportError as err:
    AutoencoderKLWan, MISSING = None, str(err)

Tensor = torch.Tensor
DEFAULT_TILE = (256, 192)  # (tile size, tile stride) in pixels: diffusers' defaults
BLEND_PX = 64              # the overlap of planned tiles in pixels: diffusers' default (256 - 192)
MEMORY_USE = 0.8           # the share of free device memory a decode may plan to use


def wan_autoencoder():
    """diffusers' AutoencoderKLWan, for building a Wan VAE: a pipeline without one (the demo model's
    codec) runs where diffusers is not installed."""
    if AutoencoderKLWan is None:
        raise ImportError(f"the Wan VAE is diffusers' AutoencoderKLWan, and diffusers cannot be imported "
                          f"({MISSING}): pip install diffusers")
    return AutoencoderKLWan


# ----------------------------------------------------------------------------- tile geometry
@dataclass(frozen=True)
class Tiles:
    """Tile size and stride per axis in pixels, as diffusers' `enable_tiling` takes them."""
    size_h: int
    size_w: int
    stride_h: int
    stride_w: int

    @classmethod
    def of(cls, vae: AutoencoderKLWan) -> "Tiles":
        """The tiles set on the module (enable_tiling, or diffusers' defaults)."""
        return cls(vae.tile_sample_min_height, vae.tile_sample_min_width,
                   vae.tile_sample_stride_height, vae.tile_sample_stride_width)

    @classmethod
    def grid(cls, vae: AutoencoderKLWan, lat_hw: tuple[int, int], rows: int, cols: int) -> "Tiles":
        """`rows` x `cols` tiles over a latent of lat_hw, overlapping by BLEND_PX (at most)."""
        ratio = vae.spatial_compression_ratio
        stride_h, stride_w = -(-lat_hw[0] // rows) * ratio, -(-lat_hw[1] // cols) * ratio  # ceil, in pixels
        blend = BLEND_PX // ratio * ratio
        return cls(stride_h + blend, stride_w + blend, stride_h, stride_w)


def tile_geometry(vae: AutoencoderKLWan, tiles: Tiles | None = None) -> dict:
    """Tile sizes in latent and in decoded (possibly patchified) pixels, as diffusers derives them."""
    t = tiles or Tiles.of(vae)
    ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
    g = dict(lat_h=t.size_h // ratio, lat_w=t.size_w // ratio, lat_stride_h=t.stride_h // ratio,
             lat_stride_w=t.stride_w // ratio, stride_h=t.stride_h // patch, stride_w=t.stride_w // patch)
    g["blend_h"] = t.size_h // patch - g["stride_h"]
    g["blend_w"] = t.size_w // patch - g["stride_w"]
    return g


def needs_tiling(vae: AutoencoderKLWan, z: Tensor, tiles: Tiles | None = None) -> bool:
    """Whether z is larger than one tile (the module's tiles unless given; only if tiling is on there)."""
    g = tile_geometry(vae, tiles)
    return (tiles is not None or vae.use_tiling) and (z.shape[-1] > g["lat_w"] or z.shape[-2] > g["lat_h"])


def tile_origins(vae: AutoencoderKLWan, z: Tensor, tiles: Tiles | None = None) -> list[list[tuple[int, int]]]:
    """Latent (row, col) origin of every tile, as rows of tiles."""
    g = tile_geometry(vae, tiles)
    return [[(i, j) for j in range(0, z.shape[-1], g["lat_stride_w"])]
            for i in range(0, z.shape[-2], g["lat_stride_h"])]


# ----------------------------------------------------------------------------- memory
def tiles_bytes(vae: AutoencoderKLWan, lat_hw, frames: int, dtype, tiles: Tiles, device_type: str = "cuda") -> int:
    """The peak of a tiled decode: one tile's decode, every decoded tile and the blended video."""
    g = tile_geometry(vae, tiles)
    tile_hw = (min(g["lat_h"], lat_hw[0]), min(g["lat_w"], lat_hw[1]))
    count = -(-lat_hw[0] // g["lat_stride_h"]) * -(-lat_hw[1] // g["lat_stride_w"])
    return int(decode_bytes(vae, tile_hw, frames, dtype, device_type)
               + count * video_bytes(vae, tile_hw, frames, dtype) + video_bytes(vae, lat_hw, frames, dtype))


def tile_area(vae: AutoencoderKLWan, lat_hw, tiles: Tiles) -> int:
    """Latent pixels of the largest tile (clipped to the latent): a spread decode's critical path."""
    g = tile_geometry(vae, tiles)
    return min(g["lat_h"], lat_hw[0]) * min(g["lat_w"], lat_hw[1])


def plan_tiles(vae: AutoencoderKLWan, lat_hw: tuple[int, int], frames: int, dtype, budget: float,
               pieces: int = 1, device_type: str = "cuda") -> Tiles | None:
    """The tiles a decode uses: None (the whole latent in one piece) when one piece is asked for
    and it fits in `budget` bytes; else the grid of the fewest rounds of `pieces` tiles (one tile
    per rank and round when spread) whose largest tile is the smallest that fits. A latent too small
    to cut into `pieces` tiles of strides at least twice the blend is decoded whole."""
    least = 2 * max(1, BLEND_PX // vae.spatial_compression_ratio)  # the smallest stride, latent pixels
    whole_fits = decode_bytes(vae, lat_hw, frames, dtype, device_type) <= budget
    if pieces == 1 and whole_fits:
        return None
    for count in range(pieces, 64 * pieces + 1, pieces):
        grids = [(r, count // r) for r in range(1, count + 1) if count % r == 0
                 and (r == 1 or lat_hw[0] >= r * least) and (count // r == 1 or lat_hw[1] >= count // r * least)]
        if not grids and count == pieces and pieces > 1:
            return None if whole_fits else plan_tiles(vae, lat_hw, frames, dtype, budget, 1, device_type)
        fitting = [t for t in (Tiles.grid(vae, lat_hw, r, c) for r, c in grids)
                   if tiles_bytes(vae, lat_hw, frames, dtype, t, device_type) <= budget]
        if fitting:
            return min(fitting, key=lambda t: tile_area(vae, lat_hw, t))
    raise RuntimeError(f"no tiling of a {lat_hw} latent fits in {budget / 1e9:.2f} GB of free device memory; "
                       f"free some (e.g. offload the experts) or decode on another device")


def free_bytes(device: torch.device) -> int:
    """Memory a decode can still take: the device's free memory plus what torch's caching allocator
    holds unused (CUDA); the host's available memory otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


# ----------------------------------------------------------------------------- decode
@torch.no_grad()
def decoded_chunks(vae: AutoencoderKLWan, z: Tensor, chunk: int = 1):
    """The decoder over z (B, C, F, h, w) with a fresh causal cache, one call at a time: latent
    frame 0 alone, then `chunk` latent frames per call (1: diffusers' loop). Yields each call's
    (B, C', f, h', w'), unclamped, in time order."""
    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    yield vae.decoder(vae.post_quant_conv(z[:, :, :1]), feat_cache=cache, feat_idx=[0], first_chunk=True)
    for k in range(1, z.shape[2], chunk):
        yield vae.decoder(vae.post_quant_conv(z[:, :, k:k + chunk]), feat_cache=cache, feat_idx=[0])


def decode_frames(vae: AutoencoderKLWan, z: Tensor, chunk: int = 1) -> Tensor:
    """decoded_chunks, concatenated: (B, C', F', h', w'), unclamped."""
    return torch.cat(list(decoded_chunks(vae, z, chunk)), dim=2)


def finish(vae: AutoencoderKLWan, video: Tensor) -> Tensor:
    """Decoder output -> the video (B, 3, F', H, W) in [-1, 1]: unpatchified (Wan2.2) and clamped."""
    if vae.config.patch_size is not None:
        video = vae_unpatchify(video, patch_size=vae.config.patch_size)
    return video.clamp(-1.0, 1.0)


def decode_tile(vae: AutoencoderKLWan, z: Tensor, origin: tuple[int, int], tiles: Tiles | None = None,
                chunk: int = 1) -> Tensor:
    """One tile, decoded frame by frame with a fresh causal cache: (B, C', F', h, w), unclamped."""
    g, (i, j) = tile_geometry(vae, tiles), origin
    return decode_frames(vae, z[:, :, :, i:i + g["lat_h"], j:j + g["lat_w"]], chunk)


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


def blend_tiles(vae: AutoencoderKLWan, rows: list[list[Tensor]], lat_hw: tuple[int, int],
                tiles: Tiles | None = None) -> Tensor:
    """Blend decoded tiles (modified in place, in diffusers' order) into the video (B, 3, F', H, W) in [-1, 1]."""
    g = tile_geometry(vae, tiles)
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
    return finish(vae, torch.cat(out_rows, dim=3)[:, :, :, :height, :width])


def tiled_decode(vae: AutoencoderKLWan, z: Tensor, tiles: Tiles | None = None, chunk: int = 1) -> Tensor:
    """The single-rank reference: every tile here, then the blend (the module's tiles unless given)."""
    rows = [[decode_tile(vae, z, o, tiles, chunk) for o in row] for row in tile_origins(vae, z, tiles)]
    return blend_tiles(vae, rows, z.shape[-2:], tiles)


def send(video: Tensor | None, on_frames) -> Tensor | None:
    """The decoded video, or (on_frames given) handed to on_frames whole, returning None."""
    if on_frames is None or video is None:
        return video
    on_frames(video)
    return None


# ----------------------------------------------------------------------------- the adapter
def default_dtype(device) -> torch.dtype:
    """bf16 on a GPU (diffusers' WanPipeline in bf16 decodes so; bench/vae.py reports its error
    against fp32), fp32 elsewhere (CPUs without bf16 units run it several times slower)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def to_channels_last(vae: AutoencoderKLWan) -> None:
    """Conv weights in channels-last order (NDHWC / NHWC), the layout cuDNN's bf16 kernels read natively."""
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)


class VideoVAE:
    """Normalised latents in, uint8 frames out (and back), in tiles only where memory needs them.

    dtype: the VAE's weights and activations; default_dtype(device) unless given.
    tiling: "auto" (whole when it fits in free memory, else planned tiles), True (fixed tiles:
        `tile`, or diffusers' (256, 192)), False (always whole). `tile` alone means fixed tiles.
    chunk: latent frames per decoder call after the first (1: diffusers' loop; the memory estimate
        assumes 1, a larger chunk takes about chunk times the working set: bench/vae.py measures it).
    channels_last: channels-last activations and conv weights; default on a GPU, where cuDNN's 3-D
        convolutions run faster so (1 x H200, 720p x 81 whole in bf16: 3.74 s against 4.17 s
        channels-first, bench/results/2026-12-02_h200x1_vae.json), off on the CPU.
    """

    def __init__(self, vae: AutoencoderKLWan, device="cpu", dtype: torch.dtype | None = None,
                 tiling: bool | str = "auto", tile: tuple[int, int] | None = None, chunk: int = 1,
                 channels_last: bool | None = None):
        dtype = dtype or default_dtype(device)
        channels_last = torch.device(device).type == "cuda" if channels_last is None else channels_last
        self.vae = vae.eval().requires_grad_(False).to(device)
        if next(self.vae.parameters()).dtype != dtype:  # nn.Module's cast: diffusers' warns on every bf16 one
            torch.nn.Module.to(self.vae, dtype)
        if channels_last:
            to_channels_last(self.vae)
        self.device, self.dtype = torch.device(device), dtype
        self.auto_tiling, self.chunk, self.channels_last = tiling == "auto" and tile is None, chunk, channels_last
        c = vae.config
        self.mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1)
        self.std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1)
        self.vae.use_tiling = False
        if tiling is True or tile is not None:
            size, stride = tile or DEFAULT_TILE
            self.vae.enable_tiling(size, size, stride, stride)

    @property
    def z_dim(self) -> int:
        return self.vae.config.z_dim

    def to_model_space(self, latent: Tensor) -> Tensor:
        """Normalised latent (C, F, H, W) -> the VAE's input (1, C, F, H, W) on its device."""
        z = (latent[None].float() * self.std + self.mean).to(self.device, self.dtype)
        return z.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else z

    @staticmethod
    def to_frames(video: Tensor, host: bool = True) -> Tensor:
        """VAE output (1, 3, F, H, W) in [-1, 1] -> uint8 frames (F, H, W, 3) on the CPU (host=False:
        where they are, contiguous)."""
        video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, F, H, W)
        video = video.permute(1, 2, 3, 0)                                             # (F, H, W, 3)
        return video.cpu() if host else video.contiguous()

    def budget(self) -> float:
        return MEMORY_USE * free_bytes(self.device)

    def decode_plan(self, z: Tensor, pieces: int = 1, budget: float | None = None) -> Tiles | None:
        """The tiles to decode z (B, C, F, h, w) in, None for whole: the module's fixed tiles if tiling
        is on there, else (auto) as plan_tiles picks for `budget` bytes (default: free memory here)."""
        if self.vae.use_tiling:
            return Tiles.of(self.vae) if needs_tiling(self.vae, z) else None
        if not self.auto_tiling:
            return None
        budget = self.budget() if budget is None else budget
        return plan_tiles(self.vae, z.shape[-2:], z.shape[2], self.dtype, budget, pieces, self.device.type)

    @torch.no_grad()
    def decode_raw(self, z: Tensor, tiles: Tiles | None) -> Tensor:
        """The VAE's input z -> the video (1, 3, F', H, W) in [-1, 1]: whole, or in `tiles`."""
        if tiles is None:
            return finish(self.vae, decode_frames(self.vae, z, self.chunk))
        return tiled_decode(self.vae, z, tiles, self.chunk)

    def decode(self, latent: Tensor, on_frames=None) -> Tensor | None:
        """latent (C, F, H, W), normalised -> uint8 frames (F', H', W', 3); whole when it fits.
        on_frames: given, each run of frames goes to on_frames(uint8 (f, H', W', 3), on the device)
        as it is decoded, in time order (an mp4 encoded while the decode runs), and this returns
        None; in tiles, the whole video once at the end."""
        z = self.to_model_space(latent)
        return self.decode_to(z, self.decode_plan(z), on_frames)

    def decode_to(self, z: Tensor, tiles: Tiles | None, on_frames=None) -> Tensor | None:
        """The VAE's input z decoded in `tiles` (None: whole) to uint8 frames, or into on_frames."""
        if on_frames is None or tiles is not None:
            return send(self.to_frames(self.decode_raw(z, tiles)), on_frames)
        for raw in decoded_chunks(self.vae, z, self.chunk):
            on_frames(self.to_frames(finish(self.vae, raw), host=False))
        return None

    @torch.no_grad()
    def encode_pixels(self, x: Tensor) -> Tensor:
        """Pixels (3, F, H, W) in [-1, 1] -> normalised latent (C, F', H', W') fp32 (distribution mode);
        whole when it fits (auto tiling), else in diffusers' default tiles."""
        fixed = self.vae.use_tiling
        if self.auto_tiling and not fixed:
            need = encode_bytes(self.vae, x.shape[-2:], x.shape[1], self.dtype, self.device.type)
            self.vae.use_tiling = need > self.budget()
        try:
            z = self.vae.encode(x[None].to(self.device, self.dtype)).latent_dist.mode().float().cpu()
        finally:
            self.vae.use_tiling = fixed
        return ((z - self.mean) / self.std)[0]

    def encode(self, frames: Tensor) -> Tensor:
        """uint8 frames (F, H, W, 3) -> normalised latent (C, F', H', W') fp32 (distribution mode)."""
        return self.encode_pixels(frames.permute(3, 0, 1, 2).float() / 127.5 - 1)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype: torch.dtype | None = None, stats: dict | None = None,
                        **kw) -> "VideoVAE":
        """diffusers' save_pretrained folder, as its from_pretrained would load it, but built on the
        meta device under paradit's BUILD_LOCK and read by paradit's reader, straight to `device`
        in `dtype` (default_dtype(device) unless given)."""
        from paradit.models.loading import assign_weights, build_on_meta, index_folder, read_tensors
        dtype = dtype or default_dtype(device)
        autoencoder = wan_autoencoder()
        config = autoencoder.load_config(folder)
        vae = build_on_meta(lambda: autoencoder.from_config(config))
        index = index_folder(folder)
        vae = assign_weights(vae, read_tensors(index, index.names, dtype, device, stats=stats), str(folder))
        return cls(vae, device, dtype, **kw)
    @classmethod
    def tiny(cls, z_dim: int = 16, seed: int = 0, device="cpu", **kw) -> "VideoVAE":
        """A randomly initialised VAE of the Wan2.1 kind (z_dim 16, stride 4x8x8) or, for z_dim 48,
        of the Wan2.2 kind (residual blocks, 2x2 pixel patches, stride 4x16x16)."""
        wan_autoencoder()   # diffusers' class, or the error that says it is missing
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

"""The VAE decode spread over a process group: tiles dealt round-robin, blended on group rank 0.

Each rank decodes its share of the tiles of paradit.models.vae.tiled_decode; rank 0 gathers
every tile and runs the same blend, so the video is the single-rank tiled decode's, bit for bit
(tests/test_conditioning.py). Decoding, not blending, is the cost, and it divides by the group size
(up to the tile count: 28 tiles at 720p with diffusers' 256/192-pixel tiles).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from paradit.models.vae import VideoVAE, blend_tiles, decode_tile, needs_tiling, tile_origins
from paradit.parallel.collectives import gather_tensors

Tensor = torch.Tensor


def spread_tiled_decode(vae, z: Tensor, group) -> Tensor | None:
    """tiled_decode(vae, z) with the tiles spread over `group`: the video on group rank 0, else None."""
    origins = tile_origins(vae, z)
    flat = [o for row in origins for o in row]
    me, n = dist.get_rank(group), dist.get_world_size(group)
    mine = [decode_tile(vae, z, o) for o in flat[me::n]]          # tiles me, me + n, ...
    per_rank = gather_tensors(mine, group, like=z)                # on rank 0: per rank, its tiles
    if per_rank is None:
        return None
    tiles = [None] * len(flat)
    for r, rank_tiles in enumerate(per_rank):
        tiles[r::n] = rank_tiles
    cols = len(origins[0])
    return blend_tiles(vae, [tiles[k:k + cols] for k in range(0, len(tiles), cols)], z.shape[-2:])


@torch.no_grad()
def spread_decode(vae: VideoVAE, latent: Tensor, group) -> Tensor | None:
    """VideoVAE.decode over `group` (every member calls): uint8 frames on group rank 0, else None."""
    if group is None or dist.get_world_size(group) == 1:
        return vae.decode(latent)
    z = vae.to_model_space(latent)
    if not needs_tiling(vae.vae, z):                              # one tile: nothing to spread
        return vae.decode(latent) if dist.get_rank(group) == 0 else None
    video = spread_tiled_decode(vae.vae, z, group)
    return None if video is None else vae.to_frames(video)

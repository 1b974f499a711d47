"""The VAE decode spread over a process group: tiles dealt round-robin, blended on group rank 0.

Each rank decodes its share of the tiles of paradit.models.vae.tiled_decode; rank 0 gathers
every tile and runs the same blend, so the video is the single-rank tiled decode's with the same
tiles, bit for bit (tests/test_conditioning.py). Decoding, not blending, is the cost, and it
divides by the group size. Fixed tiles (the module's) are used as they are (28 at 720p with
diffusers' 256/192-pixel tiles); otherwise the latent is cut into a multiple of the group size of
tiles, as few and as large as the smallest free memory in the group allows (at 720p over 8 ranks:
8 tiles of about 90x28 latent pixels, 1.4x the whole latent's work in all, against 28 tiles' 1.65x).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from paradit.models.vae import Tiles, VideoVAE, blend_tiles, decode_tile, send, tile_origins
from paradit.parallel.collectives import gather_tensors

Tensor = torch.Tensor


def spread_tiled_decode(vae, z: Tensor, group, tiles: Tiles | None = None, chunk: int = 1) -> Tensor | None:
    """tiled_decode(vae, z, tiles) with the tiles spread over `group`: the video on group rank 0, else None."""
    origins = tile_origins(vae, z, tiles)
    flat = [o for row in origins for o in row]
    me, n = dist.get_rank(group), dist.get_world_size(group)
    mine = [decode_tile(vae, z, o, tiles, chunk) for o in flat[me::n]]   # tiles me, me + n, ...
    per_rank = gather_tensors(mine, group, like=z)                       # on rank 0: per rank, its tiles
    if per_rank is None:
        return None
    flat_tiles = [None] * len(flat)
    for r, rank_tiles in enumerate(per_rank):
        flat_tiles[r::n] = rank_tiles
    cols = len(origins[0])
    return blend_tiles(vae, [flat_tiles[k:k + cols] for k in range(0, len(flat_tiles), cols)], z.shape[-2:], tiles)


def group_budget(vae: VideoVAE, group) -> float:
    """The smallest decode budget (bytes) in the group, so that every rank plans the same tiles."""
    budget = torch.tensor([vae.budget()], dtype=torch.float64, device=vae.device)
    dist.all_reduce(budget, op=dist.ReduceOp.MIN, group=group)
    return budget.item()


@torch.no_grad()
def spread_decode(vae: VideoVAE, latent: Tensor, group, on_frames=None) -> Tensor | None:
    """VideoVAE.decode over `group` (every member calls): uint8 frames on group rank 0, else None.
    on_frames (group rank 0): as VideoVAE.decode's, frames as they are decoded where the latent is
    decoded whole; the tiles' blend gives the whole video at once."""
    if group is None or dist.get_world_size(group) == 1:
        return vae.decode(latent, on_frames)
    z = vae.to_model_space(latent)
    tiles = vae.decode_plan(z, pieces=dist.get_world_size(group), budget=group_budget(vae, group))
    if tiles is None:                                             # one piece: nothing to spread
        return vae.decode_to(z, None, on_frames) if dist.get_rank(group) == 0 else None
    video = spread_tiled_decode(vae.vae, z, group, tiles, vae.chunk)
    return None if video is None else send(vae.to_frames(video), on_frames)

"""Who does the once-per-request work: the request group, the encoding rank, the decode group.

A request (one prompt, one video) is served by every rank of one data-parallel replica: all mesh
axes but dp. Its first rank encodes the prompt (and the image) once and broadcasts the result over
the request group; the sequence-parallel group that holds the output rank spreads the VAE decode.
So only the first rank of a request needs the text encoder, and only the encoding rank and the
decode group need the VAE.
"""
from __future__ import annotations

import torch.distributed as dist

from paradit.parallel.mesh import Mesh


def request_group(mesh: Mesh):
    """The process group of the ranks that encode this rank's request together: its data-parallel
    replica, or with split experts its stage (the high stage encodes, then hands the embeddings on).
    None in a world of one. Built with the mesh (paradit.parallel.mesh.init_parallel)."""
    return mesh.group("request")


def is_encoder_rank(mesh: Mesh) -> bool:
    """The rank that encodes the prompt and the image for its request: the request group's first
    (of the high-noise stage, with split experts)."""
    group = request_group(mesh)
    return group is None or (mesh.coords["stage"] == 0 and dist.get_rank(group) == 0)


def decode_group(mesh: Mesh) -> tuple[bool, object | None]:
    """(whether this rank takes part in the decode, the group the tiles are spread over).

    The decode group is the sequence-parallel group of the output rank: cfg and chords index 0, in
    the stage that finishes the video. Its rank 0 is the output rank, which gets the frames.
    """
    last_stage = 1 if getattr(mesh, "split", None) is not None else 0
    member = mesh.coords["stage"] == last_stage and mesh.coords["cfg"] == 0 and mesh.coords["chords"] == 0
    return member, (mesh.group("sp") if member else None)


def components_needed(mesh: Mesh) -> set[str]:
    """Which of "text_encoder" and "vae" this rank loads."""
    out = set()
    if is_encoder_rank(mesh):
        out |= {"text_encoder", "vae"}  # the VAE encodes the image of I2V / TI2V requests
    if decode_group(mesh)[0]:
        out.add("vae")
    return out

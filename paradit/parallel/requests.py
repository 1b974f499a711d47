"""Who does the once-per-request work: the request group, the encoding rank, the decode group.

A request (one prompt, one video) is served by every rank of one data-parallel replica: all mesh
axes but dp. Its first rank encodes the prompt (and the image) once and broadcasts the result over
the request group; the sequence-parallel group that holds the output rank spreads the VAE decode.
So only the first rank of a request needs the text encoder, and only the encoding rank and the
decode group need the VAE.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.distributed as dist

from paradit.parallel.mesh import Mesh


def request_group(mesh: Mesh):
    """The process group of the ranks that encode this rank's request together: its data-parallel
    replica, or with split experts its stage (the high stage encodes, then hands the embeddings on).
    None in a world of one. Built with the mesh (paradit.parallel.mesh.init_parallel)."""
    return mesh.group("request")


def decode_group(mesh: Mesh) -> tuple[bool, object | None]:
    """(whether this rank takes part in the decode, the group the tiles are spread over): the
    sequence-parallel group of the output rank (mesh.roles, paradit.plan.placement.rank_roles)."""
    member = mesh.roles.decodes
    return member, (mesh.group("sp") if member else None)


def request_fields(prompt: str, negative_prompt: str | None, settings, image, chords) -> dict:
    """What every rank of a request must pass alike, as plain values (the image by its digest)."""
    fields = {"prompt": prompt, "negative_prompt": negative_prompt, **dataclasses.asdict(settings),
              "chords": None if chords is None else (chords.cores, chords.init, chords.stop)}
    if image is not None:
        fields["image"] = f"{image.width}x{image.height} sha256:{hashlib.sha256(image.tobytes()).hexdigest()[:16]}"
    return fields


def check_same_request(request: dict, group, device) -> None:
    """Every rank of a request group must pass the same request (`request`: its prompt, settings,
    image digest, ... as plain values), or the ranks compute a mix of requests, or hang or abort in a
    collective whose shapes differ. One all-gather of an 8-byte digest, before any other collective
    of the request; where the digests differ, a second gather names the differing values, and every
    rank raises the same ValueError."""
    n = 1 if group is None else dist.get_world_size(group)
    if n == 1:
        return
    text = repr(sorted(request.items()))
    mine = torch.tensor([int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)],
                        dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(every, mine, group=group)
    if all(torch.equal(t, mine) for t in every):
        return
    requests: list = [None] * n
    dist.all_gather_object(requests, request, group=group)
    ranks = dist.get_process_group_ranks(group)
    differ = [k for k in sorted(request) if len({repr(r.get(k)) for r in requests}) > 1]
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {rank} {_short(r.get(k))}" for rank, r in zip(ranks, requests))
                       for k in differ)
    raise ValueError(f"the ranks of one request passed different requests ({detail}); every rank of a request "
                     f"group calls the pipeline together with the same arguments")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

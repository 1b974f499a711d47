"""Sharded experts read from their files, each rank only its shard of every block's tensors.

With weight sharding (paradit.parallel.sharding) a rank keeps 1/group of each block. Reading the
whole expert first, then sharding it, would hold the whole expert on the device (or in host memory)
during the load: 28.6 GB an A14B expert, more than a 40 GB card can spare next to the other one.
Instead the expert is built on the meta device, sharded there (FSDP2 keeps meta parameters on the
meta device), materialised with only the local shards (`to_empty`), and each local shard is read
straight from the safetensors file: FSDP2 shards dim 0 in torch.chunk's pieces, and rows
[r0, r1) of a row-major tensor are one contiguous byte range of the file, so a shard is one
Entry of the reader (offset + r0 * row bytes). The embeddings and the head, kept whole, are read
whole. Bytes read per rank: the blocks / group plus the rest (~2% of an expert).

Each rank reads its own shards (the once-per-node read, paradit.parallel.weights, does not apply:
the shards of one node's ranks are different bytes). LoRAs, merged per whole weight as it is read
(paradit.models.lora), are not sliced: with LoRAs the checkpoint loader reads whole and shards.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from paradit.models.build import BUILD_LOCK, build_on_meta
from paradit.models.loading import CheckpointError, _check_shapes, config_from_checkpoint, index_checkpoint
from paradit.models.reader import Entry, header, read_entries
from paradit.models.transformer import WanTransformer
from paradit.parallel.sharding import apply_weight_sharding


def row_slice(e: Entry, start: int, end: int) -> Entry:
    """Rows [start, end) of dim 0 of a stored row-major tensor, as an Entry of its own."""
    rows = e.shape[0] if e.shape else 1
    row_bytes = e.nbytes // rows if rows else 0
    return dataclasses.replace(e, offset=e.offset + start * row_bytes, nbytes=(end - start) * row_bytes,
                               shape=(end - start, *e.shape[1:]))


def local_rows(size: int, group: int, rank: int) -> tuple[int, int]:
    """The rows of dim 0 a rank keeps: torch.chunk's pieces (ceil(size / group) each, the last ones
    shorter or empty), as FSDP2 shards."""
    chunk = math.ceil(size / group)
    return min(rank * chunk, size), min((rank + 1) * chunk, size)


def load_sharded_expert(path: str | Path, mesh: DeviceMesh, dtype: torch.dtype, device, config=None,
                        stats: dict | None = None, reader=None) -> WanTransformer:
    """A Wan transformer from a diffusers- or original-layout folder, its blocks sharded over the
    1-D `mesh`, this rank reading only its shards (module docstring)."""
    index = index_checkpoint(path)
    cfg = config_from_checkpoint(index, config)
    model = build_on_meta(lambda: WanTransformer(cfg))
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if set(shapes) != set(index.files):
        missing, unexpected = sorted(set(shapes) - set(index.files)), sorted(set(index.files) - set(shapes))
        raise CheckpointError(f"{path} does not match the {cfg.name} architecture: missing {missing[:5]} "
                              f"unexpected {[index.files[n][1] for n in unexpected][:5]}")
    _check_shapes(index, shapes, cfg.name)
    with BUILD_LOCK:
        model = model.to(dtype).eval().requires_grad_(False)
        apply_weight_sharding(model, mesh)          # on the meta device: nothing is allocated yet
        model.to_empty(device=device)               # the local shards and the whole rest, uninitialised
    headers = {file: header(file) for file, _ in index.files.values()}
    entries, out, rank = {}, {}, mesh.get_local_rank()
    for name, p in model.named_parameters():
        file, key = index.files[name]
        e = headers[file][key]
        if isinstance(p, DTensor):
            local = p.to_local()
            start, end = local_rows(e.shape[0], mesh.size(), rank)
            assert local.shape[0] == end - start, (name, local.shape, start, end)
            e = row_slice(e, start, end)
        else:
            local = p.data
        if local.numel():
            entries[name], out[name] = e, local
    read_entries(entries, {n: t.dtype for n, t in out.items()}, device, stats=stats, reader=reader, out=out)
    return model

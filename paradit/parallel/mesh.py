"""The mesh built from a ParallelConfig (paradit.plan.layout): one process's groups.

Rank order, fastest-varying first: ulysses, ring, cfg, chords, stage, dp. Ulysses groups are
consecutive ranks (one NVLink island); ring groups stride over them. The sequence-parallel group
(ring x ulysses) holds token shard number ring_rank * ulysses + ulysses_rank. With weight sharding
the mesh also holds a 1-D DeviceMesh over the sharding group (sp or request), for FSDP2.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from paradit.plan.layout import AXES, ParallelConfig
from paradit.plan.placement import RankRoles, rank_roles


@dataclass(frozen=True)
class Mesh:
    """The groups of one process's layout, every one built by init_parallel (no group is created
    later, so no later call is collective by surprise). Groups are None where the degree is 1 (or
    world is 1). "request": the ranks that serve this rank's request together (its dp replica; its
    stage with split experts), over which the prompt embeddings and the image condition travel."""
    config: ParallelConfig
    device: torch.device
    device_mesh: DeviceMesh | None
    coords: Mapping[str, int]            # this rank's index along each axis
    groups: Mapping[str, object | None]  # axis name, "sp" and "request" -> ProcessGroup or None
    split: ParallelConfig | None = None  # the whole split layout, when this mesh is one stage of it
    # shard_weights: the 1-D DeviceMesh of the group the experts' blocks are sharded over (FSDP2 takes a
    # DeviceMesh), built from that group itself (no new process group); None when weights are whole
    shard_mesh: DeviceMesh | None = None
    # what this rank does besides denoising (encodes, decodes, writes, leads its stage): the planner's
    # pure answer for this rank of the whole layout, computed once here and read everywhere else
    roles: RankRoles = RankRoles(encodes=True, decodes=True, writes=True, leads=True)

    def __post_init__(self):
        object.__setattr__(self, "coords", MappingProxyType(dict(self.coords)))
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))

    def size(self, axis: str) -> int:
        return self.config.sp if axis == "sp" else getattr(self.config, axis, 1)

    def rank(self, axis: str) -> int:
        if axis == "sp":
            return self.coords["ring"] * self.config.ulysses + self.coords["ulysses"]
        return self.coords[axis]

    def group(self, axis: str):
        return self.groups.get(axis)

    @property
    def counts_shard(self) -> bool:
        """Whether this rank's token shard counts in a sum over the request group: one copy of each
        shard does (the first CFG rank of the first CHORDS core group); the other copies add zeros."""
        return self.rank("cfg") == 0 and self.rank("chords") == 0

    @property
    def is_output_rank(self) -> bool:
        """The rank that gets the frames and writes them, one per dp replica (Mesh.roles.writes)."""
        return self.roles.writes


def single_device_mesh(device: torch.device | str = "cpu", config: ParallelConfig | None = None) -> Mesh:
    """The mesh of a world of one (a layout of degree 1 everywhere: its CFG mode is what it sets),
    whether or not a process group exists (references, tests)."""
    return Mesh(config or ParallelConfig(), torch.device(device), None, {a: 0 for a in AXES}, {})


def init_parallel(config: ParallelConfig, device: torch.device | str | None = None,
                  num_heads: int | None = None) -> Mesh:
    """Build the mesh for `config`, every group of it (collective: every rank calls it together).
    Under torchrun with no process group yet, the group is first initialised from torchrun's
    environment (paradit.launch.init_distributed: NCCL with one GPU per local rank, gloo on CPU);
    a world of one needs no group."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from paradit.launch import init_distributed
        device = init_distributed(None if device is None else str(device)).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    config.validate(world, num_heads)
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if world == 1:
        return single_device_mesh(device, config)
    if config.stages is not None:
        return _stage_mesh(config, device)
    shape = dict(dp=config.dp, stage=1, chords=config.chords, cfg=config.cfg, ring=config.ring,
                 ulysses=config.ulysses)
    dm = init_device_mesh(device.type, tuple(shape[a] for a in AXES), mesh_dim_names=AXES)
    request = dist.group.WORLD if config.dp == 1 else dm[AXES[1:]]._flatten("request").get_group()
    return _mesh_from(config, device, dm, shape, request)


def _stage_mesh(config: ParallelConfig, device: torch.device) -> Mesh:
    """Split experts: ranks [0, n_high) form the high-noise stage, the rest the low-noise stage,
    each with a DeviceMesh of its own layout and a request group of its own (every rank builds
    both stages' groups, in the same order)."""
    meshes, first = [], 0
    for k in range(2):
        sc = config.stage_config(k)
        shape = dict(dp=1, stage=1, chords=1, cfg=sc.cfg, ring=sc.ring, ulysses=sc.ulysses)
        ranks = torch.arange(first, first + sc.world_size).reshape(tuple(shape[a] for a in AXES))
        dm = DeviceMesh(device.type, ranks, mesh_dim_names=AXES)
        meshes.append((sc, dm, shape, dist.new_group(list(range(first, first + sc.world_size)))))
        first += sc.world_size
    stage = int(dist.get_rank() >= config.stage_sizes[0])
    sc, dm, shape, request = meshes[stage]
    return _mesh_from(sc, device, dm, shape, request, stage=stage, split=config)


def _mesh_from(config: ParallelConfig, device, dm: DeviceMesh, shape: dict, request, stage: int = 0,
               split: ParallelConfig | None = None) -> Mesh:
    coords = dict(zip(AXES, dm.get_coordinate())) | {"stage": stage}
    groups = {a: dm.get_group(a) for a in AXES if shape[a] > 1}
    if config.ring > 1 and config.ulysses > 1:
        groups["sp"] = dm["ring", "ulysses"]._flatten("sp").get_group()
    else:
        groups["sp"] = groups.get("ring") or groups.get("ulysses")
    groups["request"] = request
    shard = None
    if config.shard_weights in ("sp", "request"):   # validate refused groups of one and "auto"
        shard = DeviceMesh.from_group(groups[config.shard_weights], device.type, mesh_dim_names=("shard",))
    return Mesh(config, device, dm, coords, groups, split, shard, rank_roles(split or config, dist.get_rank()))

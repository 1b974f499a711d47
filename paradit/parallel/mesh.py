"""ParallelConfig (the layout) and the mesh built from it.

Rank order, fastest-varying first: ulysses, ring, cfg, chords, stage, dp. Ulysses groups are
consecutive ranks (one NVLink island); ring groups stride over them. The sequence-parallel group
(ring x ulysses) holds token shard number ring_rank * ulysses + ulysses_rank.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from paradit.parallel.planner import auto_sp  # noqa: F401  (one definition, re-exported here)

AXES = ("dp", "stage", "chords", "cfg", "ring", "ulysses")  # slowest-varying first (DeviceMesh order)
EXPERT_MODES = ("colocated", "split", "auto")


@dataclass(frozen=True)
class ParallelConfig:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    chords: int = 1
    dp: int = 1
    experts: str = "colocated"
    # experts="split": (ulysses, ring, cfg) of the high-noise stage and of the low-noise stage
    stages: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in ("experts", "stages") and (not isinstance(v, int) or v < 1):
                raise ValueError(f"ParallelConfig.{f.name}={v!r}: every degree must be an integer >= 1")
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg={self.cfg}: CFG parallelism splits cond and uncond, so its degree is 1 or 2")
        if self.experts not in EXPERT_MODES:
            raise ValueError(f"experts={self.experts!r}: choose one of {', '.join(EXPERT_MODES)}")
        if (self.experts == "split") != (self.stages is not None):
            raise ValueError("experts='split' needs stages=((ulysses, ring, cfg), (ulysses, ring, cfg)) "
                             "for the high- and low-noise stages, and stages need experts='split'")
        if self.stages is not None:
            if self.sp * self.cfg * self.chords * self.dp != 1:
                raise ValueError("with split experts each stage carries its own layout: give ulysses, ring "
                                 "and cfg per stage in `stages`; chords and dp are not combined with split")
            if len(self.stages) != 2 or any(len(st) != 3 or min(st) < 1 or st[2] > 2 for st in self.stages):
                raise ValueError(f"stages={self.stages}: two (ulysses, ring, cfg) triples, degrees >= 1, cfg 1 or 2")

    def stage_config(self, stage: int) -> "ParallelConfig":
        """The layout of one stage of a split config, as a colocated config of its own."""
        u, r, c = self.stages[stage]
        return ParallelConfig(ulysses=u, ring=r, cfg=c)

    @property
    def stage_sizes(self) -> tuple[int, int]:
        return tuple(u * r * c for u, r, c in self.stages)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        if self.stages is not None:
            return sum(self.stage_sizes)
        return self.ulysses * self.ring * self.cfg * self.chords * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        """A global rank's index along each axis (ulysses fastest), without building a mesh."""
        if self.stages is not None:
            stage = int(rank >= self.stage_sizes[0])
            return self.stage_config(stage).coords(rank - stage * self.stage_sizes[0]) | {"stage": stage}
        out = {}
        for axis in reversed(AXES):
            size = 1 if axis == "stage" else getattr(self, axis)
            rank, out[axis] = divmod(rank, size)
        return out

    def describe(self) -> str:
        if self.stages is not None:
            return " | ".join(f"{name} stage: {self.stage_config(k).describe()} ({n} GPUs)" for k, (name, n)
                              in enumerate(zip(("high-noise", "low-noise"), self.stage_sizes)))
        parts = [f"{k}={getattr(self, k)}" for k in ("ulysses", "ring", "cfg", "chords", "dp") if getattr(self, k) > 1]
        return " x ".join(parts) or "single device"

    def validate(self, world_size: int, num_heads: int | None = None) -> None:
        """Raise ValueError naming the problem and what would fit."""
        if self.world_size != world_size:
            raise ValueError(
                f"layout ulysses={self.ulysses} x ring={self.ring} x cfg={self.cfg} x chords={self.chords} "
                f"x dp={self.dp} needs {self.world_size} processes, but the world has {world_size}. "
                f"Layouts that fit {world_size}: {suggest_layouts(world_size, num_heads)}")
        if self.stages is not None:
            for k in range(2):
                self.stage_config(k).validate(self.stage_config(k).world_size, num_heads)
        elif num_heads is not None and self.ulysses > num_heads:
            raise ValueError(f"ulysses={self.ulysses} is above the model's {num_heads} attention heads "
                             f"(each Ulysses rank needs at least one head); use ring for the rest, e.g. "
                             f"--ulysses {auto_sp(num_heads, self.sp)[0]} --ring {auto_sp(num_heads, self.sp)[1]}")


def suggest_layouts(world: int, num_heads: int | None = None, limit: int = 4) -> str:
    out = []
    for cfg, dp in itertools.product((2, 1), (1, 2, 4, 8)):
        if world % (cfg * dp):
            continue
        sp = world // (cfg * dp)
        flags = [f"--sp {sp}"] if sp > 1 else []
        flags += ["--cfg-par 2"] if cfg == 2 else []
        flags += [f"--dp {dp}"] if dp > 1 else []
        out.append(" ".join(flags) or "(no flags)")
        if len(out) == limit:
            break
    return "; ".join(out)


@dataclass
class Mesh:
    """The groups of one process's layout. Groups are None where the degree is 1 (or world is 1)."""
    config: ParallelConfig
    device: torch.device
    device_mesh: DeviceMesh | None
    coords: dict[str, int]           # this rank's index along each axis
    groups: dict[str, object | None]  # axis name (and "sp") -> ProcessGroup or None
    split: ParallelConfig | None = None  # the whole split layout, when this mesh is one stage of it

    def size(self, axis: str) -> int:
        return self.config.sp if axis == "sp" else getattr(self.config, axis, 1)

    def rank(self, axis: str) -> int:
        if axis == "sp":
            return self.coords["ring"] * self.config.ulysses + self.coords["ulysses"]
        return self.coords[axis]

    def group(self, axis: str):
        return self.groups.get(axis)

    @property
    def is_output_rank(self) -> bool:
        """One rank per dp replica writes outputs: the first of its sp, cfg and chords groups (of the
        low-noise stage, where the video is finished, when experts are split)."""
        last_stage = 1 if self.split is not None else 0
        return self.coords["stage"] == last_stage and all(
            self.coords[a] == 0 for a in ("ulysses", "ring", "cfg", "chords"))


def single_device_mesh(device: torch.device | str = "cpu") -> Mesh:
    """The mesh of a world of one, whether or not a process group exists (references, tests)."""
    return Mesh(ParallelConfig(), torch.device(device), None, {a: 0 for a in AXES}, {})


def init_parallel(config: ParallelConfig, device: torch.device | str | None = None,
                  num_heads: int | None = None) -> Mesh:
    """Build the mesh for `config` inside an initialised process group (or a world of one)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    config.validate(world, num_heads)
    device = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    if world == 1:
        return single_device_mesh(device)
    if config.stages is not None:
        return _stage_mesh(config, device)
    shape = dict(dp=config.dp, stage=1, chords=config.chords, cfg=config.cfg, ring=config.ring,
                 ulysses=config.ulysses)
    dm = init_device_mesh(device.type, tuple(shape[a] for a in AXES), mesh_dim_names=AXES)
    return _mesh_from(config, device, dm, shape)


def _stage_mesh(config: ParallelConfig, device: torch.device) -> Mesh:
    """Split experts: ranks [0, n_high) form the high-noise stage, the rest the low-noise stage,
    each with a DeviceMesh of its own layout (every rank builds both, in the same order)."""
    meshes, first = [], 0
    for k in range(2):
        sc = config.stage_config(k)
        shape = dict(dp=1, stage=1, chords=1, cfg=sc.cfg, ring=sc.ring, ulysses=sc.ulysses)
        ranks = torch.arange(first, first + sc.world_size).reshape(tuple(shape[a] for a in AXES))
        meshes.append((sc, DeviceMesh(device.type, ranks, mesh_dim_names=AXES), shape))
        first += sc.world_size
    stage = int(dist.get_rank() >= config.stage_sizes[0])
    sc, dm, shape = meshes[stage]
    mesh = _mesh_from(sc, device, dm, shape)
    mesh.coords["stage"] = stage
    mesh.split = config
    return mesh


def _mesh_from(config: ParallelConfig, device, dm: DeviceMesh, shape: dict) -> Mesh:
    coords = dict(zip(AXES, dm.get_coordinate()))
    groups = {a: dm.get_group(a) for a in AXES if shape[a] > 1}
    if config.ring > 1 and config.ulysses > 1:
        groups["sp"] = dm["ring", "ulysses"]._flatten("sp").get_group()
    else:
        groups["sp"] = groups.get("ring") or groups.get("ulysses")
    return Mesh(config, device, dm, coords, groups)

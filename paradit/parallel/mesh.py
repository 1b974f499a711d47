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

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "experts" and (not isinstance(v, int) or v < 1):
                raise ValueError(f"ParallelConfig.{f.name}={v!r}: every degree must be an integer >= 1")
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg={self.cfg}: CFG parallelism splits cond and uncond, so its degree is 1 or 2")
        if self.experts not in EXPERT_MODES:
            raise ValueError(f"experts={self.experts!r}: choose one of {', '.join(EXPERT_MODES)}")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg * self.chords * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        """A global rank's index along each axis (ulysses fastest), without building a mesh."""
        out = {}
        for axis in reversed(AXES):
            size = 1 if axis == "stage" else getattr(self, axis)
            rank, out[axis] = divmod(rank, size)
        return out

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("ulysses", "ring", "cfg", "chords", "dp") if getattr(self, k) > 1]
        return " x ".join(parts) or "single device"

    def validate(self, world_size: int, num_heads: int | None = None) -> None:
        """Raise ValueError naming the problem and what would fit."""
        if self.world_size != world_size:
            raise ValueError(
                f"layout ulysses={self.ulysses} x ring={self.ring} x cfg={self.cfg} x chords={self.chords} "
                f"x dp={self.dp} needs {self.world_size} processes, but the world has {world_size}. "
                f"Layouts that fit {world_size}: {suggest_layouts(world_size, num_heads)}")
        if num_heads is not None and self.ulysses > num_heads:
            raise ValueError(f"ulysses={self.ulysses} is above the model's {num_heads} attention heads "
                             f"(each Ulysses rank needs at least one head); use ring for the rest, e.g. "
                             f"--ulysses {auto_sp(num_heads, self.sp)[0]} --ring {auto_sp(num_heads, self.sp)[1]}")


def auto_sp(num_heads: int, sp: int) -> tuple[int, int]:
    """Split sp into (ulysses, ring): the largest Ulysses degree dividing both sp and the head count."""
    u = max(d for d in range(1, sp + 1) if sp % d == 0 and num_heads % d == 0)
    return u, sp // u


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
        """One rank per dp replica writes outputs: the first of its sp, cfg and chords groups."""
        return all(self.coords[a] == 0 for a in ("ulysses", "ring", "cfg", "chords", "stage"))


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
    shape = dict(dp=config.dp, stage=1, chords=config.chords, cfg=config.cfg, ring=config.ring,
                 ulysses=config.ulysses)
    dm = init_device_mesh(device.type, tuple(shape[a] for a in AXES), mesh_dim_names=AXES)
    coords = dict(zip(AXES, dm.get_coordinate()))
    groups = {a: dm.get_group(a) for a in AXES if shape[a] > 1}
    if config.ring > 1 and config.ulysses > 1:
        groups["sp"] = dm["ring", "ulysses"]._flatten("sp").get_group()
    else:
        groups["sp"] = groups.get("ring") or groups.get("ulysses")
    return Mesh(config, device, dm, coords, groups)

"""The machines the planner knows: GPU specs, and the efficiency factors measured on them.

Pure Python, no torch. calibration.json, next to this file, holds the factors bench/scaling.py fits.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from paradit.errors import ParameterError
from paradit.settings import check_int, check_number

GB = 1e9
GIB = 2**30
MAX_GPUS = 512                       # the most GPUs one plan considers: the split search grows as gpus^2 (512: ~3 s)


@dataclass(frozen=True)
class GPUSpec:
    """One GPU kind. Override any field with `GPUS["h100"].replace(hbm_gb=48)`."""
    name: str
    matmul_tflops: float           # measured-style dense bf16 GEMM rate, TFLOP/s
    hbm_gb: float                  # capacity as the vendor names it: really GiB (an H100 80GB: 79.1 GiB to torch)
    hbm_tbps: float                # HBM bandwidth, TB/s
    nvlink_gbps: float             # GPU to GPU inside a node, unidirectional, per GPU, GB/s (NVLink, or PCIe: `link`)
    usable_fraction: float = 0.97  # what torch's allocator may fill of it (ECC, firmware, fragmentation)
    gpus_per_node: int = 8         # one NVLink island
    internode_gbps: float = 50.0   # per GPU across nodes: one 400 Gb/s NIC
    host_link_gbps: float = 64.0   # GPU <-> host (PCIe Gen5 x16), one direction, raw
    link: str = "nvlink"           # what carries nvlink_gbps: "nvlink", or "pcie" (no NVLink on the card)

    @property
    def usable_gb(self) -> float:
        """1e9-byte GB a process may take (the CUDA context and NCCL included: Calibration.context_gb)."""
        return self.hbm_gb * GIB / GB * self.usable_fraction

    def __post_init__(self):
        for name in ("matmul_tflops", "hbm_gb", "hbm_tbps", "nvlink_gbps", "internode_gbps"):
            check_number(name, getattr(self, name), 0.0, 1e9, low_open=True)
        check_number("usable_fraction", self.usable_fraction, 0.0, 1.0, low_open=True)
        check_int("gpus_per_node", self.gpus_per_node, 1, MAX_GPUS)
        if self.link not in ("nvlink", "pcie"):
            raise ParameterError("link", self.link, "choose 'nvlink' or 'pcie'")

    def replace(self, **changes) -> "GPUSpec":
        return dataclasses.replace(self, **changes)


# Sources. matmul: 790 TFLOP/s, as measured for large bf16 matmuls on H100/H200 (datasheet dense bf16 peak
# 989); B200 datasheet dense bf16 2250 (HGX, 1000 W), taken at the same ~80% -> 1800.
# HBM and NVLink: NVIDIA datasheets (NVLink 4: 900 GB/s bidirectional per GPU, NVLink 5:
# 1.8 TB/s). HBM sizes are the vendor figures, which are GiB: an H100 80GB shows torch 79.1 GiB
# (84.9e9 bytes); usable_gb reads them so, and the memory model's margin is its own calibrated
# context_gb and the 3% usable_fraction keeps back, not a unit slip. Inter-node: ConnectX-7 400 Gb/s per GPU in DGX H100/H200/B200.
# Host link: the H100 SXM, H200 and HGX B200 datasheets give "PCIe Gen5: 128 GB/s"
# (bidirectional), i.e. 64 GB/s per direction (32 GT/s x 16 lanes, 128b/130b); pinned
# cudaMemcpyAsync reaches ~80% of it (Calibration.host_link_efficiency; bench/startup.py measures).
#
# The cards below are not measured here: public datasheet figures, matmul taken at the same ~80% of
# the dense bf16 (FP32-accumulate) tensor peak as H100's measured 790 of 989. Their calibration is
# the default until bench/rank_local.py fits one on the card.
#   A100 SXM4 (NVIDIA A100 datasheet): bf16 312 TFLOP/s -> 250; 40 GB HBM2 at 1.555 TB/s, 80 GB HBM2e
#     at 2.039 TB/s; NVLink 3 600 GB/s bidirectional -> 300; PCIe Gen4 x16 host link, 32 GB/s a direction.
#   L40S (NVIDIA L40S datasheet): bf16 362 TFLOP/s dense -> 290; 48 GB GDDR6 at 864 GB/s; no NVLink:
#     GPU to GPU over PCIe Gen4 x16 (64 GB/s bidirectional -> 32).
#   RTX 4090 (Ada whitepaper): FP16/bf16 tensor with FP32 accumulate 165 TFLOP/s dense -> 132; 24 GB
#     GDDR6X at 1.008 TB/s; PCIe Gen4 x16, and no peer-to-peer on GeForce: GPU to GPU goes through host
#     memory, about half the link -> 16 GB/s.
#   RTX 5090 (Blackwell GeForce whitepaper): FP16/bf16 tensor with FP32 accumulate 209.5 TFLOP/s dense
#     -> 168; 32 GB GDDR7 at 1.792 TB/s; PCIe Gen5 x16 (64 GB/s a direction), no peer-to-peer -> 32.
PCIE4, PCIE5 = 32.0, 64.0          # host link, GB/s one direction, raw
GPUS: Mapping[str, GPUSpec] = MappingProxyType({
    "h100": GPUSpec("h100", matmul_tflops=790.0, hbm_gb=80.0, hbm_tbps=3.35, nvlink_gbps=450.0),
    "h200": GPUSpec("h200", matmul_tflops=790.0, hbm_gb=141.0, hbm_tbps=4.8, nvlink_gbps=450.0),
    "b200": GPUSpec("b200", matmul_tflops=1800.0, hbm_gb=180.0, hbm_tbps=8.0, nvlink_gbps=900.0),
    "a100-40g": GPUSpec("a100-40g", matmul_tflops=250.0, hbm_gb=40.0, hbm_tbps=1.555, nvlink_gbps=300.0,
                        host_link_gbps=PCIE4),
    "a100-80g": GPUSpec("a100-80g", matmul_tflops=250.0, hbm_gb=80.0, hbm_tbps=2.039, nvlink_gbps=300.0,
                        host_link_gbps=PCIE4),
    "l40s": GPUSpec("l40s", matmul_tflops=290.0, hbm_gb=48.0, hbm_tbps=0.864, nvlink_gbps=PCIE4,
                    host_link_gbps=PCIE4, link="pcie"),
    "4090": GPUSpec("4090", matmul_tflops=132.0, hbm_gb=24.0, hbm_tbps=1.008, nvlink_gbps=PCIE4 / 2,
                    host_link_gbps=PCIE4, link="pcie"),
    "5090": GPUSpec("5090", matmul_tflops=168.0, hbm_gb=32.0, hbm_tbps=1.792, nvlink_gbps=PCIE5 / 2,
                    host_link_gbps=PCIE5, link="pcie"),
})


def gpu_preset(device_name: str, memory_gb: float) -> str:
    """The preset of a CUDA device from its name (and memory, for A100 40 / 80 GB); h100 if unknown."""
    name = device_name.lower()
    if "a100" in name:
        return "a100-80g" if memory_gb > 60 else "a100-40g"
    return next((k for k in ("b200", "h200", "h100", "l40s", "5090", "4090") if k in name), "h100")


def available_host_gb(meminfo: str = "/proc/meminfo") -> float | None:
    """This machine's available memory (the kernel's MemAvailable: free memory and the page cache it can
    reclaim; a checkpoint on tmpfs is not in it), GB; None where the kernel does not say (not Linux)."""
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024 / GB
    except (OSError, KeyError, ValueError):
        return None


def host_options(info) -> dict:
    """The host figures a launcher read (paradit.launch.DistInfo: host_gb, the least memory available over
    the world's hosts, and ranks_per_host), as make_problem takes them: offload modes whose pinned copies
    do not fit are ruled out. A figure the info lacks or does not know (None) is not checked."""
    return dict(host_gb=getattr(info, "host_gb", None), ranks_per_host=getattr(info, "ranks_per_host", None))


@dataclass(frozen=True)
class Calibration:
    """Efficiency factors (fractions of the GPUSpec rates) and small fixed costs."""
    source: str = "built-in defaults"
    memory_source: str = "built-in defaults"   # where the memory constants below come from
    video_source: str = "built-in defaults"    # where the time-to-video constants below come from
    matmul_efficiency: float = 0.65
    attention_efficiency: float = 0.65
    elementwise_efficiency: float = 0.5
    comm_efficiency: float = 0.7
    collective_latency_us: float = 20.0    # alpha of one collective or ring send
    gemm_half_rows: int = 256              # GEMM rows at which efficiency halves
    layer_overhead_us: float = 50.0        # launches and syncs per block and forward
    min_tokens_per_rank: int = 256         # below this a rank's kernels are launch-bound
    ring_overlap: float = 0.7              # share of ring transfer time attention can hide
    host_link_efficiency: float = 0.8      # pinned host -> GPU copies, share of host_link_gbps
    # memory (paradit.plan.memory): what torch's allocator holds at its peak, and what it cannot use
    overhead_gb: float = 1.0               # allocated besides weights and working sets (latents, workspaces)
    activation_scale: float = 1.0          # x the per-token working set of a block (plan.model.activation_gb)
    decode_scale: float = 1.0              # x the VAE decode's estimated working set (plan.model.vae_gb)
    lora_merge_gb: float = 0.6             # the LoRA merge's device workspace (fp32 weight and delta, the LoRA)
    context_gb: float = 1.0                # outside the allocator: CUDA context, NCCL buffers
    # time to video (paradit.plan.video): start-up, decode and write rates
    weights_gbps: float = 8.5              # checkpoint (warm page cache) -> GPU, per rank
    offload_setup_gbps: float = 2.2        # building an offloaded component's pinned host copy
    lora_merge_gbps: float = 14.0          # weights a LoRA merge passes through, on the GPU
    encode_s: float = 0.5                  # one prompt encode (umT5), the weights resident
    decode_s_per_gpix: float = 65.6        # VAE decode seconds per 1e9 output pixel-frames, one rank
    write_s_per_gpix: float = 50.9         # mp4 write (H.264) seconds per 1e9 pixel-frames
    per_gpu: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        """Efficiencies and shares are fractions in (0, 1]; rates and scales > 0 (they divide or
        multiply); costs finite and >= 0 (the source names where the values came from)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_efficiency", "_overlap")):
                check_number(f.name, v, 0.0, 1.0, low_open=f.name.endswith("_efficiency"))
            elif f.name.endswith(("_gbps", "_scale")):
                check_number(f.name, v, 0.0, 1e9, low_open=True)
            elif f.name not in ("source", "memory_source", "video_source", "per_gpu"):
                check_number(f.name, v, 0.0, 1e9)
        for gpu, overrides in self.per_gpu.items():
            dataclasses.replace(self, **overrides, per_gpu={})  # the same checks, per GPU kind

    def for_gpu(self, name: str) -> "Calibration":
        """These factors with the overrides measured on GPU `name` applied."""
        return dataclasses.replace(self, **self.per_gpu.get(name, {}), per_gpu={})


DEFAULT_CALIBRATION = os.path.join(os.path.dirname(__file__), "calibration.json")


def load_calibration(path: str | None = None) -> Calibration:
    """Read a calibration JSON (default: the one shipped next to this file).

    Keys are Calibration's fields; an optional "gpus": {"h100": {...}, ...} holds overrides
    measured per GPU kind.
    """
    path = path or DEFAULT_CALIBRATION
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ParameterError("calibration", path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ParameterError("calibration", path, f"not a readable JSON file ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("gpus", {}), dict) or not all(
            isinstance(v, dict) for v in raw.get("gpus", {}).values()):
        raise ParameterError("calibration", path, 'expected a JSON object of factors, with an optional '
                             '"gpus": {"h100": {...}} of per-GPU objects')
    names = {f.name for f in dataclasses.fields(Calibration)} - {"per_gpu"}
    per_gpu = raw.pop("gpus", {})
    unknown = set(raw) - names | {k for v in per_gpu.values() for k in v} - names
    if unknown:
        raise ParameterError("calibration", path, f"unknown calibration keys {sorted(unknown)}; known: {sorted(names)}")
    try:
        return Calibration(**{"source": path, **raw}, per_gpu=per_gpu)
    except ParameterError as err:
        raise ParameterError("calibration", path, f"bad value {err}") from None


def rewrite_calibration(path: str, base_path: str | None, edit) -> None:
    """The calibration at base_path (default: the shipped one), changed in place by edit(raw) on its
    JSON object, written to path and read back (so a bad edit fails here, not in the next plan).
    The benchmarks that fit factors write through this; the library only reads."""
    with open(base_path or DEFAULT_CALIBRATION) as f:
        raw = json.load(f)
    edit(raw)
    with open(path, "w") as f:
        f.write(json.dumps(raw, indent=2) + "\n")
    load_calibration(path)

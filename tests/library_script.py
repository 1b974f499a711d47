"""Run under torchrun (4 processes, gloo): the library's Pipeline under split experts, CHORDS and DP
gives the colocated single-device latent. Every rank checks what it holds; exit 1 on a mismatch."""
import sys

import torch
import torch.distributed as dist

from paradit import Pipeline, WanConfig
from paradit.parallel import ParallelConfig
from paradit.parallel.mesh import single_device_mesh
from paradit.pipeline import tiny_components
from paradit.settings import ChordsSettings

RTOL = 1e-5  # fp32, the same math in another order (split attention and CFG, shards): rounding only
PROMPTS = ["a red circle moving left", "a blue square moving up"]
KW = dict(width=80, height=48, frames=9, seed=7, progress=False, output="latent")  # 45 tokens: divides nothing


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> int:
    cfg = WanConfig.preset("tiny")
    ref = Pipeline(cfg, *tiny_components(cfg, "cpu", torch.float32), mesh=single_device_mesh())  # world 1
    failures = []

    def check(what: str, latent, expected) -> None:
        err = rel_err(latent, expected)
        if not err < RTOL:
            failures.append(f"rank {dist.get_rank()}: {what}: relative error {err:.2e}")

    # split experts, stage sizes from the step split (tiny: 6 of 8 steps high-noise -> 3 + 1 ranks)
    split = Pipeline.from_pretrained("tiny", parallel=ParallelConfig(experts="split"))
    assert split.mesh.split.stage_sizes == (3, 1), split.mesh.split
    for prompt in PROMPTS:
        latent = split(prompt, **KW)
        if split.mesh.coords["stage"] == 1:
            check(f"split {prompt!r}", latent, ref(prompt, **KW))
        elif latent is not None:
            failures.append(f"rank {dist.get_rank()}: the high stage returned a latent")
    # CHORDS: two core groups of two sequence-parallel ranks against the cores in turn on one device
    chords = ChordsSettings(2, stop=None)
    pipe = Pipeline.from_pretrained("tiny", parallel=ParallelConfig(ulysses=2, chords=2))
    check("CHORDS", pipe(PROMPTS[0], chords=chords, **KW), ref(PROMPTS[0], chords=chords, **KW))
    # data parallel: each replica its own prompt
    pipe = Pipeline.from_pretrained("tiny", parallel=ParallelConfig(ring=2, dp=2))
    mine = PROMPTS[pipe.mesh.rank("dp")]
    check("DP", pipe(mine, **KW), ref(mine, **KW))
    for line in failures:
        print(line, file=sys.stderr)
    dist.barrier()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run under torchrun (2 processes) by tests/test_library.py: each rank passes a request that differs
from its peer's in one value, under the layout where that used to go wrong; every rank must refuse
with the same message naming the value, without a hang or an abort. Then from_pretrained's own
arguments. Prints one line per case: CASE ok MESSAGE, or CASE FAILED why."""
import sys

import torch.distributed as dist

from paradit.pipeline import Pipeline
from paradit.plan import ParallelConfig

KW = dict(width=48, height=32, frames=5, steps=2, output="latent", progress=False)
CASES = [  # (name, layout, the argument that differs, its value on rank 0 and rank 1)
    ("seed", dict(ulysses=2), "seed", (1, 2)),              # mixed one latent of two seeds
    ("steps", dict(cfg=2), "steps", (2, 3)),                # returned a latent on rank 0, no error
    ("size", dict(ring=2), "width", (48, 64)),              # SIGABRT in gloo
    ("prompt", dict(ulysses=2), "prompt", ("a red circle", "a blue square")),
]


def say(line: str) -> None:
    """One write per line: the ranks share one pipe, and print() writes the text and its newline
    apart, so two ranks' lines could run together (seen once in a full run)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check(name: str, call, expect: str) -> None:
    try:
        call()
    except ValueError as err:
        ok = expect in str(err)
        say(f"{name} {'ok' if ok else 'FAILED'} {err}")
        return
    say(f"{name} FAILED: no error")


def main():
    for name, layout, arg, values in CASES:
        pipe = Pipeline.from_pretrained("tiny", parallel=ParallelConfig(**layout))
        kw = KW | {"prompt": "a red circle"} | {arg: values[dist.get_rank()]}
        check(name, lambda: pipe(**kw), f"{arg}: rank 0 {values[0]!r}, rank 1 {values[1]!r}")
    check("experts_needed", lambda: Pipeline.from_pretrained("tiny", experts_needed={5}), "experts_needed={5}")
    check("components", lambda: Pipeline.from_pretrained("tiny", components="/tmp"), "components='/tmp'")
    check("build seed", lambda: Pipeline.from_pretrained("tiny", seed=-1), "seed=-1")


if __name__ == "__main__":
    main()

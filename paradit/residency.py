"""Offload modes and the expert residency schedule: which expert is on the GPU at each evaluation.

Plain Python, no torch: the planner and the CLI's checks use the modes; paradit.offload executes
the schedule with real copies.

Modes (`offload=` in the library, `--offload` on the command line):
  none          every component this rank holds stays on its device
  text-encoder  umT5 lives in (pinned) host memory and is copied to the GPU for each request's
                prompt encode, then released
  experts       a rank holding both Wan2.2 experts keeps them in host memory and has one on the
                GPU at a time (a rank holding one expert keeps it resident: nothing to swap)
  all           both
  layers        the text encoder as with text-encoder, and every expert in host memory: each
                evaluation streams its expert's blocks to the GPU a few blocks ahead on a side
                stream, each block freed after it runs (paradit.streaming); the idle expert never
                leaves host memory. For GPUs that cannot hold one expert with its activations
  auto          the planner's choice (the fastest mode that fits); "none" on a CPU

The schedule. A rank's evaluations of one request use experts in a known order: the high-noise
expert for its leading steps, then the low-noise one (expert_at over the timesteps; with CHORDS
the static schedule of this rank's core). With a switch at evaluation s:
  * the outgoing expert is released after its last evaluation (s - 1);
  * the incoming one is prefetched `lead` evaluations ahead, before evaluation s - lead. lead 0
    (the default) issues it right after the release, so only one expert is ever resident; the
    copy streams block by block on a side stream and each block waits only for its own weights,
    so a step waits for the first block's copy, not the whole expert's;
  * after the last evaluation the last expert is released and the request's first expert is
    prefetched again, for the next request (the copy overlaps the decode and the next encode).
"""
from __future__ import annotations

from dataclasses import dataclass

from paradit.settings import quant_parts

OFFLOAD_MODES = ("auto", "none", "text-encoder", "experts", "all", "layers")


def check_offload(mode: str, flag: str = "offload") -> str:
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"{flag}={mode!r}: choose one of {', '.join(OFFLOAD_MODES)}")
    return mode


def offloads_text_encoder(mode: str) -> bool:
    return check_offload(mode) in ("text-encoder", "all", "layers")


def offloads_experts(mode: str) -> bool:
    """Whole experts swapped at the switch (ExpertResidency)."""
    return check_offload(mode) in ("experts", "all")


def streams_layers(mode: str) -> bool:
    """Experts streamed block by block every evaluation (paradit.streaming.LayerResidency)."""
    return check_offload(mode) == "layers"


def moves_experts(mode: str) -> bool:
    """Whether `mode` moves experts (or their blocks) between host and GPU."""
    return offloads_experts(mode) or streams_layers(mode)


def runs_with_quant(mode: str, quant: str) -> bool:
    """Whether offload `mode` runs with FP8 mode `quant` (paradit.settings.QUANT_MODES): not where `quant` makes
    FP8 weights (fp8, fp8-all: the linear layers) and `mode` moves experts, whose host buffers
    (paradit.offload.HostWeights, streamed ones too) hold their loaded dtype's tensors. fp8-attention
    quantises no weight (q, k and v inside the kernel), so its experts move as loaded, with every mode.
    The one rule: paradit.models.quant.check_quant refuses by it, and the planner's offload "auto" picks
    no mode it rules out."""
    return "linears" not in quant_parts(quant) or not moves_experts(mode)


def experts_on_host(mode: str, held: int) -> bool:
    """Whether a rank holding `held` experts keeps them in host memory under `mode`."""
    return (offloads_experts(mode) and held > 1) or streams_layers(mode)


@dataclass(frozen=True)
class Action:
    """One residency change: `op` ("prefetch" | "release") of `expert`, `when` ("before" |
    "after") evaluation `index`."""
    when: str
    index: int
    op: str
    expert: int


def residency_plan(sequence: list[int], lead: int = 0) -> list[Action]:
    """The prefetches and releases of one request whose evaluations use experts `sequence`, in
    the order they run. The sequence must switch expert at most once (see the module docstring)."""
    if not sequence:
        return []
    if lead < 0:
        raise ValueError(f"lead={lead}: the prefetch lead is a number of evaluations >= 0")
    switches = [i for i in range(1, len(sequence)) if sequence[i] != sequence[i - 1]]
    if len(switches) > 1:
        raise ValueError(f"offloading experts needs each rank's evaluations to switch expert at most "
                         f"once; this request switches {len(switches)} times (CHORDS cores run in turn "
                         f"on one group alternate experts): use offload='text-encoder' or 'none', or "
                         f"one core group per CHORDS core")
    first, last = sequence[0], sequence[-1]
    plan = [Action("before", 0, "prefetch", first)]
    if switches:
        s, end = switches[0], len(sequence) - 1
        release = Action("after", s - 1, "release", first)
        if lead:  # ahead of the switch: both experts resident for `lead` evaluations
            plan += [Action("before", max(s - lead, 0), "prefetch", last), release]
        else:     # right after the release: one expert resident at a time
            plan += [release, Action("before", s, "prefetch", last)]
        # back to the first expert, for the next request
        plan += [Action("after", end, "release", last), Action("after", end, "prefetch", first)]
    return sorted(plan, key=lambda a: (a.index, a.when == "after"))


def residency_at(plan: list[Action], length: int, start: frozenset = frozenset()) -> list[frozenset]:
    """The experts on the GPU while each evaluation runs (after its "before" actions), from a plan."""
    state, out = set(start), []
    for i in range(length):
        for a in plan:
            if a.index == i and a.when == "before":
                (state.add if a.op == "prefetch" else state.discard)(a.expert)
        out.append(frozenset(state))
        for a in plan:
            if a.index == i and a.when == "after":
                (state.add if a.op == "prefetch" else state.discard)(a.expert)
    return out

"""Layers offload (`offload="layers"`): every expert in host memory, each evaluation streaming its
expert to the GPU block by block, a few blocks ahead of the one running.

Built on paradit.offload.HostWeights (one host buffer per chunk: the embeddings and the rest, each
block, the head; read straight from the checkpoint into them, or copied in): LayerResidency keeps
the ExpertResidency interface the Denoiser drives (begin, before, after, end). For an evaluation of
expert k:
  * before: the embeddings and the head, and the first LEAD blocks, are copied on a side stream;
    the compute stream waits for the embeddings; a later forward of the same evaluation (CFG in
    turn) copies its first LEAD blocks again as it starts;
  * as block i starts (a forward pre-hook): the compute stream waits for block i's copy, and block
    i + LEAD's copy is issued, so that it runs while blocks i .. i + LEAD - 1 compute;
  * as block i ends (a forward hook): its device copy is freed;
  * after: the embeddings and the head are freed.
So a rank holds on the GPU, at its fullest, the embeddings, the head and 1 + LEAD blocks of the
running expert (`window_bytes`); the idle expert never leaves host memory. Copies are allocated on
the compute stream (memory a finished block frees is reused in order) and written on the side
stream, which first waits for the compute stream. On the CPU the copies are plain and synchronous:
the same schedule runs, which is what the CPU tests check.

The hooks are installed once, on every held expert's blocks, and act only for the expert running.
With CFG in turn (the layout's cfg_mode "in-turn", which the planner picks with layers offload
where the batched forward's activations do not fit) a step is two forwards, each streaming the
expert: the first blocks are copied again as the second forward starts.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from paradit.offload import HostWeights, expert_chunks, host_weights_of

LEAD = 2   # blocks copied ahead of the one running: a block's copy hides behind two blocks' compute


class LayerResidency:
    def __init__(self, experts: list, device, lead: int = LEAD):
        if lead < 1:
            raise ValueError(f"lead={lead}: layers offload copies at least one block ahead")
        self.held = [k for k, m in enumerate(experts) if m is not None]
        self.active = True
        self.device, self.lead = torch.device(device), lead
        self.weights = {k: host_weights_of(experts[k]) or HostWeights(experts[k], device, expert_chunks(experts[k]))
                        for k in self.held}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.resident: set[int] = set()
        self.running: int | None = None
        self.pending: dict[int, object] = {}     # chunk -> the event of a copy nobody has waited for
        self.on_device: set[int] = set()         # chunks of the running expert on the device (or on their way)
        self.copied_bytes = 0                    # host -> device, since construction
        self.log: list[tuple[int, str]] = []     # (expert, "stream" | "release")
        self._hooks = [h for k in self.held for h in self._install(k, experts[k])]

    def host_bytes(self) -> int:
        return sum(w.bytes for w in self.weights.values())

    def window_bytes(self, k: int) -> int:
        """Device bytes of expert k at the fullest moment of an evaluation (module docstring)."""
        sizes = [b.tensor.numel() for b in self.weights[k].buffers]     # [rest, block 0 .. N-1, head]
        return sizes[0] + sizes[-1] + sum(sorted(sizes[1:-1], reverse=True)[:1 + self.lead])

    # ---------------------------------------------------------------- the Denoiser's interface
    def begin(self, sequence: list[int]) -> None:
        missing = sorted(set(sequence) - set(self.held))
        assert not missing, f"the schedule needs expert(s) {missing}, not held on this rank"

    def end(self) -> None:
        if self.running is not None:
            self.after(self.running)

    def before(self, k: int) -> None:
        assert self.running is None, f"expert {self.running} is still streaming"
        self.running = k
        for c in (0, self._blocks(k) + 1):      # the embeddings and the head, for the whole evaluation
            self._copy(k, c)
        self._ahead(k, 1)                       # the first blocks, behind the embeddings
        self._wait(0)
        self.resident = {k}

    def skip(self, k: int) -> None:
        """An evaluation the step cache serves without running expert k: nothing to stream."""
        assert self.running is None, f"expert {self.running} is still streaming"

    def after(self, k: int) -> None:
        assert self.running == k, (self.running, k)
        for c in list(self.pending):     # copied but never used (an error mid-forward): wait before freeing
            self._wait(c)
        self.weights[k].release()
        self.running, self.resident, self.on_device = None, set(), set()
        self.log.append((k, "release"))

    # ---------------------------------------------------------------- mechanics
    def _blocks(self, k: int) -> int:
        return len(self.weights[k].chunks) - 2

    def _copy(self, k: int, c: int) -> None:
        if c in self.on_device:
            return
        self.pending[c] = self.weights[k].chunk_to_device(c, self.stream)
        self.on_device.add(c)
        self.copied_bytes += self.weights[k].buffers[c].tensor.numel()

    def _ahead(self, k: int, c: int) -> None:
        """Blocks c .. c + LEAD - 1 on the device or on their way (the blocks are chunks 1 .. N)."""
        for b in range(c, min(c + self.lead, self._blocks(k) + 1)):
            self._copy(k, b)

    def _wait(self, c: int) -> None:
        event = self.pending.pop(c, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _install(self, k: int, expert: nn.Module) -> list:
        hooks = []
        for i, block in enumerate(expert.blocks):
            hooks.append(block.register_forward_pre_hook(functools.partial(self._block_starts, k, i + 1)))
            hooks.append(block.register_forward_hook(functools.partial(self._block_ends, k, i + 1)))
        hooks.append(expert.head.register_forward_pre_hook(functools.partial(self._head_starts, k)))
        return hooks

    @torch.compiler.disable
    def _block_starts(self, k: int, c: int, module, args) -> None:
        if self.running != k:
            return
        if c == 1:   # a forward starts (CFG in turn: two a step): its first blocks, if the last one freed them
            self._ahead(k, 1)
            self.log.append((k, "stream"))
        self._wait(c)
        if c + self.lead <= self._blocks(k):
            self._copy(k, c + self.lead)

    @torch.compiler.disable
    def _block_ends(self, k: int, c: int, module, args, out) -> None:
        if self.running == k:
            self.weights[k].chunk_release(c)
            self.on_device.discard(c)

    @torch.compiler.disable
    def _head_starts(self, k: int, module, args) -> None:
        if self.running == k:
            self._wait(self._blocks(k) + 1)


def weights_on_device(expert: nn.Module, host: HostWeights) -> int:
    """Bytes of the storages `expert`'s tensors point at now, other than its host buffers: what it
    holds on the device (measured from the tensors themselves)."""
    on_host = {b.tensor.untyped_storage().data_ptr() for b in host.buffers}
    storages = {}
    for t in [*expert.parameters(), *expert.buffers()]:
        s = t.untyped_storage()
        if s.data_ptr() not in on_host:
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())

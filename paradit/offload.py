"""Offload mechanics: a module's weights kept in pinned host memory, copied to the GPU when used.

HostWeights holds one module's parameters and buffers in host buffers, one per chunk (pinned on
CUDA), and points the module at device copies while it is resident. An expert (or the text encoder)
loaded for offload is read straight into its host buffers (offload_on_load: allocated for the
meta-built model, filled by the checkpoint reader, kept on the module for the residencies below); a
module already in memory is copied in. ExpertResidency executes the schedule of
paradit.residency for the experts a rank holds; TextEncoderResidency puts umT5 on the GPU for
the prompt encode only. Both are driven explicitly by the pipeline (Pipeline.velocity,
Pipeline.encode_prompts); the model code knows nothing of them.

How a prefetch runs on CUDA: the device buffers are allocated on the compute (current) stream,
so that memory freed by the outgoing expert is reused at once; a side stream waits for the compute
stream, then copies chunk by chunk (the embeddings, each block, the head), recording one event per
chunk. The first evaluation after a prefetch waits for the embeddings' event, and each block and
the head wait for their own event through a forward pre-hook installed for that one evaluation:
the waits are on the GPU (the host keeps launching), and a block's copy (~0.7 GB for A14B, ~14 ms
over PCIe Gen5) hides behind the previous block's compute. On the CPU the "device copy" is a plain
tensor copy and there are no streams or events: the same schedule runs, synchronously.
"""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from paradit.models.pinned import PinnedBuffer
from paradit.residency import Action, residency_plan

log = logging.getLogger("paradit")


class HostWeights:
    """The tensors of `module` in host memory (pinned on CUDA), one flat buffer per chunk. chunks:
    submodules copied (and waited for) one by one, in this order, after the tensors outside them.

    A module built on the meta device gets its buffers allocated and is pointed at them, their
    contents left for the caller to fill (the checkpoint reader reads an offloaded expert straight
    into them: paradit.models.loading.load_transformer's `host`); a module with its weights is copied
    in, chunk by chunk, freeing what it held as it goes.

    A buffer per chunk, not one pinned tensor per weight: torch's pinned allocator rounds every
    request up to a power of two (a 141.6 MB A14B FFN weight takes 256 MB), which made an A14B
    expert need ~42 GB of pinned memory instead of 28.6. Each chunk goes to the GPU as one transfer
    into one device allocation, from one page-locked registration (paradit.models.pinned.PinnedBuffer)."""

    def __init__(self, module: nn.Module, device, chunks: list[nn.Module] = (), pin: bool = True):
        """pin=False (a module on the meta device): the buffers are page-locked by `pin()`, once
        filled (PinnedBuffer's pin=False); the first copy to the device pins them if nothing did."""
        t0 = time.perf_counter()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        tensors, self.refs = _unique_tensors(module)               # per tensor: where the module holds it
        meta = [t.is_meta for t in tensors]
        assert all(meta) or not any(meta), "a module partly on the meta device"
        assert pin or all(meta), "a module's own weights are copied into memory pinned first"
        self.pin_now = pin
        index = {id(t): i for i, t in enumerate(tensors)}
        claimed: set[int] = set()
        self.chunks: list[list[int]] = []                           # tensor indices per chunk; rest first
        for chunk in chunks:
            ids = [index[id(t)] for t in _tensors(chunk) if index[id(t)] not in claimed]
            claimed |= set(ids)
            self.chunks.append(ids)
        self.chunks.insert(0, [i for i in range(len(tensors)) if i not in claimed])
        self.chunk_modules = [None, *chunks]
        self.ranges, sizes = _layout(tensors, self.chunks)
        self.bytes = sum(sizes)
        self.host: list[torch.Tensor | None] = [None] * len(tensors)
        if self.cuda:
            check_host_memory(sum(t.numel() * t.element_size() for t in tensors if t.device.type != "cpu"))
        # chunk by chunk (a few at once: page-locking faults the pages in, the copies are bounded by
        # memory bandwidth), so that the tensors a chunk held are freed as its buffer fills: moving
        # an expert into pinned memory needs one chunk's bytes beyond the expert's
        with ThreadPoolExecutor(max_workers=8 if all(meta) else 4) as pool:
            self.buffers = list(pool.map(lambda c: self._fill(c, sizes[c], tensors), range(len(self.chunks))))
        self.resident = False
        self.setup_s = time.perf_counter() - t0       # allocating (page-locking) and, with weights, copying

    def _fill(self, c: int, nbytes: int, tensors: list[torch.Tensor]):
        buffer = PinnedBuffer(nbytes, self.pin_now) if self.cuda else _Buffer(nbytes)
        for i in self.chunks[c]:
            host = self._view(buffer.tensor, i, tensors[i])
            if not tensors[i].is_meta:
                host.copy_(tensors[i].detach())
            self.host[i] = host
            # Pointed at its host copy at once, so that the tensor it held (a host copy that is not
            # pinned, say) is freed now
            self._point_one(i, host)
            tensors[i] = None
        return buffer

    @property
    def pinned(self) -> bool:
        return not self.cuda or all(b.pinned for b in self.buffers)

    def pin(self) -> float:
        """Page-lock the buffers left unpinned (a few at once); returns the seconds it took."""
        t0 = time.perf_counter()
        if not self.pinned:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda b: b.pin(), self.buffers))
        seconds = time.perf_counter() - t0
        self.setup_s += seconds
        return seconds

    def _view(self, flat: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
        start, end = self.ranges[i]
        return flat[start:end].view(like.dtype).view(like.shape)

    def _point_one(self, i: int, t: torch.Tensor) -> None:
        first = None                    # a meta parameter is replaced, by one Parameter for all its names
        for owner, kind, key in self.refs[i]:
            if kind == "_buffers":
                owner._buffers[key] = t
            elif owner._parameters[key].is_meta:
                if first is None:
                    first = nn.Parameter(t, requires_grad=owner._parameters[key].requires_grad)
                owner._parameters[key] = first
            else:
                owner._parameters[key].data = t

    def to_device(self, stream=None) -> list:
        """Device copies of every tensor, the module pointed at them; returns one CUDA event per
        chunk (empty on the CPU, where the copy is done when this returns)."""
        events = [self.chunk_to_device(c, stream) for c in range(len(self.chunks))]
        self.resident = True
        return [e for e in events if e is not None]

    def chunk_to_device(self, c: int, stream=None):
        """A device copy of chunk `c` (one transfer), its tensors pointed at it; its CUDA event, or
        None (the CPU, or no side stream: the copy is ordered on the compute stream)."""
        if not self.pinned:
            self.pin()
        flat = torch.empty(self.buffers[c].tensor.numel(), dtype=torch.uint8, device=self.device)  # compute stream
        event = None
        if self.cuda and stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            flat.copy_(self.buffers[c].tensor, non_blocking=self.cuda)
            if self.cuda and stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        for i in self.chunks[c]:
            self._point_one(i, self._view(flat, i, self.host[i]))
        return event

    def chunk_release(self, c: int) -> None:
        """Point chunk `c`'s tensors back at their host copies; its device copy is freed."""
        for i in self.chunks[c]:
            self._point_one(i, self.host[i])

    def release(self) -> None:
        """Point the module back at the host copies; the device copies are freed."""
        for c in range(len(self.chunks)):
            self.chunk_release(c)
        self.resident = False


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _layout(tensors: list[torch.Tensor], chunks: list[list[int]]) -> tuple[list[tuple[int, int]], list[int]]:
    """The byte range of every tensor in its chunk's buffer (256-byte aligned, for any dtype's view)
    and each chunk's buffer size."""
    ranges, sizes = [(0, 0)] * len(tensors), []
    for ids in chunks:
        end = 0
        for i in ids:
            n = tensors[i].numel() * tensors[i].element_size()
            ranges[i] = (end, end + n)
            end = _align(end + n, 256)
        sizes.append(end)
    return ranges, sizes


def expert_chunks(expert: nn.Module) -> list[nn.Module]:
    """How an expert's host copy is cut: each block, then the head (the embeddings are the rest)."""
    return [*expert.blocks, expert.head]


def host_weights_of(module: nn.Module) -> "HostWeights | None":
    """The HostWeights a module was loaded into (offload_on_load), if any."""
    return getattr(module, _HOST_ATTR, None)


def text_encoder_chunks(model: nn.Module) -> list[nn.Module]:
    """How umT5's host copy is cut: each block (the embeddings and final norm are the rest)."""
    return list(getattr(getattr(model, "encoder", None), "block", []))


def offload_on_load(device, chunks: Callable[[nn.Module], list[nn.Module]] = expert_chunks, pin: bool = False) \
        -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """For load_transformer(host=...) (and TextEncoder.from_pretrained's, with text_encoder_chunks):
    a meta-built module's host buffers, allocated and kept on the module (host_weights_of), its
    tensors by name for the reader to fill; page-locked once filled (HostWeights.pin: the reading
    threads fault the pages in as they write, no pass of its own), or at once with pin=True (where
    the reader copies tensors back from the GPU into them: a LoRA's merge, a cast)."""
    def host(module: nn.Module) -> dict[str, torch.Tensor]:
        weights = HostWeights(module, device, chunks(module), pin=pin)
        object.__setattr__(module, _HOST_ATTR, weights)     # not a submodule: no state, no hooks
        return {**module.state_dict()}
    return host


_HOST_ATTR = "_paradit_host_weights"


def then_pinned(load: Callable, *args, **kw):
    """load(*args, **kw) (load_transformer, TextEncoder.from_pretrained), its host buffers (given by
    offload_on_load) page-locked once the read has filled them, in the loading thread."""
    loaded = load(*args, **kw)
    weights = host_weights_of(getattr(loaded, "model", loaded))
    if weights is not None:
        weights.pin()
    return loaded


def _unique_tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[list[tuple[nn.Module, str, str]]]]:
    """Every parameter and buffer of `module` once (tied weights are one tensor), with the
    (owner, kind, name) places that hold it."""
    tensors, refs, found = [], [], {}
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(owner, kind).items():
                if t is None:
                    continue
                if id(t) not in found:
                    found[id(t)] = len(tensors)
                    tensors.append(t)
                    refs.append([])
                refs[found[id(t)]].append((owner, kind, key))
    return tensors, refs


def check_host_memory(nbytes: int, margin: float = 2e9) -> None:
    """Refuse, before any copy, to page-lock more host memory than the machine has available
    (the kernel would kill the process part-way, with no message). Tensors already in host memory
    are not counted: they move into the pinned buffers chunk by chunk, freeing their own bytes."""
    from paradit.plan.hardware import GB, available_host_gb
    available = available_host_gb()
    if available is None:   # not Linux: nothing to ask
        return
    available *= GB
    if nbytes > available - margin:
        raise MemoryError(f"offload needs {nbytes / 1e9:.1f} GB of page-locked host memory and the machine "
                          f"has {available / 1e9:.1f} GB available: free host memory (a checkpoint on tmpfs "
                          f"counts), or offload fewer components (offload='text-encoder' or 'none')")


class _Buffer:
    """Plain host memory (the CPU: no page locking)."""

    def __init__(self, nbytes: int):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


class ExpertResidency:
    """The experts of one rank, at most one on the GPU at a time (with lead 0), following
    paradit.residency.residency_plan. A rank holding one expert keeps it where it is (inactive)."""

    def __init__(self, experts: list, device, lead: int = 0):
        self.held = [k for k, m in enumerate(experts) if m is not None]
        self.active = len(self.held) > 1
        self.device, self.lead = torch.device(device), lead
        # read straight into host memory by the loader (offload_on_load), or copied there now
        self.weights = {k: host_weights_of(experts[k]) or HostWeights(experts[k], device, expert_chunks(experts[k]))
                        for k in self.held} if self.active else {}
        cuda = self.device.type == "cuda" and self.active
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.resident: set[int] = set(self.held) if not self.active else set()
        self.pending: dict[int, list] = {}     # prefetched experts whose copy nobody has waited for
        self.hooks: list = []
        self.plan: list[Action] | None = None
        self.sequence: list[int] = []
        self.index = 0
        self.log: list[tuple[int, str, int]] = []   # (evaluation index, op, expert), as they ran

    def host_bytes(self) -> int:
        return sum(w.bytes for w in self.weights.values())

    # ---------------------------------------------------------------- one request
    def begin(self, sequence: list[int]) -> None:
        """A request whose evaluations use experts `sequence`, in order; checked before any runs."""
        if not self.active:
            return
        missing = sorted(set(sequence) - set(self.held))
        assert not missing, f"the schedule needs expert(s) {missing}, not held on this rank"
        self.plan, self.sequence, self.index = residency_plan(sequence, self.lead), list(sequence), 0

    def end(self) -> None:
        self._unhook()
        self.plan, self.sequence, self.index = None, [], 0

    def before(self, k: int) -> None:
        """Before an evaluation with expert k: the plan's prefetches, then the waits for k's copy."""
        if not self.active:
            return
        if self.plan is None or self.index >= len(self.sequence):   # outside a request (warm-up)
            for other in sorted(self.resident - {k}):
                self._release(other)
            self._prefetch(k)
        else:
            assert self.sequence[self.index] == k, (self.index, k, self.sequence)
            self._run("before")
        assert k in self.resident, f"expert {k} is not resident at evaluation {self.index}"
        self._wait(k)

    def skip(self, k: int) -> None:
        """An evaluation of expert k that the step cache serves without running it: the plan's
        prefetches and releases at this evaluation still run in their places. Never a wait: the
        first evaluation of an expert is always computed, so k is already resident."""
        self.before(k)
        self.after(k)

    def after(self, k: int) -> None:
        if not self.active:
            return
        self._unhook()
        if self.plan is not None and self.index < len(self.sequence):
            self._run("after")
            self.index += 1

    # ---------------------------------------------------------------- mechanics
    def _run(self, when: str) -> None:
        for a in self.plan:
            if a.index == self.index and a.when == when:
                (self._prefetch if a.op == "prefetch" else self._release)(a.expert)

    def _prefetch(self, k: int) -> None:
        if k in self.resident:
            return
        self.pending[k] = self.weights[k].to_device(self.stream)
        self.resident.add(k)
        self.log.append((self.index, "prefetch", k))

    def _release(self, k: int) -> None:
        if k not in self.resident:
            return
        if k in self.pending:   # copied but never used: the compute stream must not reuse the
            for ev in self.pending.pop(k):   # memory while the side stream still writes it
                torch.cuda.current_stream(self.device).wait_event(ev)
        self.weights[k].release()
        self.resident.discard(k)
        self.log.append((self.index, "release", k))

    def _wait(self, k: int) -> None:
        events = self.pending.pop(k, None)
        if not events:
            return
        torch.cuda.current_stream(self.device).wait_event(events[0])   # embeddings, used first
        for module, ev in zip(self.weights[k].chunk_modules[1:], events[1:]):
            self.hooks.append(module.register_forward_pre_hook(_waiter(ev)))

    def _unhook(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def _waiter(event):
    @torch.compiler.disable
    def wait(module, args):
        torch.cuda.current_stream().wait_event(event)
    return wait


class TextEncoderResidency:
    """umT5 in host memory, on the GPU only inside `on_device()` (the prompt encode)."""

    def __init__(self, text_encoder, device):
        model = text_encoder.model         # read into host memory by the loader, or copied there now
        self.weights = host_weights_of(model) or HostWeights(model, device, text_encoder_chunks(model))
        text_encoder.device = torch.device(device)      # where the token ids and the output go
        self.copies = 0

    @contextlib.contextmanager
    def on_device(self):
        self.weights.to_device()          # on the compute stream: the encode needs all of it now
        self.copies += 1
        try:
            yield
        finally:
            self.weights.release()

"""Collectives as pure functions of (tensors, group, split sizes), and the delicate merges.

Uneven splits are first class: a token count or head count that the degree does not divide is
split as evenly as possible (the first n % parts ranks get one more), never padded into the math.
Every call that is given a `Traffic` counter (the runtime owns one, paradit.parallel.runtime) records
what it moved there (bytes sent by this rank, and the call count), for the sidecar.

The functions that talk to the process group are `torch.compiler.disable`d: inside compiled blocks
(--compile) they run eagerly between the compiled regions. Traced, the traffic counter (Python state
that changes on every call) would fail dynamo's guards and rebuild the graph at every block call.
"""
from __future__ import annotations

import math
import torch
import torch.distributed as dist

Tensor = torch.Tensor

class Traffic:
    """What this rank sent through collectives: op name -> [bytes, number of calls]."""

    def __init__(self):
        self.ops: dict[str, list[int]] = {}

    def count(self, op: str, nbytes: int) -> None:
        entry = self.ops.setdefault(op, [0, 0])
        entry[0] += int(nbytes)
        entry[1] += 1

    def clear(self) -> None:
        self.ops.clear()

    def snapshot(self) -> dict[str, list[int]]:
        return {op: list(v) for op, v in self.ops.items()}


def _count(traffic: Traffic | None, op: str, nbytes: int) -> None:
    if traffic is not None:
        traffic.count(op, nbytes)


def even_split(n: int, parts: int) -> list[int]:
    base, rem = divmod(n, parts)
    return [base + (i < rem) for i in range(parts)]


def offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


@torch.compiler.disable
def all_to_all_uneven(chunks: list[Tensor], recv_numel: list[int], group,
                      traffic: Traffic | None = None) -> list[Tensor]:
    """Send chunks[j] to group rank j; receive recv_numel[j] elements from rank j (flat, 1-D)."""
    send = torch.cat([c.reshape(-1) for c in chunks])
    recv = send.new_empty(sum(recv_numel))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_numel,
                           input_split_sizes=[c.numel() for c in chunks], group=group)
    _count(traffic, "all_to_all", (send.numel() - chunks[dist.get_rank(group)].numel()) * send.element_size())
    return list(recv.split(recv_numel))


def seq_to_heads(x: Tensor, group, seq_sizes: list[int], head_sizes: list[int],
                 traffic: Traffic | None = None) -> Tensor:
    """Ulysses forward: scatter heads, gather tokens, in ONE all-to-all.

    x: (P, B, S_me, H, D), P packed tensors (q, k, v) -> (P, B, sum(seq_sizes), H_me, D)
    """
    me = dist.get_rank(group)
    p, b, _, _, d = x.shape
    h_off = offsets(head_sizes)
    chunks = [x[:, :, :, h_off[j]:h_off[j] + head_sizes[j]] for j in range(len(head_sizes))]
    recv = all_to_all_uneven(chunks, [p * b * s * head_sizes[me] * d for s in seq_sizes], group, traffic)
    return torch.cat([r.view(p, b, s, head_sizes[me], d) for r, s in zip(recv, seq_sizes)], dim=2)


def heads_to_seq(x: Tensor, group, seq_sizes: list[int], head_sizes: list[int],
                 traffic: Traffic | None = None) -> Tensor:
    """Ulysses inverse: (B, sum(seq_sizes), H_me, D) -> (B, S_me, H, D)."""
    me = dist.get_rank(group)
    b, _, h_me, d = x.shape
    chunks = list(x.split(seq_sizes, dim=1))  # chunk j: the tokens rank j owns, my heads
    recv = all_to_all_uneven(chunks, [b * seq_sizes[me] * h * d for h in head_sizes], group, traffic)
    return torch.cat([r.view(b, seq_sizes[me], h, d) for r, h in zip(recv, head_sizes)], dim=2)


@torch.compiler.disable
def all_gather_uneven(x: Tensor, group, sizes: list[int], dim: int = 0, traffic: Traffic | None = None) -> Tensor:
    """Concatenate every rank's x along `dim`, where rank j holds sizes[j] entries of that dim."""
    if group is None:
        return x
    x = x.movedim(dim, 0).contiguous()
    pad = max(sizes) - x.shape[0]  # all_gather needs equal shapes; the padding is cut off below
    xp = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    bufs = [torch.empty_like(xp) for _ in sizes]
    dist.all_gather(bufs, xp, group=group)
    _count(traffic, "all_gather", xp.numel() * xp.element_size() * (len(sizes) - 1))
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)]).movedim(0, dim)


@torch.compiler.disable
def all_gather_equal(x: Tensor, group, traffic: Traffic | None = None) -> list[Tensor]:
    bufs = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(bufs, x.contiguous(), group=group)
    _count(traffic, "all_gather", x.numel() * x.element_size() * (len(bufs) - 1))
    return bufs


def agreed_sum(x: Tensor, group, traffic: Traffic | None = None) -> Tensor:
    """The sum over `group` of every rank's x (a few numbers), the same bits on every rank: gathered,
    then added in rank order. An all-reduce promises equal values, not equal bits on every rank, and
    a decision taken from the sum (the step cache's skip) must come out the same everywhere."""
    if group is None:
        return x
    parts = all_gather_equal(x, group, traffic)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


class RingComm:
    """One send to the next rank and one receive from the previous, in flight together.

    Usage per ring step: `send_recv(t, shape)` then, after overlapping work, `wait()`.
    Misuse (a second send before waiting, waiting with nothing in flight) raises.
    """

    def __init__(self, group, traffic: Traffic | None = None):
        self.group, self.traffic = group, traffic
        me, n = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (me + 1) % n)
        self.prev = dist.get_global_rank(group, (me - 1) % n)
        self._reqs, self._buf = None, None

    @torch.compiler.disable
    def send_recv(self, t: Tensor, recv_shape) -> None:
        if self._reqs is not None:
            raise RuntimeError("RingComm.send_recv called twice without wait()")
        t = t.contiguous()
        self._buf = t.new_empty(recv_shape)
        ops = [dist.P2POp(dist.isend, t, self.next, self.group),
               dist.P2POp(dist.irecv, self._buf, self.prev, self.group)]
        self._reqs = dist.batch_isend_irecv(ops)
        _count(self.traffic, "ring_p2p", t.numel() * t.element_size())

    @torch.compiler.disable
    def wait(self) -> Tensor:
        if self._reqs is None:
            raise RuntimeError("RingComm.wait called with no send_recv in flight")
        for r in self._reqs:
            r.wait()
        buf, self._reqs, self._buf = self._buf, None, None
        return buf


def lse_merge(out: Tensor | None, lse: Tensor | None, blk_out: Tensor, blk_lse: Tensor):
    """Merge two softmax-normalised partial attentions over disjoint key sets, in fp32.

    out, blk_out: (B, S, H, D) fp32; lse, blk_lse: (B, H, S). With m = logaddexp(lse, blk_lse):
    softmax over the union = exp(lse - m) * out + exp(blk_lse - m) * blk_out.
    """
    blk_out, blk_lse = blk_out.float(), blk_lse.float()
    if out is None:
        return blk_out, blk_lse
    new = torch.logaddexp(lse, blk_lse)
    w_old = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)     # (B, S, H, 1)
    w_blk = torch.exp(blk_lse - new).transpose(1, 2).unsqueeze(-1)
    return out * w_old + blk_out * w_blk, new


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance in fp32: v = v_u + g (v_c - v_u)."""
    vc, vu = v_cond.float(), v_uncond.float()
    return vu + guidance * (vc - vu)


def broadcast_from_first(x: Tensor | None, shape, dtype: torch.dtype, device, group,
                         traffic: Traffic | None = None) -> Tensor:
    """Group rank 0's x on every rank of `group` (the others pass None); x itself without a group.

    Used for what one rank computes once per request (text embeddings, the image condition).
    """
    if group is None:
        return x
    if dist.get_rank(group) == 0:
        assert x is not None and tuple(x.shape) == tuple(shape), (None if x is None else x.shape, shape)
        x = x.to(device=device, dtype=dtype).contiguous()
        _count(traffic, "broadcast", x.numel() * x.element_size() * (dist.get_world_size(group) - 1))
    else:
        x = torch.empty(shape, dtype=dtype, device=device)
    dist.broadcast(x, group=group, group_src=0)
    return x


def gather_tensors(tensors: list[Tensor], group, like: Tensor,
                   traffic: Traffic | None = None) -> list[list[Tensor]] | None:
    """Every rank's list of tensors (any count and shapes; like's dtype and device) on group rank 0.

    Returns, on rank 0, one list per rank in rank order; None on the other ranks. The shapes travel
    first (a small object all-gather), then one flat buffer per rank, padded to the longest.
    """
    n, me = dist.get_world_size(group), dist.get_rank(group)
    shapes: list = [None] * n
    dist.all_gather_object(shapes, [tuple(t.shape) for t in tensors], group=group)
    sizes = [sum(math.prod(s) for s in per_rank) for per_rank in shapes]
    flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else like.new_empty(0)  # (sizes[me],)
    flat = torch.cat([flat, flat.new_zeros(max(sizes) - flat.numel())])                   # (max(sizes),)
    bufs = [torch.empty_like(flat) for _ in range(n)] if me == 0 else None
    dist.gather(flat, bufs, group=group, group_dst=0)
    if me != 0:
        _count(traffic, "gather", flat.numel() * flat.element_size())
        return None
    out = []
    for buf, per_rank in zip(bufs, shapes):
        offs = offsets([math.prod(s) for s in per_rank])
        out.append([buf[o:o + math.prod(s)].view(s) for o, s in zip(offs, per_rank)])
    return out

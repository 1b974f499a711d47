"""Sequence-parallel self-attention: Ulysses, Ring, and both at once, exact for any size.

Each rank holds a contiguous token shard (B, S_me, H, D) of q, k, v.
  Ulysses (degree U): one packed all-to-all turns token shards into head shards covering the
    U-group's whole token block; attention runs locally on H/U heads; the inverse all-to-all
    returns token shards. Uneven head counts split as evenly as possible.
  Ring (degree R): K/V blocks travel around the ring; each step's local attention overlaps the
    next block's transfer; partial outputs merge by log-sum-exp in fp32.
  Both: Ulysses inside consecutive ranks, Ring across the Ulysses groups on the gathered blocks.
The shard sizes of the current sequence are set by the runtime (`set_split`) before a forward.
"""
from __future__ import annotations

import torch

from paradit.parallel.collectives import RingComm, Traffic, even_split, heads_to_seq, lse_merge, seq_to_heads
from paradit.parallel.mesh import Mesh

Tensor = torch.Tensor


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group, block_sizes: list[int], attn_lse,
                   traffic: Traffic | None = None) -> Tensor:
    """q, k, v: (B, S_r, h, D), this rank's block r of block_sizes; returns (B, S_r, h, D)."""
    comm = RingComm(group, traffic)
    n, me = len(block_sizes), torch.distributed.get_rank(group)
    kv = torch.stack([k, v])                                   # (2, B, S_r, h, D): one message
    out = lse = None
    for step in range(n):
        if step < n - 1:  # start the next block's transfer before computing on this one
            src = (me - step - 1) % n
            comm.send_recv(kv, (2, kv.shape[1], block_sizes[src], *kv.shape[3:]))
        blk_out, blk_lse = attn_lse(q, kv[0], kv[1])
        out, lse = lse_merge(out, lse, blk_out, blk_lse)
        if step < n - 1:
            kv = comm.wait()
    return out.to(q.dtype)


def local_heads(mesh: Mesh, num_heads: int) -> int:
    """The heads this rank's local attention kernel sees: its Ulysses share (uneven counts split as
    evenly as possible), all of them under Ring alone or no sequence parallelism."""
    u = mesh.size("ulysses")
    return even_split(num_heads, u)[mesh.rank("ulysses")] if u > 1 else num_heads


class SequenceParallelAttention:
    """The attention seam for a mesh: callable (q, k, v) -> out, all (B, S_me, H, D)."""

    def __init__(self, mesh: Mesh, attn, attn_lse, traffic: Traffic | None = None):
        self.mesh, self.traffic = mesh, traffic
        self.u, self.r = mesh.size("ulysses"), mesh.size("ring")
        self.attn, self.attn_lse = attn, attn_lse
        self.shard_sizes: list[int] | None = None

    def set_split(self, shard_sizes: list[int]) -> None:
        """Token count of every sp shard, in sp-rank order (ring-major, ulysses-minor)."""
        assert len(shard_sizes) == self.u * self.r, (shard_sizes, self.u, self.r)
        self.shard_sizes = list(shard_sizes)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        assert self.shard_sizes is not None, "set_split() must run before a sequence-parallel forward"
        u, r = self.u, self.r
        ring_rank = self.mesh.rank("ring")
        u_sizes = self.shard_sizes[ring_rank * u:(ring_rank + 1) * u]      # my Ulysses group's shards
        blocks = [sum(self.shard_sizes[i * u:(i + 1) * u]) for i in range(r)]  # ring block per ring rank
        if u > 1:
            heads = even_split(q.shape[2], u)
            qkv = seq_to_heads(torch.stack([q, k, v]), self.mesh.group("ulysses"), u_sizes, heads, self.traffic)
            q, k, v = qkv.unbind(0)                               # (B, S_block, H_me, D) each
        if r > 1:
            out = ring_attention(q, k, v, self.mesh.group("ring"), blocks, self.attn_lse, self.traffic)
        else:
            out = self.attn(q, k, v)
        if u > 1:
            out = heads_to_seq(out.contiguous(), self.mesh.group("ulysses"), u_sizes, heads, self.traffic)
        return out

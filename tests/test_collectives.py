"""The pieces: packed all-to-all round trip, LSE merge, ring with uneven shards, CFG combine."""
import math

import pytest
import torch

from paradit.launch import spawn
from paradit.models.attention import math_attention_lse
from paradit.parallel.collectives import cfg_combine, even_split, lse_merge
from workers import collectives_checks


def test_even_split_is_balanced_and_complete():
    assert even_split(105, 4) == [27, 26, 26, 26]
    assert even_split(40, 16) == [3] * 8 + [2] * 8
    assert sum(even_split(75600, 32)) == 75600


def test_lse_merge_equals_softmax_over_all_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 8, generator=g) for _ in range(3))
    ref, ref_lse = math_attention_lse(q, k, v)
    out = lse = None
    for ks, vs in zip(k.split([2, 4, 3], dim=1), v.split([2, 4, 3], dim=1)):  # uneven key blocks
        out, lse = lse_merge(out, lse, *math_attention_lse(q, ks, vs))
    # fp32 merge of three partial softmaxes: rounding only, ~1e-7 relative
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)


def test_cfg_combine():
    c, u = torch.randn(5, dtype=torch.bfloat16), torch.randn(5, dtype=torch.bfloat16)
    out = cfg_combine(c, u, 4.0)
    assert out.dtype == torch.float32  # guidance is combined in fp32 whatever the model dtype
    torch.testing.assert_close(out, u.float() + 4.0 * (c.float() - u.float()))
    torch.testing.assert_close(cfg_combine(c, u, 1.0), c.float())


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_round_trip_and_ring_with_uneven_shards(world):
    for rank, r in enumerate(spawn(collectives_checks, world, timeout_s=120)):
        assert r["gathered_ok"], f"rank {rank}: seq_to_heads did not scatter heads / gather tokens"
        assert r["round_trip_ok"], f"rank {rank}: heads_to_seq(seq_to_heads(x)) != x"
        assert r["ring_err"] < 1e-5, f"rank {rank}: ring attention differs ({r['ring_err']:.2e})"
        assert math.isfinite(r["ring_err"])

"""Expert placement and rank roles as pure functions of a layout, against the mesh's own definitions."""
import pytest

from paradit.launch import spawn
from paradit.plan import ParallelConfig
from paradit.plan.placement import RankRoles, chords_experts, experts_needed, rank_roles
from workers import mesh_roles

SPLIT = "split"
# (layout, encoding ranks, decode group, output ranks): the layouts of a world of 4, and one of 1
ROLES = [
    (dict(), {0}, {0}, {0}),
    (dict(ulysses=4), {0}, {0, 1, 2, 3}, {0}),
    (dict(ulysses=2, cfg=2), {0}, {0, 1}, {0}),
    (dict(ring=2, dp=2), {0, 2}, {0, 1, 2, 3}, {0, 2}),
    (dict(cfg=2, dp=2), {0, 2}, {0, 2}, {0, 2}),
    (dict(dp=4), {0, 1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2, 3}),
    (dict(ulysses=2, chords=2), {0}, {0, 1}, {0}),
    (dict(cfg=2, chords=2), {0}, {0}, {0}),
    (dict(experts=SPLIT, stages=((1, 1, 1), (3, 1, 1))), {0}, {1, 2, 3}, {1}),
    (dict(experts=SPLIT, stages=((2, 1, 1), (1, 1, 2))), {0}, {2}, {2}),
    (dict(experts=SPLIT, stages=((1, 1, 2), (1, 2, 1))), {0}, {2, 3}, {2}),
    (dict(experts=SPLIT, stages=((3, 1, 1), (1, 1, 1))), {0}, {3}, {3}),
]


@pytest.mark.parametrize("layout, encoders, decoders, writers", ROLES)
def test_rank_roles(layout, encoders, decoders, writers):
    config = ParallelConfig(**layout)
    roles = [rank_roles(config, r) for r in range(config.world_size)]
    assert {r for r, x in enumerate(roles) if x.encodes} == encoders
    assert {r for r, x in enumerate(roles) if x.decodes} == decoders
    assert {r for r, x in enumerate(roles) if x.writes} == writers
    assert all(x.writes <= x.decodes for x in roles)   # the output rank is the decode group's first


def test_components_follow_the_roles():
    assert RankRoles(True, True, True).components == {"text_encoder", "vae"}
    assert RankRoles(False, True, False).components == {"vae"}
    assert RankRoles(False, False, False).components == set()


def test_rank_roles_agree_with_the_parallel_mesh():
    # the built mesh holds each rank's roles (Mesh.roles), and its groups agree with them: the encoder
    # is its request group's first rank, the output rank the first of its sp group (gloo)
    layouts = [layout for layout, *_ in ROLES if ParallelConfig(**layout).world_size == 4]
    per_rank = spawn(mesh_roles, 4, layouts, timeout_s=240)
    for k, layout in enumerate(layouts):
        config = ParallelConfig(**layout)
        for rank in range(4):
            roles = rank_roles(config, rank)
            held, (request_first, sp_first) = per_rank[rank][k]
            assert held == (roles.encodes, roles.decodes, roles.writes), (layout, rank)
            assert roles.encodes == request_first, (layout, rank)
            assert not roles.writes or (roles.decodes and sp_first), (layout, rank)


def test_experts_needed():
    split = ParallelConfig(experts=SPLIT, stages=((2, 1, 1), (1, 1, 1)))
    assert [experts_needed(split, r, 40, 26) for r in range(3)] == [{0}, {0}, {1}]
    assert experts_needed(ParallelConfig(ulysses=2), 1, 40, 26) is None          # no CHORDS: both
    # 8 steps, 6 of them high-noise; core 1 starts at index 6 and never sees the high-noise expert
    assert list(chords_experts([0, 6], 8, 6, None)) == [{0, 1}, {1}]
    cores = ParallelConfig(chords=2)
    assert [experts_needed(cores, r, 8, 6, [0, 6], None) for r in range(2)] == [{0, 1}, {1}]
    assert experts_needed(ParallelConfig(), 0, 8, 6, [0, 6], None) == {0, 1}      # cores in turn: all
    # stopping at the first hit: core 0 (indices 0, 1, 2) never reaches the low-noise steps
    assert list(chords_experts([0, 6], 8, 6, 1)) == [{0}, {1}]

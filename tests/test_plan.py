"""The layout plan: flat offsets, constant-size buckets, shards, the TP x DP grid."""
import pytest
import torch

from zerofx import Config, ConfigError
from zerofx.plan import ProcessGrid, make_plan


def _params(sizes):
    return [(f"p{i}", torch.empty(n)) for i, n in enumerate(sizes)]


def test_flat_layout_is_contiguous_in_reverse_registration_order():
    plan = make_plan(_params([10, 20, 30]), Config())
    assert [p.name for p in plan.params] == ["p2", "p1", "p0"]
    assert [(p.offset, p.end) for p in plan.params] == [(0, 30), (30, 50), (50, 60)]
    assert plan.padded_numel == plan.numel == 60  # one rank: nothing to pad


def test_buckets_hold_at_most_the_bucket_size():
    cfg = Config.from_dict({"zero_optimization": {"reduce_bucket_size": 50}})
    plan = make_plan(_params([10, 20, 30, 100, 5]), cfg)
    assert [b.params for b in plan.buckets] == [("p4",), ("p3",), ("p2", "p1"), ("p0",)]
    # every parameter in exactly one bucket, buckets tile the buffer
    assert sorted(n for b in plan.buckets for n in b.params) == sorted(f"p{i}" for i in range(5))
    ends = [b.offset + b.numel for b in plan.buckets]
    assert [b.offset for b in plan.buckets[1:]] == ends[:-1] and ends[-1] == plan.numel
    for b in plan.buckets:
        assert b.numel <= 50 or len(b.params) == 1  # only an oversized tensor overflows


@pytest.mark.parametrize("world", [1, 2, 4, 3])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_owned_ranges_tile_every_bucket(world, stage):
    cfg = Config.from_dict({"zero_optimization": {"stage": stage, "reduce_bucket_size": 8}})
    plan = make_plan(_params([7, 6, 3]), cfg, rank=world - 1, world_size=world)
    assert all(b.padded % world == 0 and b.padded - b.numel < world for b in plan.buckets)
    owned = [plan.owned(r) for r in range(world)]
    if stage == 0 or world == 1:  # every rank updates everything
        assert all(o == owned[0] for o in owned) and plan.shard_numel == plan.padded_numel
        return
    for b in plan.buckets:  # ranks' slices of a bucket: disjoint, in rank order, covering it
        pieces = [o[b.index] for o in owned]
        assert pieces[0].start == b.offset and all(p.numel == b.padded // world for p in pieces)
        assert [p.start for p in pieces] == [b.offset + r * pieces[0].numel for r in range(world)]
    assert plan.shard_numel * world == plan.padded_numel
    assert [r.at for r in plan.owned()] == [0, *[sum(r.numel for r in plan.owned()[:i + 1])
                                                 for i in range(len(plan.buckets) - 1)]]


def test_grid_tp_neighbours_adjacent():
    grid = ProcessGrid(8, 2)
    assert grid.tp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid.dp_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert (grid.tp_rank(5), grid.dp_rank(5)) == (1, 2)
    with pytest.raises(ConfigError, match="must divide the world size"):
        ProcessGrid(6, 4)


def test_predicted_bytes_shrink_with_zero_stage():
    params = _params([1000, 24])
    cfg = lambda s: Config.from_dict({"zero_optimization": {"stage": s}})  # noqa: E731
    full = make_plan(params, cfg(0), world_size=4).predicted_bytes()
    z1 = make_plan(params, cfg(1), world_size=4).predicted_bytes()
    z2 = make_plan(params, cfg(2), world_size=4).predicted_bytes()
    assert z2["optimizer_state"] * 4 == full["optimizer_state"] == 8 * 1024
    assert z1["optimizer_state"] == z2["optimizer_state"] and z1["gradients"] == full["gradients"]
    assert z2["gradients"] * 4 == full["gradients"]
    assert "fc" not in make_plan(params, cfg(1)).describe()


def test_describe_lists_buckets_and_their_collective():
    cfg = Config.from_dict({"zero_optimization": {"stage": 2, "reduce_bucket_size": 25}})
    text = make_plan(_params([10, 20, 30]), cfg, world_size=2).describe()
    assert "collective" in text and text.count("reduce_scatter") == 3
    no_rs = Config.from_dict({"zero_optimization": {"stage": 2, "reduce_scatter": False}})
    assert "all_reduce" in make_plan(_params([10]), no_rs, world_size=2).describe()


def _stage3_plan(threshold, model_threshold=2**63 - 1, world=2):
    torch.manual_seed(0)
    params = [("emb", torch.zeros(50, 4)), ("ln.w", torch.zeros(4)), ("fc.w", torch.zeros(8, 4)),
              ("fc.b", torch.zeros(8)), ("out.w", torch.zeros(4, 8))]
    cfg = Config.from_dict({"zero_optimization": {
        "stage": 3, "reduce_bucket_size": 1000, "stage3_prefetch_bucket_size": 40,
        "stage3_param_persistence_threshold": threshold,
        "stage3_model_persistence_threshold": model_threshold}})
    return make_plan(params, cfg, rank=0, world_size=world)


def test_stage3_persistence_follows_deepspeeds_rule():
    """DeepSpeed's mark_persistent_parameters: in registration order, a parameter of at most
    param_persistence_threshold elements persists while the total stays within
    model_persistence_threshold."""
    plan = _stage3_plan(8)
    assert {p.name for p in plan.params if p.persistent} == {"ln.w", "fc.b"}
    capped = _stage3_plan(8, model_threshold=5)  # ln.w (4) fits, fc.b (8) would pass 5
    assert {p.name for p in capped.params if p.persistent} == {"ln.w"}
    assert not any(p.persistent for p in _stage3_plan(0).params)
    assert not any(p.persistent for p in _stage3_plan(8, world=1).params)  # one rank: whole


def test_stage3_buckets_cap_at_the_prefetch_size_and_keep_persistent_ones_last():
    plan = _stage3_plan(8)
    buckets = {p.name: p.bucket for p in plan.params}
    persistent = {buckets["ln.w"], buckets["fc.b"]}
    assert min(persistent) > max(b for n, b in buckets.items() if n not in ("ln.w", "fc.b"))
    assert plan.persist_offset == plan.buckets[min(persistent)].offset
    big = [b for b in plan.buckets if b.numel > 40]
    assert [b.params for b in big] == [("emb",)]  # one tensor larger than the cap: alone
    mem = plan.predicted_bytes()  # stage 3: parameters are a shard plus the persistent ones
    assert mem["compute_params"] == 0  # fp32 compute: the master is the parameter
    assert plan.shard_numel * 2 == plan.padded_numel


def test_one_grouping_rule_for_buckets_chunks_and_plain_dp():
    # group_into_buckets: consecutive items, a group closes once it holds ``cap`` elements,
    # an item larger than cap alone; no item lost, the order kept
    from zerofx.plan import group_into_buckets

    items = [("a", 3), ("b", 4), ("c", 10), ("d", 1), ("e", 1), ("f", 5)]
    groups = group_into_buckets(items, 5)
    assert [[k for k, _ in g] for g in groups] == [["a"], ["b"], ["c"], ["d", "e"], ["f"]]
    assert group_into_buckets(items, 100) == [items]
    assert group_into_buckets([], 5) == []

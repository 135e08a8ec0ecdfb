"""The seam (zerofx/graph_ops.py): each op's arguments are written once, in its signature;
passes build, read and update calls by field name, and never name an op by string."""
from pathlib import Path

import pytest
import torch
from torch import fx

from zerofx.graph_ops import GATHER_BUCKET, REDUCE_BUCKET, TAG_GRAD, SeamOp

PASSES = Path(__file__).resolve().parent.parent / "zerofx" / "passes"


def test_fields_are_the_schema_arguments():
    for name in ("param_slots", "expect_grads", "tag_grad", "reduce_bucket", "gather_bucket",
                 "tp_param", "start_gather", "finish_gather", "shard_optimizer_step"):
        op = SeamOp(name)
        schema = getattr(torch.ops.zerofx, name).default._schema
        assert list(op.args._fields) == [a.name for a in schema.arguments]


def test_build_read_update_by_field_name():
    g = fx.Graph()
    slots = g.placeholder("slots")
    node = GATHER_BUCKET.call(g, sid=3, slots=slots, ks=[0, 2], offsets=[0, 8], length=16,
                              ahead=[], check=0)
    assert node.target is torch.ops.zerofx.gather_bucket.default
    assert node.args == (3, slots, [0, 2], [0, 8], 16, [], 0)  # the schema's order
    GATHER_BUCKET.update(node, ahead=[5], check=7)
    read = GATHER_BUCKET.read(node)
    assert (read.ahead, read.check, read.length, read.slots) == ([5], 7, 16, slots)
    assert GATHER_BUCKET.is_call(node) and not TAG_GRAD.is_call(node)
    with pytest.raises(TypeError):  # a forgotten argument fails where the call is built
        REDUCE_BUCKET.call(g, sid=3, slots=slots, positions=[0])
    with pytest.raises(AssertionError, match="not a call of zerofx::tag_grad"):
        TAG_GRAD.read(node)


def test_passes_never_name_a_seam_op_by_string():
    offenders = [str(p.relative_to(PASSES)) for p in PASSES.rglob("*.py")
                 if "torch.ops.zerofx" in p.read_text()]
    assert offenders == []



def test_a_runtime_offers_everything_the_ops_read():
    # graph_ops.TrainingState is the whole surface the graphs see of a runtime: a real
    # ZeroRuntime (stage 3, where every part exists) must offer each member
    import typing

    import zerofx
    from zerofx.graph_ops import TrainingState

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    rt = zerofx.ZeroRuntime(model, {"train_micro_batch_size_per_gpu": 1,
                                    "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                                    "zero_optimization": {"stage": 3}})
    members = set(typing.get_type_hints(TrainingState)) | {
        n for n in vars(TrainingState) if not n.startswith("_")}
    missing = sorted(n for n in members if not hasattr(rt, n))
    assert missing == []

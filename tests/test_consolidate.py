"""zerofx-consolidate: a 2-rank ZeRO-2 checkpoint becomes one fp32 state dict.

The reference is each rank's fp32 master shard, placed by plan.owned() in the rank itself
(not by the checkpoint reader under test) and summed across ranks.
"""
import subprocess
import sys

import pytest
import torch

from models import make
from multiproc import run_ranks

CFG = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
       # small buckets: parameters straddle the two ranks' shards
       "zero_optimization": {"stage": 2, "reduce_bucket_size": 300}}


def _save_body(rank, world, ckpt):
    import zerofx
    from zerofx.checkpoint import save_checkpoint

    model, _ = make("block")
    rt = zerofx.ZeroRuntime(model, CFG)
    g = torch.Generator().manual_seed(rank)
    rt.state.master.copy_(torch.randn(rt.state.master.shape, generator=g))  # as if trained
    save_checkpoint(rt, ckpt, tag="s")
    full = torch.zeros(rt.plan.padded_numel)
    for r in rt.plan.owned():
        full[r.start:r.start + r.numel] = rt.state.master[r.at:r.at + r.numel]
    return {s.name: full[s.offset:s.end].view(s.shape).clone() for s in rt.plan.params}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    parts = run_ranks(_save_body, 2, args=(str(ckpt),))
    return ckpt, {n: parts[0][n] + parts[1][n] for n in parts[0]}


@pytest.mark.slow
@pytest.mark.parametrize("tag", [None, "s"])
def test_consolidated_state_is_the_assembled_fp32_master(saved, tmp_path, capsys, tag):
    from zerofx.tools.consolidate import main

    ckpt, expected = saved
    out = tmp_path / "model.pt"
    assert main([str(ckpt), "-o", str(out)] + (["--tag", tag] if tag else [])) == 0
    got = torch.load(out, weights_only=True)
    model, _ = make("block", seed=1)
    assert sorted(got) == sorted(n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        assert got[n].dtype == torch.float32 and got[n].shape == p.shape, n
        assert torch.equal(got[n], expected[n]), n
    model.load_state_dict(got)  # strict: exactly the model's parameters
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("/")[-1] for ln in lines[:2]] == ["zero_dp_rank_0.pt", "zero_dp_rank_1.pt"]
    assert lines[2].startswith(f"wrote {out}: {len(got)} parameters")


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("missing dir", "no such checkpoint directory"),
    ("missing tag", "tag 'nope': "),
    ("missing rank file", "zero_dp_rank_1.pt is missing"),
    ("unwritable output", "cannot write"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(saved, tmp_path, capsys, case, message):
    import shutil

    from zerofx.tools.consolidate import main

    ckpt, _ = saved
    args = [str(ckpt), "-o", str(tmp_path / "out.pt")]
    if case == "missing dir":
        args[0] = str(tmp_path / "absent")
    elif case == "missing tag":
        args += ["--tag", "nope"]
    elif case == "missing rank file":
        copy = tmp_path / "copy"
        shutil.copytree(ckpt, copy)
        (copy / "s" / "zero_dp_rank_1.pt").unlink()
        args[0] = str(copy)
    else:
        args[2] = str(tmp_path / "no" / "such" / "dir" / "out.pt")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("zerofx-consolidate: ") and message in err
    assert err.count("\n") == 1, err


def test_runs_as_a_module_without_a_latest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zerofx.tools.consolidate", str(tmp_path),
                           "-o", str(tmp_path / "o.pt")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("zerofx-consolidate: ") and "latest" in proc.stderr
    assert not (tmp_path / "o.pt").exists()


def test_every_rank_file_carries_the_same_save_id(saved):
    ckpt, _ = saved
    ids = {torch.load(f, weights_only=True)["save_id"]
           for f in (ckpt / "s").glob("*.pt")}
    assert len(list((ckpt / "s").glob("*.pt"))) == 3 and len(ids) == 1  # meta + 2 ranks

"""Checkpoints that are readable but wrong: files of two saves mixed, malformed contents, a
`latest` that points outside, a crash between the renames of a re-save, and random
corruption (hypothesis). Each must end in a CheckpointError that names the file, with the
runtime untouched (the reference: its own state before the load), or in a correct load.
"""
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import make

CFG = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
       "zero_optimization": {"stage": 2, "reduce_bucket_size": 300}}
STATE = ("master", "exp_avg", "exp_avg_sq")


def _runtime(seed):
    import zerofx

    model, _ = make("mlp")
    rt = zerofx.ZeroRuntime(model, CFG)
    g = torch.Generator().manual_seed(seed)
    for key in STATE:
        getattr(rt.state, key).copy_(torch.randn(getattr(rt.state, key).shape, generator=g))
    rt.state.step_count.fill_(seed + 1)
    return rt


def _snapshot(rt):
    keys = (*STATE, "flat_params", "step_count", "lr")
    return {k: getattr(rt.state, k).clone() for k in keys} | \
        {"micro_steps": rt.micro_steps, "scale": rt.state.scaler.scale.clone()}


def _unchanged(rt, before):
    after = _snapshot(rt)
    for k, v in before.items():
        assert (torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v), k


@pytest.fixture
def two_saves(tmp_path, no_torchrun_env):
    from zerofx.checkpoint import save_checkpoint

    save_checkpoint(_runtime(1), tmp_path, tag="a")
    save_checkpoint(_runtime(2), tmp_path, tag="b")
    return tmp_path


def _load_into_fresh(root, tag):
    from zerofx.checkpoint import CheckpointError, load_checkpoint

    rt = _runtime(9)
    before = _snapshot(rt)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(rt, root, tag)
    _unchanged(rt, before)
    return str(e.value)


@pytest.mark.parametrize("name", ["zero_dp_rank_0.pt", "meta.pt"])
def test_files_of_two_saves_are_refused_by_name(two_saves, name):
    from tools.consolidate import main

    shutil.copy(two_saves / "b" / name, two_saves / "a" / name)
    msg = _load_into_fresh(two_saves, "a")
    assert "belongs to another save" in msg and "zero_dp_rank_0.pt" in msg
    assert main([str(two_saves), "--tag", "a", "-o", str(two_saves / "out.pt")]) == 2
    assert not (two_saves / "out.pt").exists()


def _edit(path, change):
    """Change a file's contents and re-checksum it (as a buggy writer would): the checks
    behind the checksum must still catch it."""
    from zerofx.checkpoint.schema import DIGEST_KEY, with_digest

    obj = torch.load(path, weights_only=True)
    obj.pop(DIGEST_KEY)
    change(obj)
    torch.save(with_digest(obj), path)


RANK_EDITS = {
    "gas 0": (lambda o: o.update(gas=0), "gas"),
    "negative micro_steps": (lambda o: o.update(micro_steps=-1), "micro_steps"),
    "ranges not triples": (lambda o: o.update(ranges=[[0, 5]]), "ranges"),
    "ranges a string": (lambda o: o.update(ranges="x"), "ranges"),
    "range past the buffer": (lambda o: o["ranges"][0].__setitem__(1, 10**9), "exceeds"),
    "negative range": (lambda o: o["ranges"][0].__setitem__(0, -4), "exceeds"),
    "missing lr": (lambda o: o.pop("lr"), "lacks"),
    "empty scaler": (lambda o: o.update(scaler={}), "loss scaler"),
    "master too short": (lambda o: o.update(master=o["master"][:3]), "master"),
    "step_count a list": (lambda o: o.update(step_count=[1]), "step_count"),
}
META_EDITS = {
    "padded 1e12": (lambda o: o.update(padded_numel=10**12), "rank files own"),
    "dp_size 0": (lambda o: o.update(dp_size=0), "dp_size"),
    "param without offset": (lambda o: o["params"][0].pop("offset"), "params"),
    "param past the buffer": (lambda o: o["params"][0].update(offset=10**9), "outside"),
    "params a dict": (lambda o: o.update(params={}), "params"),
    "sharded a string": (lambda o: o.update(sharded="yes"), "sharded"),
}


@pytest.mark.parametrize("kind", list(RANK_EDITS) + list(META_EDITS))
def test_malformed_contents_are_checkpoint_errors(two_saves, kind):
    from tools.consolidate import main

    name, (change, words) = (("zero_dp_rank_0.pt", RANK_EDITS[kind]) if kind in RANK_EDITS
                             else ("meta.pt", META_EDITS[kind]))
    _edit(two_saves / "a" / name, change)
    msg = _load_into_fresh(two_saves, "a")
    assert name in msg and words in msg, msg
    assert main([str(two_saves), "--tag", "a", "-o", str(two_saves / "o.pt")]) == 2


@pytest.mark.parametrize("target", ["/etc", "../a", "a/../../b", ".a.tmp"])
def test_latest_never_leaves_the_directory(two_saves, target):
    (two_saves / "latest").write_text(target)
    msg = _load_into_fresh(two_saves, None)
    assert "latest names" in msg and "not a tag directory" in msg


def test_crash_between_the_renames_keeps_the_old_copy_loadable(tmp_path, no_torchrun_env):
    from zerofx.checkpoint import load_checkpoint, save_checkpoint

    old, new = _runtime(1), _runtime(2)
    save_checkpoint(old, tmp_path, tag="t")
    # what a crash right after the first rename of a re-save of "t" leaves behind
    (tmp_path / "t").rename(tmp_path / ".t.old")
    rt = _runtime(9)
    with pytest.warns(UserWarning, match="set aside"):
        path, _ = load_checkpoint(rt, tmp_path)
    assert path.endswith(".t.old") and torch.equal(rt.state.master, old.state.master)
    save_checkpoint(new, tmp_path, tag="t")  # the re-save completes this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "t"]
    load_checkpoint(rt, tmp_path)
    assert torch.equal(rt.state.master, new.state.master)


@pytest.mark.parametrize("out, words", [("", "not a file name"), (".", "not a file name"), ("a", "is a directory"),
                                        ("missing_dir/x.pt", "not a directory")])
def test_consolidate_bad_output_paths(two_saves, out, words, capsys, monkeypatch):
    from tools.consolidate import main

    monkeypatch.chdir(two_saves)
    assert main([str(two_saves), "--tag", "a", "-o", out]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


# ---- random corruption -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    import os

    from zerofx.checkpoint import save_checkpoint

    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    root = tmp_path_factory.mktemp("pristine")
    rt = _runtime(3)
    save_checkpoint(rt, root, tag="a")
    os.environ.update(saved)
    return root, _snapshot(rt)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["meta.pt", "zero_dp_rank_0.pt", "latest"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_random_byte_corruption_is_an_error_or_a_correct_load(pristine, tmp_path_factory,
                                                              name, flips, cut):
    from zerofx.checkpoint import CheckpointError, load_checkpoint

    src, saved = pristine
    root = tmp_path_factory.mktemp("corrupt")
    shutil.copytree(src, root, dirs_exist_ok=True)
    path = root / name if name == "latest" else root / "a" / name
    data = bytearray(path.read_bytes())
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    if cut is not None:
        data = data[:int(cut * len(data))]
    path.write_bytes(bytes(data))
    rt = _runtime(9)
    before = _snapshot(rt)
    try:
        load_checkpoint(rt, root)
    except CheckpointError:
        _unchanged(rt, before)  # refused: nothing was restored
        return
    # accepted: then it is the saved state exactly (a flip in unused bytes), never NaN
    for key in STATE:
        assert torch.equal(getattr(rt.state, key), saved[key]), key


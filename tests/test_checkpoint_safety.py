"""Checkpoints never harm what zerofx did not write, and fail cleanly when the disk does.

A folder named like the tag is refused, not replaced; temp files are never written through a
planted symlink, and a symlinked `latest` does not leak its target; tags `latest` cannot
round-trip are refused; a full disk or a file-size limit names the file and the cause,
removes the partial save and leaves the previous checkpoint loadable.
"""
import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from models import make
from multiproc import run_ranks

CFG = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
       "zero_optimization": {"stage": 2, "reduce_bucket_size": 300}}


def _runtime(seed):
    import zerofx

    model, _ = make("mlp")
    rt = zerofx.ZeroRuntime(model, CFG)
    g = torch.Generator().manual_seed(seed)
    rt.state.master.copy_(torch.randn(rt.state.master.shape, generator=g))  # as if trained
    return rt


@pytest.fixture
def rt(no_torchrun_env):
    return _runtime(1)


def _loaded_master(root, tag=None):
    from zerofx.checkpoint import load_checkpoint

    fresh = _runtime(9)
    load_checkpoint(fresh, root, tag)
    return fresh.state.master


# ---- 2: a folder named like the tag ------------------------------------------------------
def _user_folder(root):
    (root / "run").mkdir()
    (root / "run" / "notes.txt").write_text("mine")


def _user_file(root):
    (root / "run").write_text("mine")


def _empty_folder(root):
    (root / "run").mkdir()


def _link_to_user_folder(root):
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "notes.txt").write_text("mine")
    (root / "run").symlink_to(root / "elsewhere")


def _user_meta(root):  # a zerofx file name among the user's own files is still theirs
    _user_folder(root)
    (root / "run" / "meta.pt").write_text("mine")


@pytest.mark.parametrize("plant", [_user_folder, _user_file, _empty_folder,
                                   _link_to_user_folder, _user_meta])
def test_save_refuses_to_replace_what_zerofx_did_not_write(rt, tmp_path, plant):
    from zerofx.checkpoint import CheckpointError, save_checkpoint

    plant(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(rt, tmp_path, tag="run")
    msg = str(e.value)
    assert str(tmp_path / "run") in msg and "not a zerofx checkpoint" in msg
    assert "another tag" in msg and "move" in msg
    assert _tree(tmp_path) == before  # untouched, and no temp directory left behind


def _tree(root):
    return {str(p.relative_to(root)): (p.is_symlink(), p.is_file() and p.read_text())
            for p in sorted(root.rglob("*"))}


def test_resave_of_a_tag_replaces_the_older_checkpoint(rt, tmp_path):
    from zerofx.checkpoint import save_checkpoint

    save_checkpoint(rt, tmp_path, tag="run")
    newer = _runtime(2)
    save_checkpoint(newer, tmp_path, tag="run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run"]
    assert torch.equal(_loaded_master(tmp_path), newer.state.master)


def test_resave_replaces_a_tensor_parallel_layout(rt, tmp_path):
    """What a TP save leaves (meta.pt, tp_rank_N/ with its own files) is zerofx's too."""
    from zerofx.checkpoint import save_checkpoint

    for sub in ("tp_rank_0", "tp_rank_1"):
        (tmp_path / "run" / sub).mkdir(parents=True)
        for name in ("meta.pt", "zero_dp_rank_0.pt", "zero_dp_rank_1.pt"):
            (tmp_path / "run" / sub / name).write_bytes(b"old")
    (tmp_path / "run" / "meta.pt").write_bytes(b"old")
    save_checkpoint(rt, tmp_path, tag="run")
    assert torch.equal(_loaded_master(tmp_path), rt.state.master)


# ---- 4: fixed temp names and a symlinked `latest` -----------------------------------------
def test_latest_is_never_written_through_a_planted_symlink(rt, tmp_path):
    from zerofx.checkpoint import save_checkpoint

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".latest.tmp").symlink_to(victim)
    save_checkpoint(rt, tmp_path, tag="a")
    assert victim.read_text() == "precious"
    assert (tmp_path / "latest").read_text() == "a" and not (tmp_path / "latest").is_symlink()


def test_consolidate_never_writes_through_a_planted_symlink(rt, tmp_path):
    from zerofx.checkpoint import save_checkpoint
    from zerofx.tools.consolidate import consolidate

    save_checkpoint(rt, tmp_path / "ckpt", tag="a")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".model.pt.tmp").symlink_to(victim)
    state = consolidate(tmp_path / "ckpt", tmp_path / "model.pt", echo=lambda s: None)
    assert victim.read_bytes() == b"precious"
    got = torch.load(tmp_path / "model.pt", weights_only=True)
    assert got.keys() == state.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.tmp", "ckpt", "model.pt",
                                                         "victim.txt"]


def test_a_symlinked_latest_does_not_leak_its_target(rt, tmp_path):
    from zerofx.checkpoint import CheckpointError, save_checkpoint

    save_checkpoint(rt, tmp_path, tag="a")
    secret = tmp_path.parent / f"{tmp_path.name}-secret"
    secret.write_text("hunter2-token\n")
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").symlink_to(secret)
    with pytest.raises(CheckpointError) as e:
        _loaded_master(tmp_path)
    assert "hunter2" not in str(e.value)
    assert str(tmp_path / "latest") in str(e.value) and "tag=" in str(e.value)


# ---- 5: tags `latest` cannot round-trip ---------------------------------------------------
@pytest.mark.parametrize("tag", ["run1 ", " run1", "run\n1", "run1\n", "a\tb", "a\rb"])
def test_tags_latest_cannot_hold_are_refused_at_save_and_load(rt, tmp_path, tag):
    from zerofx.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    save_checkpoint(rt, tmp_path, tag="run1")
    for call in (lambda: save_checkpoint(_runtime(2), tmp_path, tag=tag),
                 lambda: load_checkpoint(_runtime(2), tmp_path, tag=tag)):
        with pytest.raises(CheckpointError) as e:
            call()
        assert repr(tag) in str(e.value) and "global_step100" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run1"]


def test_latest_naming_a_padded_tag_is_not_loaded_as_another(rt, tmp_path):
    """A `latest` holding "run1 " (as an older zerofx wrote it) must not load "run1"."""
    from zerofx.checkpoint import CheckpointError, save_checkpoint

    save_checkpoint(rt, tmp_path, tag="run1")
    (tmp_path / "latest").write_text("run1 ")
    with pytest.raises(CheckpointError, match="'run1 '"):
        _loaded_master(tmp_path)
    (tmp_path / "latest").write_text("run1\n")  # `echo run1 > latest` still works
    assert torch.equal(_loaded_master(tmp_path), rt.state.master)


# ---- 8: a full disk, a file-size limit -----------------------------------------------------
class _DiskFills:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _fill_disk_on_file(monkeypatch, name):
    """torch.save of ``name`` fails as torch does on a full disk ("unexpected pos" with the
    OSError only as its context)."""
    real = torch.save

    def save(obj, f, *a, **k):
        full = os.path.basename(getattr(f, "name", "")) == name
        return real(obj, _DiskFills(f, 100) if full else f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("tag", ["b", "a"])  # a new tag, and a re-save of the previous one
def test_full_disk_names_the_file_and_keeps_the_previous_checkpoint(rt, tmp_path,
                                                                    monkeypatch, tag):
    from zerofx.checkpoint import CheckpointError, save_checkpoint

    save_checkpoint(rt, tmp_path, tag="a")
    with monkeypatch.context() as m:
        _fill_disk_on_file(m, "zero_dp_rank_0.pt")
        with pytest.raises(CheckpointError) as e:
            save_checkpoint(_runtime(2), tmp_path, tag=tag)
    msg = str(e.value)
    assert str(tmp_path / f".{tag}.tmp" / "zero_dp_rank_0.pt") in msg
    assert "No space left on device" in msg and "unexpected pos" not in msg
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "latest"]
    assert torch.equal(_loaded_master(tmp_path), rt.state.master)


_FSIZE_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    import torch, zerofx
    from models import make
    from zerofx.checkpoint import CheckpointError, save_checkpoint

    model, _ = make("mlp")
    rt = zerofx.ZeroRuntime(model, {"optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
                                    "zero_optimization": {"stage": 2}})
    save_checkpoint(rt, sys.argv[1], tag="a")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us: EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # meta.pt fits, the shard not
    try:
        save_checkpoint(rt, sys.argv[1], tag="b")
    except CheckpointError as e:
        print(e)
""")


def test_file_size_limit_names_the_file_and_the_cause(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path),
                           os.path.dirname(__file__)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / ".b.tmp" / "zero_dp_rank_0.pt") in proc.stdout, proc.stdout
    assert "File too large" in proc.stdout and "ulimit" in proc.stdout, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "latest"]
    assert (tmp_path / "latest").read_text() == "a"


def _full_disk_on_rank1_body(rank, world, root):
    import pytest as _pytest

    from zerofx.checkpoint import CheckpointError, save_checkpoint

    rt = _runtime(rank)
    save_checkpoint(rt, root, tag="a")
    with _pytest.MonkeyPatch.context() as m:
        if rank == 1:
            _fill_disk_on_file(m, "zero_dp_rank_1.pt")
        try:
            save_checkpoint(_runtime(5), root, tag="b")
        except CheckpointError as e:
            return str(e)
    return "saved"


@pytest.mark.slow
def test_full_disk_on_one_rank_fails_every_rank_and_cleans_up(tmp_path, no_torchrun_env):
    msgs = run_ranks(_full_disk_on_rank1_body, 2, args=(str(tmp_path),), timeout_s=120)
    assert "another rank failed" in msgs[0]
    assert str(tmp_path / ".b.tmp" / "zero_dp_rank_1.pt") in msgs[1]
    assert "No space left on device" in msgs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "latest"]
    assert (tmp_path / "latest").read_text() == "a"


@pytest.mark.parametrize("files", [
    ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],  # stage 1-2
    ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",  # stage 3, bf16
     "zero_pp_rank_1_mp_rank_00_model_states.pt"],
])
def test_a_deepspeed_checkpoint_is_recognised_with_the_way_to_convert(no_torchrun_env,
                                                                      tmp_path, files):
    # DeepSpeed's layout: <dir>/latest, <dir>/<tag>/<its files>, <dir>/zero_to_fp32.py
    from zerofx.checkpoint import CheckpointError, load_checkpoint

    (tmp_path / "global_step10").mkdir()
    for name in files:
        (tmp_path / "global_step10" / name).write_bytes(b"not read")
    (tmp_path / "latest").write_text("global_step10")
    rt = _runtime(0)
    with pytest.raises(CheckpointError, match="is a DeepSpeed checkpoint.*zero_to_fp32.py"):
        load_checkpoint(rt, tmp_path)

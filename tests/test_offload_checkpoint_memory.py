"""Checkpoints of an NVMe-offloaded optimizer state stream it: saving and loading it takes a
small fraction of its size in anonymous memory, so a state larger than memory checkpoints
(the whole copies torch.save writes and a load assembles are file-backed, offload/scratch.py).

The probe is the kernel's RssAnon (tests/memprobe.py), with a control showing it sees a
whole in-memory copy of the same state; the reference for the values is the state as it was
before the save, read back after a load that followed more training.
"""
import os

import pytest
import torch
from torch import nn

from memprobe import PeakAnon

WIDTH = 2896  # two 2896 x 2896 weights: 16.8M parameters, a 201 MB fp32 state (3 fields)


def _config(nvme_dir):
    return {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2, "sub_group_size": 1 << 20,
                                  "offload_optimizer": {"device": "nvme",
                                                        "nvme_path": str(nvme_dir)}}}


def _step(rt, compiled, seed):
    torch.manual_seed(seed)
    loss = compiled(torch.randn(4, WIDTH)).float().square().mean()
    rt.backward(loss)
    rt.step()


def _state(rt):
    with rt.state.optimizer_state() as fp32:
        return {k: v.clone() for k, v in fp32.items()}


@pytest.mark.slow
def test_save_and_load_of_offloaded_state_stream_through_memory(tmp_path, no_torchrun_env):
    import zerofx
    from zerofx.checkpoint import load_checkpoint, save_checkpoint

    (tmp_path / "nvme").mkdir()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False))
    rt = zerofx.ZeroRuntime(model, _config(tmp_path / "nvme"))
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    _step(rt, compiled, 0)
    state_bytes = 3 * 4 * rt.plan.shard_numel
    before = _state(rt)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    with PeakAnon() as save:
        save_checkpoint(rt, tmp_path / "ckpt")
    _step(rt, compiled, 1)  # the state moves on; the load must bring the saved one back
    assert not torch.equal(_state(rt)["exp_avg"], before["exp_avg"])
    with PeakAnon() as load:
        load_checkpoint(rt, tmp_path / "ckpt")

    after = _state(rt)
    for k, t in before.items():
        assert torch.equal(after[k], t), k
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    with PeakAnon() as control:  # the probe sees a whole copy of the state in memory
        whole = rt.state.offload.read_all()
    del whole
    assert control.peak > 0.9 * state_bytes, (control.peak, state_bytes)
    assert save.peak < 0.2 * state_bytes, (save.peak, state_bytes)
    assert load.peak < 0.2 * state_bytes, (load.peak, state_bytes)
    rt.close()
    assert os.listdir(tmp_path / "nvme") == []  # the staging files went with their tensors


def test_staged_tensors_are_private_unlinked_file_mappings(tmp_path):
    from zerofx.runtime.offload.scratch import scratch_tensors

    t = scratch_tensors(str(tmp_path), {"a": 1000, "b": 0, "c": 10}, rank=3)
    assert [v.numel() for v in t.values()] == [1000, 0, 10]
    assert all(v.dtype == torch.float32 and not v.any() for v in t.values())
    assert os.listdir(tmp_path) == []  # unlinked at once: nobody can open them by name
    t["a"].fill_(2.0)
    t["c"].fill_(3.0)  # files of their own: writing one leaves the other
    assert float(t["a"].sum()) == 2000.0 and float(t["c"].sum()) == 30.0
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if str(tmp_path) in line]
    assert len(mapped) == 2 and all("rank3.staging (deleted)" in line for line in mapped)
    assert all(line.split()[1].startswith("rw-s") for line in mapped)  # shared: written back


def test_staging_on_a_full_disk_names_the_path_and_the_key(tmp_path, monkeypatch):
    import errno

    from zerofx.runtime.offload import OffloadError
    from zerofx.runtime.offload.scratch import scratch_tensors

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OffloadError, match=rf"staging copy.*{tmp_path}.*No space left.*"
                                           r"offload_optimizer\.nvme_path"):
        scratch_tensors(str(tmp_path), {"master": 1 << 20}, rank=0)
    assert os.listdir(tmp_path) == []

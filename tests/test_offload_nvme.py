"""offload_optimizer device nvme: the fp32 master weights and moments in a file, streamed.

The reference is the same training in memory: an offloaded run must give the same bits
(losses, parameters, master weights and moments) over 20 steps, since the fused kernels run
on each chunk as on the whole shard. Errors: a path that cannot hold the state, a full disk
at startup or mid-step, a symlink where the file goes.
"""
import errno
import os

import pytest
import torch

from models import block_batch, make, mlp_batch
from multiproc import run_ranks

STEPS = 20
CHUNK = 1000  # elements per streamed chunk: the block model's shard is ~17k (8k per rank)


def _config(nvme_dir, *, stage=2, opt="AdamW", dtype="bf16", gas=1, clip=0.5, buffers=3,
            chunk=CHUNK, form="fastest"):
    cfg = {"optimizer": {"type": opt, "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000,
                                 "allgather_bucket_size": 5000,
                                 "stage3_param_persistence_threshold": 100},
           "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           # the step's all-gather form decides where the update writes (in place in the
           # flat parameters: p2p, shm; a shard-shaped temporary: all_gather)
           "zerofx": {"gather_form": form}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    else:  # a first scale that overflows: the first steps are skipped, the rest apply
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 20, "hysteresis": 1}
    if nvme_dir is not None:
        cfg["zero_optimization"].update(
            sub_group_size=chunk, offload_optimizer={"device": "nvme", "nvme_path": str(nvme_dir),
                                                     "buffer_count": buffers})
    return cfg


def _batch(name, seed):
    return block_batch(seed=seed) if name == "block" else mlp_batch(seed=seed)


def _train(rank, cfg, steps=STEPS, *, rt_hook=None, start=0, name="block"):
    import zerofx

    torch._dynamo.reset()
    model, _ = make(name)
    rt = zerofx.ZeroRuntime(model, cfg)
    if rt_hook is not None:
        rt_hook(rt)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    losses = []
    for step in range(start, start + steps):
        for micro in range(rt.gas):
            with rt.shape_carriers():  # stage 3: partitioned parameters traced whole
                loss = compiled(*_batch(name, 1000 * step + 10 * rank + micro))
            rt.backward(loss)
            rt.step()
            losses.append(loss.item())
    return rt, model, losses


def _result(rt, model, losses):
    off = rt.state.offload  # chunks read by the steps (the read below reads them once more)
    streamed = (off.stream.chunks_read, len(off.chunks), rt.state.master.numel()) \
        if off is not None else None
    with rt.state.optimizer_state() as fp32:
        state = {k: v.clone() for k, v in fp32.items()}
    out = {"losses": losses, "state": state, "skipped": rt.skipped_steps, "streamed": streamed,
           "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    rt.close()
    return out


def _pair(rank, nvme_dir, case, steps=STEPS, name="block"):
    """(in memory, offloaded) results of one case on this rank."""
    return [_result(*_train(rank, _config(d, **case), steps, name=name))
            for d in (None, nvme_dir)]


def _assert_same(mem, off, where):
    assert off["losses"] == mem["losses"], where
    assert off["skipped"] == mem["skipped"], where
    for n, p in mem["params"].items():
        assert torch.equal(off["params"][n], p), f"{where}: parameter {n}"
    for k, t in mem["state"].items():
        assert torch.equal(off["state"][k], t), f"{where}: {k}"


def _assert_streamed(off, per_step_passes=1, steps=STEPS):
    reads, chunks, in_memory = off["streamed"]
    applied = steps - off["skipped"]
    assert chunks > 3, "the shard must be cut into several chunks"
    assert reads == chunks * applied * per_step_passes  # a skipped step reads nothing
    assert in_memory == 0  # the master weights are not kept in memory


CASES = [dict(stage=s, opt=o, dtype=d, gas=g, clip=c, form=f)
         for s in (1, 2, 3) for o, d, g, c, f in (("AdamW", "bf16", 2, 0.5, "all_gather"),
                                                  ("Lamb", "fp16", 1, 0.5, "p2p"),
                                                  ("Adam", "fp16", 2, 0.0, "shm"))]


def _passes(case):
    return 2 if case.get("opt") == "Lamb" else 1  # LAMB streams the state twice


def test_offloaded_training_equals_in_memory_bit_for_bit_quick(tmp_path, no_torchrun_env):
    """The fast loop's check: a few steps of one case (the 20-step cases are slow)."""
    mem, off = _pair(0, tmp_path, dict(stage=2, opt="Lamb", chunk=100), steps=4, name="mlp")
    _assert_same(mem, off, "quick")
    _assert_streamed(off, per_step_passes=2, steps=4)
    assert os.listdir(tmp_path) == []  # nothing left under nvme_path


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_one_rank_20_steps_equal_in_memory(case, tmp_path, no_torchrun_env):
    mem, off = _pair(0, tmp_path, case)
    _assert_same(mem, off, str(case))
    _assert_streamed(off, per_step_passes=_passes(case))
    if case["dtype"] == "fp16":
        assert 0 < off["skipped"] < STEPS // 2  # overflow skips happened, and updates too
    assert os.listdir(tmp_path) == []


def _two_rank_body(rank, world, nvme_dir, cases):
    return [_pair(rank, nvme_dir, case) for case in cases]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_20_steps_equal_in_memory(stage, tmp_path):
    cases = [c for c in CASES if c["stage"] == stage]
    results = run_ranks(_two_rank_body, 2, args=(str(tmp_path), cases), timeout_s=600)
    for rank, runs in enumerate(results):
        for case, (mem, off) in zip(cases, runs):
            _assert_same(mem, off, f"rank {rank}, {case}")
            _assert_streamed(off, per_step_passes=_passes(case))
    assert os.listdir(tmp_path) == []


# ---- checkpoints ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("save_nvme, load_nvme", [(True, False), (False, True)])
def test_checkpoint_between_offloaded_and_in_memory_continues_identically(
        save_nvme, load_nvme, tmp_path, no_torchrun_env):
    from zerofx.checkpoint import load_checkpoint, save_checkpoint

    half, case = STEPS // 2, dict(opt="Lamb")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _result(*_train(0, _config(None, **case)))
    rt, _, first = _train(0, _config(tmp_path / "a" if save_nvme else None, **case), half)
    save_checkpoint(rt, tmp_path / "ckpt")
    rt.close()
    rt, model, second = _train(0, _config(tmp_path / "b" if load_nvme else None, **case), half,
                               start=half, rt_hook=lambda r: load_checkpoint(r, tmp_path / "ckpt"))
    resumed = _result(rt, model, first + second)
    _assert_same(whole, resumed, f"saved {'offloaded' if save_nvme else 'in memory'}")


def _checkpoint_body(rank, world, root):
    from zerofx.checkpoint import load_checkpoint, save_checkpoint

    half, case = STEPS // 2, dict(stage=3, dtype="fp16", gas=2)
    whole = _result(*_train(rank, _config(None, **case)))
    rt, _, first = _train(rank, _config(f"{root}/nvme", **case), half)
    save_checkpoint(rt, f"{root}/ckpt")
    rt.close()
    rt, model, second = _train(rank, _config(None, **case), half, start=half,
                               rt_hook=lambda r: load_checkpoint(r, f"{root}/ckpt"))
    return whole, _result(rt, model, first + second)


@pytest.mark.slow
def test_two_rank_stage3_checkpoint_saved_offloaded_loads_in_memory(tmp_path):
    (tmp_path / "nvme").mkdir()
    for rank, (whole, resumed) in enumerate(run_ranks(_checkpoint_body, 2,
                                                      args=(str(tmp_path),), timeout_s=600)):
        _assert_same(whole, resumed, f"rank {rank}")


# ---- files and errors -----------------------------------------------------------------
def test_state_file_is_private_unlinked_and_freed_on_close(tmp_path, no_torchrun_env):
    rt, _, _ = _train(0, _config(tmp_path), steps=1, name="mlp")
    fd = rt.state.offload.file.fd
    st = os.fstat(fd)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_nlink == 0  # unlinked: the space is returned when the process ends
    assert st.st_size == 12 * rt.plan.shard_numel
    assert os.listdir(tmp_path) == []
    rt.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_optimizer_state_dict_reads_and_writes_the_file_and_destroy_frees_it(
        tmp_path, no_torchrun_env):
    import zerofx

    engines = [zerofx.initialize(model=make("mlp")[0], config=_config(d))[:2]
               for d in (None, tmp_path)]
    (mem, mem_opt), (off, off_opt) = engines
    sd = mem_opt.state_dict()
    got = off_opt.state_dict()  # read from the file
    for k, t in sd["state"].items():
        assert t.numel() == mem.runtime.plan.shard_numel and torch.equal(got["state"][k], t)
    sd["state"]["exp_avg"] += 1.0
    off_opt.load_state_dict(sd)  # written to the file
    assert torch.equal(off_opt.state_dict()["state"]["exp_avg"], sd["state"]["exp_avg"])
    fd = off.runtime.state.offload.file.fd
    off.destroy()
    with pytest.raises(OSError):
        os.fstat(fd)
    mem.destroy()


def test_unwritable_or_missing_path_is_one_error_naming_it(tmp_path, monkeypatch,
                                                            no_torchrun_env):
    from zerofx.runtime.offload import OffloadError

    missing = tmp_path / "no" / "such"
    with pytest.raises(OffloadError, match=f"{missing}.*No such file"):
        _train(0, _config(missing), steps=0)

    def denied(path, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(os, "mkdir", denied)  # root ignores modes: the OS's answer, simulated
    with pytest.raises(OffloadError, match=f"creating the directory {tmp_path}/zerofx-offload"
                                           f".*Permission denied.*writable"):
        _train(0, _config(tmp_path), steps=0)


def test_full_disk_at_startup_names_the_file(tmp_path, monkeypatch, no_torchrun_env):
    from zerofx.runtime.offload import OffloadError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OffloadError, match=rf"{tmp_path}/zerofx-offload-\d+-\w+/rank0\.state "
                                           r"failed: No space left on device; free space"):
        _train(0, _config(tmp_path), steps=0)
    assert os.listdir(tmp_path) == []  # nothing half-made is left


def test_full_disk_mid_step_is_one_error_and_the_state_is_never_read_again(
        tmp_path, monkeypatch, no_torchrun_env):
    from zerofx.checkpoint import load_checkpoint, save_checkpoint
    from zerofx.runtime.offload import OffloadError

    (tmp_path / "nvme").mkdir()
    rt, model, _ = _train(0, _config(tmp_path / "nvme", chunk=100), steps=3, name="mlp")
    save_checkpoint(rt, tmp_path / "ckpt")
    with rt.state.optimizer_state() as fp32:
        saved = {k: v.clone() for k, v in fp32.items()}
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    real_pwrite = os.pwrite
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 2:  # a few chunks are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", full)
    rt.backward(compiled(*mlp_batch(seed=99)))
    with pytest.raises(OffloadError, match=r"writing .*rank0\.state failed: No space left"):
        rt.step()
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    with pytest.raises(OffloadError, match="not usable: a write failed part way"):
        with rt.state.optimizer_state():
            pass
    with pytest.raises(OffloadError, match="not usable"):
        save_checkpoint(rt, tmp_path / "ckpt2")  # a half-written state is never saved
    load_checkpoint(rt, tmp_path / "ckpt")  # rewrites the whole state: usable again
    with rt.state.optimizer_state() as fp32:
        for k, t in saved.items():
            assert torch.equal(fp32[k], t), k
    rt.close()


def test_symlinks_are_never_followed(tmp_path, monkeypatch):
    from zerofx.runtime.offload import OffloadError
    from zerofx.runtime.offload import files

    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    (tmp_path / "dir").mkdir()
    os.symlink(target, tmp_path / "dir" / "rank0.state")
    with pytest.raises(OffloadError, match=f"creating {tmp_path}/dir/rank0.state failed"):
        files.open_private(str(tmp_path / "dir"), "rank0.state")
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: "fixed")
    os.symlink(tmp_path / "dir", tmp_path / f"zerofx-offload-{os.getpid()}-fixed")
    with pytest.raises(OffloadError, match="creating the directory .*-fixed failed: File exists"):
        files.StateFile.create(tmp_path, 4096, rank=0, block_size=4096)
    assert target.read_bytes() == b"keep"


@pytest.mark.parametrize("buffers, threads", [(1, 1), (2, 3), (3, 1), (5, 2)])
def test_stream_round_trips_with_any_buffer_count(buffers, threads, tmp_path):
    from zerofx.runtime.offload.files import StateFile
    from zerofx.runtime.offload.state import chunk_plan
    from zerofx.runtime.offload.stream import ChunkStream

    n = 10_000
    chunks = chunk_plan(n, 999)
    f = StateFile.create(tmp_path, 12 * n, rank=0, block_size=4096)
    stream = ChunkStream(f, chunks, buffer_count=buffers, threads=threads)
    data = torch.randn(3, n)
    stream.run(lambda i, a, b, fs: [t.copy_(data[k, a:b]) for k, t in enumerate(fs)],
               read=(0, 0), write=(0, 3))
    stream.run(lambda i, a, b, fs: fs[1].mul_(2), read=(0, 3), write=(1, 2))  # one field
    got = torch.empty(3, n)
    stream.run(lambda i, a, b, fs: [got[k, a:b].copy_(t) for k, t in enumerate(fs)],
               read=(0, 3), write=(0, 0))
    assert torch.equal(got, data * torch.tensor([[1.0], [2.0], [1.0]]))
    assert stream.chunks_read == 2 * len(chunks)
    stream.close()
    f.close()


def test_lamb_chunks_never_cut_a_tensor_piece():
    from zerofx.runtime.offload.state import chunk_plan

    # cuts allowed at 300, 1000, 1100 and 5000: a chunk ends at the farthest cut within its
    # budget, or at the next cut when none is (the stretch [1100, 5000) is one chunk)
    assert chunk_plan(6000, 500, [300, 1000, 1100, 5000]) == [
        (0, 300), (300, 1000), (1000, 1100), (1100, 5000), (5000, 6000)]
    assert chunk_plan(6000, 2000, [300, 1000, 1100, 5000]) == [
        (0, 1100), (1100, 5000), (5000, 6000)]
    assert chunk_plan(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_torch_optimizer_and_gpu_runs_are_refused(tmp_path, no_torchrun_env):
    import zerofx
    from zerofx.runtime.offload import OffloadError
    from zerofx.runtime.offload.state import check_offloadable

    model, _ = make("block")
    cfg = _config(tmp_path)
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True
    with pytest.raises(OffloadError, match="torch optimizer object cannot be streamed"):
        zerofx.ZeroRuntime(model, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(OffloadError, match="CPU-only runs"):
        check_offloadable(torch.device("cuda", 0), "adam")


@pytest.mark.parametrize("zero, aio, culprit", [
    ({"stage": 0, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, None,
     "'zero_optimization.offload_optimizer.device' is 'nvme' at stage 0"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, None, "nvme_path"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp", "ratio": 0.3}},
     None, "ratio"),
    ({"stage": 2, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}, None,
     "parameter offload works at ZeRO stage 3 only"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}},
     {"use_gds": True}, "GPUDirect"),
])
def test_offload_keys_refused_by_name(zero, aio, culprit):
    from zerofx.config import Config, ConfigError

    raw = {"zero_optimization": zero, **({"aio": aio} if aio else {})}
    with pytest.raises(ConfigError, match=culprit):
        Config.from_dict(raw)


def test_deepspeed_offload_block_is_read(caplog):
    import logging

    from zerofx.config import Config

    raw = {"zero_optimization": {"stage": 3, "sub_group_size": 4096, "offload_optimizer": {
        "device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True, "buffer_count": 5,
        "fast_init": False, "pipeline_read": True, "cpuadam_cores_perc": 0.8}},
        "aio": {"block_size": 262144, "queue_depth": 32, "intra_op_parallelism": 2,
                "single_submit": False, "overlap_events": True}}
    with caplog.at_level(logging.WARNING, logger="zerofx.config.deepspeed_keys"):
        cfg = Config.from_dict(raw)
    z = cfg.zero_optimization
    assert (z.offload_optimizer.device, z.offload_optimizer.nvme_path, z.sub_group_size,
            z.offload_optimizer.buffer_count) == ("nvme", "/local_nvme", 4096, 5)
    assert (cfg.aio.block_size, cfg.aio.intra_op_parallelism) == (262144, 2)
    assert "aio.queue_depth" in caplog.text and "cpuadam_cores_perc" in caplog.text
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_default_chunk_keeps_the_buffers_a_fraction_of_the_state():
    from zerofx.runtime.offload import default_chunk

    assert default_chunk(1000) == 1 << 20  # small shards: one chunk, 12 MiB buffers at most
    assert default_chunk(160 << 20) == 10 << 20  # a sixteenth
    assert default_chunk(10 << 30) == 1 << 24  # large shards: 192 MiB per buffer


def test_a_full_disk_while_staging_a_save_is_one_error_and_the_last_checkpoint_stays(
        tmp_path, monkeypatch, no_torchrun_env):
    """A save stages the NVMe-offloaded state in files beside it (it streams: a state larger
    than memory saves, tests/test_offload_checkpoint_memory.py); no room for them is one
    error naming the path and the key, and the checkpoint already saved in the same folder is
    untouched and loads."""
    from zerofx.checkpoint import load_checkpoint, save_checkpoint
    from zerofx.runtime.offload import OffloadError

    rt, _, _ = _train(0, _config(tmp_path, stage=2), steps=1)
    save_checkpoint(rt, tmp_path / "ckpt")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", full)
        with pytest.raises(OffloadError, match=r"staging copy.*No space left.*"
                                               r"offload_optimizer\.nvme_path"):
            save_checkpoint(rt, tmp_path / "ckpt")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*")) == before
    load_checkpoint(rt, tmp_path / "ckpt")
    rt.close()


def test_a_long_whole_state_pass_says_how_far_it_is(tmp_path, monkeypatch, caplog,
                                                     no_torchrun_env):
    """A checkpoint's read of a large offloaded state takes minutes at disk speed: past a
    while it reports the bytes done, growing, naming the rank and the file; a quick pass
    says nothing."""
    import zerofx.runtime.offload.state as st

    rt, _, _ = _train(0, _config(tmp_path, chunk=100), steps=1, name="mlp")
    off = rt.state.offload
    assert len(off.chunks) > 3
    caplog.clear()
    with caplog.at_level("WARNING", logger=st.__name__):
        off.read_all()
    assert not [r for r in caplog.records if r.name == st.__name__]  # quicker than NOTE_S
    monkeypatch.setattr(st, "NOTE_S", 0.0)
    monkeypatch.setattr(st, "NOTE_EVERY_S", 0.0)
    with caplog.at_level("WARNING", logger=st.__name__):
        off.read_all()
    notes = [r.getMessage() for r in caplog.records if r.name == st.__name__]
    assert len(notes) == len(off.chunks) - 1, notes  # every chunk but the last: not silent
    assert all("rank 0" in m and off.file.path in m and "reading it whole" in m
               for m in notes), notes
    done = [int(m.split("(")[-1].split("%")[0]) for m in notes]
    assert done == sorted(done) and 0 < done[0] and done[-1] < 100, done
    rt.close()

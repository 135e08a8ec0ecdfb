"""zero.Init(remote_device="nvme"): parameters built in private files (runtime/init_store.py).

References: the same model built normally (same seed: the same initialiser calls on the same
values), for the values after construction and for 5 training steps on 2 ranks seeded
differently (rank 0's weights are broadcast, whichever way they were built). Independent
checks: where a parameter's storage lives is read from /proc/self/maps, memory from
/proc/self/status (RssAnon), not from anything zero.Init records.
"""
import errno
import os

import pytest
import torch
from torch import nn

from memprobe import PeakAnon, malloc_returns_frees
from models import Block, block_batch
from multiproc import run_ranks
from test_offload_param import _config, _result

STEPS = 5


def _init_cfg(path, **extra):
    return {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme",
                                                                "nvme_path": str(path)}},
            **extra}


def _backing(model):
    """{name: the file /proc/self/maps names for its storage, or None (anonymous)}."""
    from zerofx.runtime.init_store import is_file_backed

    return {n: is_file_backed(p) for n, p in model.named_parameters()}


def _maps_under(path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if str(path) in line]


def test_parameters_built_in_the_context_live_in_private_files(tmp_path, no_torchrun_env):
    import zerofx

    torch.manual_seed(3)
    ref = Block()
    torch.manual_seed(3)
    with zerofx.zero.Init(remote_device="nvme", config_dict_or_path=_init_cfg(tmp_path),
                          dtype=torch.float32):
        model = Block()
    outside = nn.Linear(4, 4)
    for name, where in _backing(model).items():
        assert where is not None and where.startswith(f"{tmp_path}/zerofx-offload-"), name
        assert where.endswith("(deleted)"), name  # no name anyone could open
    assert _backing(outside) == {"weight": None, "bias": None}
    assert os.listdir(tmp_path) == []
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q), n  # same values, same init
    assert model.head.weight.requires_grad and isinstance(model.head.weight, nn.Parameter)
    del model, p, q  # the loop's last parameter too
    assert _maps_under(tmp_path) == []  # freed with the parameters: the disk space too


def test_dtype_defaults_to_the_configs_and_casts_before_initialisers_run(
        tmp_path, no_torchrun_env):
    import zerofx

    cfg = _init_cfg(tmp_path, bf16={"enabled": True})
    torch.manual_seed(5)
    with zerofx.zero.Init(config_dict_or_path=cfg):  # the config's offload_param decides
        model = Block()
    # reference: nn.Linear / Embedding initialise after registration, so they draw in bf16
    torch.manual_seed(5)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        ref = Block()
    finally:
        torch.set_default_dtype(old)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), n
    assert all(w is not None for w in _backing(model).values())


def test_module_argument_moves_a_built_model(tmp_path, no_torchrun_env):
    import zerofx

    model = Block()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zerofx.zero.Init(module=model, remote_device="nvme", dtype=torch.float32,
                     config_dict_or_path=_init_cfg(tmp_path))
    assert all(w is not None for w in _backing(model).values())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# 8 x 3072x3072 fp32 weights, 36 MiB each (288 MiB): above glibc's largest dynamic mmap
# threshold (32 MiB), so every weight is its own mapping and the control sees each one; with
# smaller weights a normal build reused heap memory that earlier tests had freed (RssAnon
# rose by 36 of 64 MiB in a full-suite run) and the control failed
_DIM, _LAYERS = 3072, 8


def _tower():
    return nn.Sequential(*[nn.Linear(_DIM, _DIM, bias=False) for _ in range(_LAYERS)])


@pytest.mark.slow
def test_construction_needs_about_one_parameter_of_anonymous_memory(tmp_path,
                                                                    no_torchrun_env):
    import zerofx

    size = _LAYERS * _DIM * _DIM * 4
    with PeakAnon() as in_files:
        with zerofx.zero.Init(remote_device="nvme", dtype=torch.float32,
                              config_dict_or_path=_init_cfg(tmp_path)):
            model = _tower()
    with PeakAnon() as whole:  # the control: the measurement sees a normal build
        normal = _tower()
    assert whole.peak > 0.9 * size
    assert in_files.peak < size / 4, (in_files.peak, size)  # one layer is size / 8
    del model, normal


def test_errors_name_the_key_or_the_path(tmp_path, monkeypatch, no_torchrun_env):
    import zerofx
    from zerofx.config import ConfigError
    from zerofx.runtime.offload import OffloadError

    with pytest.raises(ConfigError, match="offload_param.nvme_path"):
        zerofx.zero.Init(remote_device="nvme")
    with pytest.raises(ConfigError, match="remote_device='gpu'"):
        zerofx.zero.Init(remote_device="gpu")
    missing = tmp_path / "no" / "such"
    with pytest.raises(OffloadError, match=f"{missing}.*No such file.*offload_param"):
        with zerofx.zero.Init(remote_device="nvme", config_dict_or_path=_init_cfg(missing)):
            Block()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OffloadError, match=rf"{tmp_path}/zerofx-offload-\d+-\w+/rank0\.init "
                                           r"failed: No space left on device; free space"):
        with zerofx.zero.Init(remote_device="nvme", config_dict_or_path=_init_cfg(tmp_path)):
            Block()
    assert os.listdir(tmp_path) == []  # nothing half-made is left
    # the context's hook is gone after the error: a model built now is ordinary memory
    assert _backing(Block()) == dict.fromkeys(_backing(Block()), None)


# ---- training: built in files == built normally -----------------------------------------
def _train(rank, model, cfg):
    import zerofx

    torch._dynamo.reset()
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    losses = []
    for step in range(STEPS):
        with rt.shape_carriers():
            loss = compiled(*block_batch(seed=1000 * step + 10 * rank))
        rt.backward(loss)
        rt.step()
        losses.append(loss.item())
    return rt, losses


def _built(rank, how, init_dir, cfg_init, dtype):
    """Block() seeded per rank (rank 0's weights win at initialize), built ``how``."""
    import zerofx

    torch.manual_seed(100 + rank)
    if how == "normal":
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return Block(), None
        finally:
            torch.set_default_dtype(old)
    with zerofx.zero.Init(remote_device="nvme", config_dict_or_path=cfg_init, dtype=dtype):
        model = Block()
    backing = _backing(model)
    assert all(w is not None and w.startswith(str(init_dir)) for w in backing.values())
    return model, init_dir


def _two_rank_body(rank, world, root):
    cases = {"memory": _config(None), "offload": _config(f"{root}/p", opt_nvme=f"{root}/o")}
    out = {}
    for case, cfg in cases.items():
        init_dir = f"{root}/p" if case == "offload" else f"{root}/i"
        cfg_init = cfg if case == "offload" else _init_cfg(init_dir)
        for dtype in (torch.float32, torch.bfloat16):
            for how in ("normal", "init"):
                model, files = _built(rank, how, init_dir, cfg_init, dtype)
                rt, losses = _train(rank, model, cfg)
                mapped = len(_maps_under(init_dir)) if files else 0
                res = _result(rt, model, losses)  # closes the runtime
                res.update(mapped=mapped, left=os.listdir(init_dir) if files else [])
                out[(case, str(dtype), how)] = res
    return out


@pytest.mark.slow
def test_two_ranks_built_in_files_train_like_built_normally(tmp_path):
    for d in ("p", "o", "i"):
        (tmp_path / d).mkdir()
    results = run_ranks(_two_rank_body, 2, args=(str(tmp_path),), timeout_s=600)
    for rank, res in enumerate(results):
        for (case, dtype, how), got in res.items():
            if how == "normal":
                continue
            ref = res[(case, dtype, "normal")]
            where = f"rank {rank}, {case}, {dtype}"
            assert got["losses"] == ref["losses"], where
            assert torch.equal(got["shard"], ref["shard"]), where
            for n, t in ref["whole"].items():
                assert torch.equal(got["whole"][n], t), f"{where}: {n}"
            for k, t in ref["state"].items():
                assert torch.equal(got["state"][k], t), f"{where}: {k}"
            assert got["mapped"] == 0, where  # initialize dropped every file's mapping
            assert got["left"] == [], where
    # rank 0's weights, whichever way built: both ranks trained one model
    assert results[0][("memory", "torch.float32", "init")]["whole"].keys()
    for key in results[0]:
        for n, t in results[0][key]["whole"].items():
            assert torch.equal(results[1][key]["whole"][n], t), (key, n)


# ---- initialize streams: no shard-sized fp32 master in memory ----------------------------
def _initialize_body(rank, world, root):
    import zerofx
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed()  # gloo's own buffers: before the measurement
    malloc_returns_frees()  # the probe sees live bytes, not blocks the heaps keep
    cfg = _config(f"{root}/p", opt_nvme=f"{root}/o", form="all_gather")  # no forms timed
    zerofx.ZeroRuntime(Block(), cfg).close()  # the kernels and code paths loaded: not measured
    cfg["zero_optimization"].update(stage3_prefetch_bucket_size=1 << 22,
                                    reduce_bucket_size=1 << 22, sub_group_size=1 << 18)
    cfg["zero_optimization"]["offload_param"].update(buffer_size=1 << 22)
    torch.manual_seed(rank)
    with zerofx.zero.Init(config_dict_or_path=cfg):
        model = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)])
    with PeakAnon() as peak:
        rt = zerofx.ZeroRuntime(model, cfg)
    shard = rt.plan.shard_numel
    mapped = len(_maps_under(f"{root}/p"))
    with rt.state.optimizer_state() as fp32:  # the file holds the master: rank 0's values
        master = fp32["master"].clone()
    pieces = {o.slot.name: o for o in rt.plan.owned_pieces()}
    rt.close()
    return peak.peak, shard, mapped, master, {n: (o.start, o.numel, o.at)
                                              for n, o in pieces.items()}


@pytest.mark.slow
def test_initialize_fills_the_offloaded_master_by_chunks(tmp_path):
    """An in-memory fill allocates the fp32 master (4 bytes per shard element) beside the
    16-bit gradient shard (2); the chunked fill only the latter and a few chunk buffers
    (measured: 2.4-3.1 x the shard's elements in bytes; the rest is thread arenas and
    chunk temporaries). The broadcast sends each weight from its own (mapped) memory."""
    for d in ("p", "o"):
        (tmp_path / d).mkdir()
    results = run_ranks(_initialize_body, 2, args=(str(tmp_path),), timeout_s=300)
    torch.manual_seed(0)  # rank 0's model, built normally, in bf16 (the config's dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        ref = nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(16)])
    finally:
        torch.set_default_dtype(old)
    for rank, (peak, shard, mapped, master, pieces) in enumerate(results):
        # an in-memory fill: > 6 x shard (gradient shard 2 + master 4, the overheads beside)
        assert peak < 4 * shard, (rank, peak, shard)
        assert mapped == 0
        for n, p in ref.named_parameters():
            if n in pieces:
                start, numel, at = pieces[n]
                want = p.detach().reshape(-1)[start:start + numel].float()
                assert torch.equal(master[at:at + numel], want), (rank, n)

"""zerofx.runtime.fused_optim: kernel loading and its fallback, the ops as graph nodes, and the
front-end helpers. The numerics of each op are in test_fused_adam.py and test_fused_lamb.py."""
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from zerofx.runtime import fused_optim, kernels
from zerofx.runtime.fused_optim import AdamHyper, LambHyper

CSRC = Path(fused_optim.__file__).resolve().parent.parent / "csrc"


def test_load_kernels_is_idempotent_and_cached():
    first = fused_optim.load_kernels()
    hits = fused_optim.load_kernels.cache_info().hits
    assert fused_optim.load_kernels() is first
    assert fused_optim.load_kernels.cache_info().hits == hits + 1


def test_build_failure_warns_and_falls_back(monkeypatch, caplog):
    def fail(sources, *, cuda):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "_build_and_load", fail)
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert fused_optim.load_kernels.__wrapped__() is False  # the uncached body, run once
    [record] = caplog.records
    assert "plain-torch fallback" in record.getMessage()
    assert "no compiler here" in record.getMessage()


def test_cuda_build_failure_keeps_the_cpu_kernels(monkeypatch, caplog):
    built = []

    def build(sources, *, cuda):
        if cuda:
            raise RuntimeError("nvcc missing")
        built.append(sources)

    monkeypatch.setattr(kernels, "_build_and_load", build)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert fused_optim.load_kernels.__wrapped__() is True
    assert built == [kernels._CPU_SOURCES]
    [record] = caplog.records
    assert "CUDA tensors use the plain-torch fallback" in record.getMessage()


_FALLBACK_SCRIPT = textwrap.dedent("""
    import logging, torch
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from zerofx.runtime import fused_optim, kernels, optim_ops
    def fail(sources, *, cuda):
        raise RuntimeError("simulated build failure")
    kernels._build_and_load = fail
    assert fused_optim.load_kernels() is False and fused_optim.load_kernels() is False
    p, m, v, g = torch.randn(100), torch.zeros(100), torch.zeros(100), torch.randn(100)
    p2, m2, v2 = p.clone(), m.clone(), v.clone()
    fused_optim.adam_step_(p, g, m, v, lr=1e-2, step=1)  # through torch.ops.zerofx
    t = lambda x: torch.tensor(float(x))
    optim_ops.adam_step_fallback(p2, g, m2, v2, None, t(1e-2), t(1), t(1), t(0),
                                 **fused_optim.adam_kwargs(fused_optim.AdamHyper()))
    assert torch.equal(p, p2) and torch.equal(m, m2) and torch.equal(v, v2)
    b = torch.tensor([0, 60, 100])
    r = fused_optim.lamb_step_(p, g, m, v, b, lr=1e-2, step=2, hyper=fused_optim.LambHyper())
    assert r.shape == (2,) and p.isfinite().all()
    print("FALLBACK_OK")
""")


def test_ops_run_the_fallback_in_a_process_without_kernels():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "FALLBACK_OK" in proc.stdout
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "simulated build failure" in warnings[0]  # said once


def _adam_graph_step(p, g, m, v, out, lr, step, scale, skip):
    torch.ops.zerofx.adam_step_(p, g, m, v, out, lr, step, scale, skip,
                                **fused_optim.adam_kwargs(AdamHyper(weight_decay=0.01)))
    return out.sum()


def _inputs(n=64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=gen), torch.randn(n, generator=gen).bfloat16(),
            torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)]


def test_ops_are_nodes_of_a_traced_step_graph():
    from torch.fx.experimental.proxy_tensor import make_fx

    scalars = [torch.tensor(1e-3), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(False)]
    gm = make_fx(_adam_graph_step)(*_inputs(), *scalars)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.zerofx.adam_step_.default in targets


def test_compiles_without_recompiling_when_per_step_values_change():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_adam_graph_step, backend=counter, fullgraph=True)
    eager, traced = _inputs(), _inputs()
    for step in range(1, 4):
        scalars = [torch.tensor(1e-3 * step), torch.tensor(float(step)), torch.tensor(0.5),
                   torch.tensor(step == 2)]
        _adam_graph_step(*eager, *scalars)
        compiled(*traced, *scalars)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    assert counter.frame_count == 1


def test_combined_grad_scale_follows_deepspeed_clipping():
    scale = fused_optim.combined_grad_scale
    assert scale(1024.0).item() == pytest.approx(1 / 1024)
    # (grad_norm / loss_scale + 1e-6) / max_grad_norm = 4 > 1: clip by 4
    got = scale(8.0, grad_norm=torch.tensor(8.0 * 2.0), max_grad_norm=0.5)
    assert got.item() == pytest.approx(1 / (8.0 * (2.0 + 1e-6) / 0.5))
    # a norm under the limit: no clipping, and max_grad_norm=0 disables it
    assert scale(8.0, grad_norm=torch.tensor(1.0), max_grad_norm=5.0).item() == 0.125
    assert scale(8.0, grad_norm=torch.tensor(1e9), max_grad_norm=0.0).item() == 0.125


@pytest.mark.parametrize("kwargs", [dict(betas=(0.9, 1.0)), dict(betas=(0.9,)), dict(eps=-1.0),
                                    dict(weight_decay=-0.1)])
def test_hyperparameters_are_checked(kwargs):
    with pytest.raises(ValueError):
        AdamHyper(**kwargs)
    with pytest.raises(ValueError):
        LambHyper(**kwargs)


def test_kwargs_match_the_op_schemas():
    def kwarg_names(op):
        return {a.name for a in op.default._schema.arguments if a.kwarg_only}

    assert set(fused_optim.adam_kwargs(AdamHyper())) == kwarg_names(torch.ops.zerofx.adam_step_)
    assert set(fused_optim.lamb_kwargs(LambHyper(), apply=False)) | {"shard_offset"} == \
        kwarg_names(torch.ops.zerofx.lamb_moments_)
    assert set(fused_optim.lamb_kwargs(LambHyper(), apply=True)) | {"shard_offset"} == \
        kwarg_names(torch.ops.zerofx.lamb_apply_)


@pytest.mark.skipif(not os.environ.get("ZEROFX_NVCC_CHECK") or shutil.which("nvcc") is None,
                    reason="set ZEROFX_NVCC_CHECK=1 on a machine with nvcc (about 2 minutes)")
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile-check of the .cu files where torch has no CUDA but nvcc is installed."""
    include = Path(torch.__file__).parent / "include"
    # CPU wheels lack this generated header; a CUDA build of torch ships it with this content.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    unit = tmp_path / "all.cu"  # one translation unit: the torch headers are parsed once
    unit.write_text('#include "fused_adam.cu"\n#include "fused_lamb.cu"\n')
    cmd = ["nvcc", "-arch=sm_90", "-std=c++20", "-O3", "-c", str(unit), "-o",
           str(tmp_path / "all.o"), f"-I{tmp_path}", f"-I{include}",
           f"-I{include / 'torch/csrc/api/include'}", f"-I{CSRC}", "--expt-relaxed-constexpr",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "error" not in proc.stderr.lower()

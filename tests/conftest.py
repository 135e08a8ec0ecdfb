"""Shared fixtures. Tests run on 2 cores: keep torch to one intra-op thread per process."""
import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (models, multiproc)
# One collective-form cache for the session (runtime/comm/form_cache.py), inherited by the ranks:
# tests neither read nor write the user's ~/.cache/zerofx.
os.environ.setdefault("ZEROFX_CACHE_DIR", tempfile.mkdtemp(prefix="zerofx-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache hits or recompile limits across tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def as_deepspeed():
    """zerofx.as_deepspeed() for one test: `import deepspeed` gives zerofx inside it, and
    every deepspeed module and the import hook are gone after it."""
    import sys

    import zerofx

    meta_path, modules = list(sys.meta_path), set(sys.modules)
    try:
        yield zerofx.as_deepspeed()
    finally:
        sys.meta_path[:] = meta_path
        for k in [k for k in sys.modules if k.split(".")[0] == "deepspeed" and k not in modules]:
            sys.modules.pop(k)


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _kernels_built_once():
    """JIT-build the C++ kernels once, up front, in this process: on a fresh machine the
    first build takes about a minute, and it must not land inside a time-bounded
    multi-rank test where every rank would wait on it."""
    from zerofx.runtime.fused_optim import load_kernels

    load_kernels()

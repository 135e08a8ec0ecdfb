"""Imported once by the rank server of multiproc.run_ranks, before it forks any rank: what
every rank would otherwise import itself. Nothing here runs torch code (no thread pool may
exist in a process that forks)."""
import importlib

import torch  # noqa: F401
import torch.distributed  # noqa: F401
import torch._dynamo  # noqa: F401
import torch._functorch.aot_autograd  # noqa: F401

import zerofx  # noqa: F401
import zerofx.backend  # noqa: F401
import zerofx.engine  # noqa: F401
from zerofx.runtime.fused_optim import load_kernels

load_kernels()  # built by conftest (or the benchmark) already: this only loads the library

for _name in ("transformers", "transformers.models.gpt2.modeling_gpt2",
              "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
              "transformers.models.t5.modeling_t5", "transformers.models.mixtral.modeling_mixtral"):
    try:  # optional: only the Hugging Face tests need it
        importlib.import_module(_name)
    except ImportError:
        break

"""Imported once by the rank server of multiproc.run_ranks, before it forks any rank: what
every rank would otherwise import itself. Nothing here runs torch code (no thread pool may
exist in a process that forks)."""
import importlib
import sys

import torch  # noqa: F401
import torch.distributed  # noqa: F401
import torch._dynamo  # noqa: F401
import torch._functorch.aot_autograd  # noqa: F401
# imported by Dynamo, AOTAutograd and symbolic shapes at a rank's first compile (~0.5 s each)
import torch._inductor.debug  # noqa: F401
import torch.distributed.tensor.experimental  # noqa: F401
import torch.export._trace  # noqa: F401
from torch._dynamo import funcname_cache

import zerofx  # noqa: F401
import zerofx.backend  # noqa: F401
import zerofx.engine  # noqa: F401
import zerofx.checkpoint  # noqa: F401
import zerofx.passes.tensor_parallel  # noqa: F401
from zerofx.runtime.fused_optim import load_kernels

load_kernels()  # built by conftest (or the benchmark) already: this only loads the library

for _name in ("transformers", "transformers.models.gpt2.modeling_gpt2",
              "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
              "transformers.models.t5.modeling_t5", "transformers.models.mixtral.modeling_mixtral",
              "transformers.models.phi3.modeling_phi3", "transformers.models.bloom.modeling_bloom",
              "transformers.models.falcon.modeling_falcon", "transformers.models.gptj.modeling_gptj",
              "transformers.models.distilbert.modeling_distilbert",
              "transformers.models.roberta.modeling_roberta", "transformers.models.vit.modeling_vit",
              "transformers.models.qwen2.modeling_qwen2"):
    try:  # optional: only the Hugging Face tests need it
        importlib.import_module(_name)
    except ImportError:
        break


# Dynamo names the function of every op it records (funcname_cache), tokenizing each source
# file the first time a process traces into it: torch/nn/functional.py alone takes ~0.5 s, a
# rank ~0.8 s in all, in every rank of every test. Tokenized here once, the ranks inherit it.
_TRACED = ("torch.nn.", "zerofx.", "transformers.models.")
_SHARED = {"transformers.modeling_utils", "transformers.cache_utils", "transformers.activations",
           "transformers.masking_utils", "transformers.pytorch_utils",
           "transformers.modeling_layers", "transformers.integrations.sdpa_attention",
           "transformers.loss.loss_utils"}
for _mod in list(sys.modules.values()):
    _path, _name = getattr(_mod, "__file__", None) or "", getattr(_mod, "__name__", "")
    if _path.endswith(".py") and (_name.startswith(_TRACED) or _name in _SHARED):
        funcname_cache.get_funcname(_path, 0)

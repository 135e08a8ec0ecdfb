"""``backend="zero"`` without the installed entry point: a checkout on PYTHONPATH.

The entry point (setup.py) exists only once the package is installed; a cluster's shared
file system or a lent GPU machine runs the checkout as it is. There ``zerofx.initialize``
died in torch's InvalidBackend before zerofx.backend registered the name itself.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import importlib.metadata as md

    _real = md.entry_points

    def without_zero(**kw):  # the checkout is not installed: no "zero" entry point
        eps = _real(**kw)
        if kw.get("group") == "torch_dynamo_backends":
            return md.EntryPoints([e for e in eps if e.name != "zero"])
        return eps

    md.entry_points = without_zero

    import torch
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend("zero")
        raise SystemExit("the entry point was not hidden: this test would prove nothing")
    except InvalidBackend:
        pass

    import zerofx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    ref.load_state_dict(model.state_dict())
    cfg = {"train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}}
    engine, *_ = zerofx.initialize(model=model, config=cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for k in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(k))
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
        ref_loss = ref(x).square().mean()
        opt.zero_grad()
        ref_loss.backward()
        opt.step()
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    print("trained")
""")


@pytest.mark.slow  # a fresh interpreter compiles a model: ~6 s
def test_initialize_from_a_checkout_without_the_entry_point():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-3000:]


def test_tools_import_from_a_checkout_that_is_not_installed(tmp_path):
    """setup.py installs tools/ as zerofx.tools; a checkout on PYTHONPATH has no such
    package unless zerofx provides it (the launcher's and consolidate's modules)."""
    script = textwrap.dedent(f"""
        import sys
        # this test venv installs zerofx in editable mode: drop that finder, as a checkout
        # that was never installed has none, and prove zerofx.tools is then not found by it
        sys.meta_path[:] = [f for f in sys.meta_path
                            if "editable" not in getattr(f, "__name__", type(f).__name__).lower()]
        sys.path.insert(0, {str(ROOT)!r})
        import importlib.util
        import zerofx
        from zerofx.tools import hostfile, launch
        assert hostfile.__file__.startswith({str(ROOT / "tools")!r}), hostfile.__file__
        print("tools", launch.__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "tools zerofx.tools.launch" in proc.stdout, \
        proc.stderr[-3000:]

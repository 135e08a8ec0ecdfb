"""glibc's mmap threshold fixed (runtime/host_malloc.py): a freed step's activations leave the
resident set. Each case is a fresh interpreter (the allocator's state is the process's).

The pattern is a training step's: after a larger block was freed (glibc then raises its
dynamic threshold to that block's size), 1 MiB activations are allocated between small
tensors that survive the step, and the activations are freed. With glibc's default the
activations came from the arena and stay resident behind the survivors; fixed at 128 KiB
they were mappings of their own and are gone.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from zerofx.config import Config, ConfigError

MIB = 1 << 20
ACTIVATIONS = 64  # of 1 MiB each

_STEP = textwrap.dedent(f"""
    import torch
    from zerofx.runtime.host_memory import process_status

    def anon():
        return process_status()["RssAnon"]

    def held_after_a_step():
        big = torch.ones(8 << 18)  # 8 MiB, mapped; freed: glibc's threshold rises to it
        del big
        base, keep, acts = anon(), [], []
        for _ in range({ACTIVATIONS}):
            acts.append(torch.ones(1 << 18))  # 1 MiB
            # 100 KiB that outlives the step: below both thresholds (in the arena), and
            # larger than the holes the imports left, so it lands after the activation
            keep.append(torch.ones(25 << 10))
        del acts
        return anon() - base - sum(k.nbytes for k in keep)
""")


def _held(setup: str, **env: str) -> int:
    """Bytes still resident after the step, in a fresh interpreter after ``setup``, with
    glibc's own knobs and a launcher's rank variables cleared, then ``env`` set."""
    code = _STEP + textwrap.dedent(setup) + "\nprint(held_after_a_step())\n"
    clear = ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "RANK", "WORLD_SIZE", "LOCAL_RANK",
             "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in clear} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def _glibc() -> bool:
    import ctypes
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
        return True
    except AttributeError:
        return False


pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc's allocator only")


def test_glibcs_default_keeps_a_steps_freed_activations_resident():
    # the control: without it the other tests could pass on any allocator
    assert _held("") > ACTIVATIONS * MIB // 2


def test_a_fixed_threshold_gives_them_back():
    held = _held("from zerofx.runtime.host_malloc import release_freed\n"
                 "assert release_freed(128 << 10) == 128 << 10\n")
    assert held < 4 * MIB, held


def test_the_users_own_glibc_setting_wins():
    held = _held("from zerofx.runtime.host_malloc import release_freed\n"
                 "assert release_freed(128 << 10) is None\n",
                 MALLOC_MMAP_THRESHOLD_=str(32 << 20))
    assert held > ACTIVATIONS * MIB // 2


_ENGINE = """
    import torch, zerofx
    model = torch.nn.Linear(8, 8)
    engine, *_ = zerofx.initialize(model=model, config={{
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3}}}},
        "zerofx": {zerofx}}})
"""


@pytest.mark.slow
@pytest.mark.parametrize("block, gives_back", [({"host_mmap_threshold": 128 << 10}, True),
                                               ({}, False)])
def test_an_engine_fixes_it_when_asked_and_leaves_glibc_alone_by_default(block, gives_back):
    held = _held(_ENGINE.format(zerofx=repr(block)))
    assert (held < 4 * MIB) if gives_back else (held > ACTIVATIONS * MIB // 2), held


@pytest.mark.parametrize("bad", [0, 1000, 64 << 20, "128k", True])
def test_a_threshold_glibc_cannot_take_is_refused_naming_the_key(bad):
    with pytest.raises(ConfigError, match="host_mmap_threshold"):
        Config.from_any({"train_micro_batch_size_per_gpu": 1,
                         "zerofx": {"host_mmap_threshold": bad}})

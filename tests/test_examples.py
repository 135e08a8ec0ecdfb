"""The README's example runs and its loss falls (a shortened run)."""
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow  # ~10 s: the whole example script
def test_quickstart_loss_falls(no_torchrun_env, tmp_path):
    main = runpy.run_path(str(EXAMPLES / "quickstart.py"))["main"]
    assert main(["--steps", "25", "--dump", str(tmp_path / "dump")]) == 0
    assert list((tmp_path / "dump").glob("rank0/*/joint/01_mixed_precision.py"))


def test_the_main_jobs_throughput_leaves_validation_out():
    import time

    Throughput = runpy.run_path(str(EXAMPLES / "train_gpt.py"))["Throughput"]
    rate = Throughput()
    rate.start(0)
    with rate.paused():  # a validation pass: 0.3 s that are not training
        time.sleep(0.3)
    time.sleep(0.05)
    # 1000 tokens in ~0.05 s of training: ~20k tokens/s, not ~2.9k
    assert rate(1000) > 1000 / 0.2


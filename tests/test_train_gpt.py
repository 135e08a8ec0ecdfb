"""The main job, shortened: 2 ranks through zerofx-launch, save, resume, sample."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _launch(tmp_path, *extra, timeout=400, config="ds_config.json"):
    cmd = [sys.executable, "-m", "zerofx.tools.launch", "--num_gpus", "2",
           str(ROOT / "examples" / "train_gpt.py"),
           "--deepspeed_config", str(ROOT / "examples" / config),
           "--save_dir", str(tmp_path / "ckpt"), "--sample_chars", "40", *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


def _losses(stdout):
    return [float(m) for m in re.findall(r"step \d+/\d+ loss ([0-9.]+)", stdout)]


@pytest.mark.slow
def test_train_save_resume_sample(tmp_path):
    first = _launch(tmp_path, "--steps", "40")
    losses = _losses(first)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, first  # clearly falling
    assert "--- sample ---" in first and "Shall I " in first
    assert first.count("peak RSS") == 2 and "tokens/s" in first  # both ranks report
    resumed = _launch(tmp_path, "--steps", "60", "--resume")
    assert "resumed from" in resumed and "at step 40" in resumed
    more = _losses(resumed)
    assert len(more) == 2 and more[0] < losses[0] - 0.5  # continues the curve, no restart


@pytest.mark.slow
def test_tensor_parallel_variant_trains_and_samples(tmp_path):
    out = _launch(tmp_path, "--steps", "30", config="ds_config_tp.json")
    losses = _losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, out
    assert "--- sample ---" in out and out.count("peak RSS") == 2

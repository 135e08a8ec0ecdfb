"""The main job, shortened: 2 ranks through zerofx-launch, save, resume, sample."""
import csv
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
           "--out_dir", str(tmp_path / "run"), "--sample_chars", "40", "--eval_every", "20",
           *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


def _losses(stdout):
    return [float(m) for m in re.findall(r"step \d+/\d+ \| train loss \(10-step mean\) "
                                         r"([0-9.]+)", stdout)]


def _curve(tmp_path):
    with open(tmp_path / "run" / "curve.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_save_resume_sample(tmp_path):
    first = _launch(tmp_path, "--steps", "40")
    losses = _losses(first)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, first  # clearly falling
    assert "--- sample ---" in first and "Shall I " in first
    assert first.count("peak RSS") == 2 and "tokens/s steady state" in first  # both ranks
    assert "tensor parallel 1 x data parallel 2; global batch 32" in first
    rows = _curve(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 2 and vals[-1] < vals[0]  # held-out loss, at steps 20 and 40
    assert (tmp_path / "run" / "checkpoint" / "latest").read_text() == "global_step40"
    resumed = _launch(tmp_path, "--steps", "60", "--resume")
    assert "resumed from" in resumed and "at step 40" in resumed
    more = _losses(resumed)
    assert len(more) == 2 and more[0] < losses[0] - 0.5  # continues the curve, no restart
    assert [int(r["step"]) for r in _curve(tmp_path)] == list(range(1, 61))  # appended


@pytest.mark.slow
def test_tensor_parallel_variant_trains_and_samples(tmp_path):
    out = _launch(tmp_path, "--steps", "30", config="ds_config_tp.json")
    losses = _losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, out
    assert "--- sample ---" in out and out.count("peak RSS") == 2
    assert "tensor parallel 2 x data parallel 1; global batch 16" in out


def test_default_outputs_are_per_config_inside_the_examples_folder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "examples" / "train_gpt.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    dirs = {c: Path(job.parse_args(["--deepspeed_config", str(ROOT / "examples" / c)]).out_dir)
            for c in ("ds_config.json", "ds_config_tp.json")}
    assert dirs["ds_config.json"] == ROOT / "examples" / "runs" / "ds_config"
    assert dirs["ds_config_tp.json"] == ROOT / "examples" / "runs" / "ds_config_tp"


@pytest.mark.slow
def test_zero3_variant_trains_saves_and_samples(tmp_path):
    """examples/ds_config_zero3.json: parameters partitioned over the 2 ranks (gathered by
    the graphs for training, validation and sampling), the checkpoint saved. (Resuming a
    stage-3 checkpoint: test_zero3.py; resuming the main job: the test above.)"""
    out = _launch(tmp_path, "--steps", "30", config="ds_config_zero3.json")
    losses = _losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, out
    assert "--- sample ---" in out and "Shall I " in out
    assert (tmp_path / "run" / "checkpoint" / "latest").read_text() == "global_step30"

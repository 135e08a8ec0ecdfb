"""DeepSpeed's csv_monitor / tensorboard blocks through the engine: DeepSpeed's file layout
(one CSV per event, header step,<name>), the values the loop saw, samples on the x axis."""
import csv

import pytest
import torch

import zerofx
from models import make, mlp_batch
from zerofx.config import ConfigError


def _engine(tmp_path, **extra):
    model, _ = make("mlp")
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2,
                                                         "warmup_num_steps": 4}},
           "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "run"},
           **extra}
    return zerofx.initialize(model=model, config=cfg)[0]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("fp16", [False, True])
def test_csv_monitor_writes_deepspeeds_events(tmp_path, no_torchrun_env, fp16):
    engine = _engine(tmp_path, **({"fp16": {"enabled": True, "initial_scale_power": 8}}
                                  if fp16 else {}))
    losses, lrs = [], []
    for step in range(3):
        lrs.append(engine.get_lr()[0])
        micro = []
        for m in range(2):
            loss = engine(*mlp_batch(seed=10 * step + m))
            engine.backward(loss)
            engine.step()
            micro.append(loss.item())
        losses.append(sum(micro) / 2)
    run = tmp_path / "run"
    lr = _rows(run / "Train_Samples_lr.csv")
    assert lr[0] == ["step", "lr"]
    assert [int(r[0]) for r in lr[1:]] == [16, 32, 48]  # samples: 8 x 2 accumulation
    assert [float(r[1]) for r in lr[1:]] == pytest.approx(lrs)
    loss = _rows(run / "Train_Samples_train_loss.csv")
    assert loss[0] == ["step", "train_loss"]
    assert [float(r[1]) for r in loss[1:]] == pytest.approx(losses, rel=1e-6)
    scale = run / "Train_Samples_loss_scale.csv"
    assert scale.exists() == fp16
    if fp16:
        assert [float(r[1]) for r in _rows(scale)[1:]] == [256.0] * 3


def test_script_events_and_a_resumed_run_append(tmp_path, no_torchrun_env):
    engine = _engine(tmp_path)
    engine.monitor.write_events([("Eval/Samples/val_loss", 1.5, 16)])
    _engine(tmp_path).monitor.write_events([("Eval/Samples/val_loss", 1.25, 32)])
    assert _rows(tmp_path / "run" / "Eval_Samples_val_loss.csv") == [
        ["step", "val_loss"], ["16", "1.5"], ["32", "1.25"]]


def test_monitor_blocks_are_checked(tmp_path, no_torchrun_env):
    with pytest.raises(ConfigError, match="job_name"):
        zerofx.Config.from_dict({"csv_monitor": {"enabled": True, "job_name": "a/b"}})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="csv_monitor.output_path: cannot create"):
        _engine(tmp_path, csv_monitor={"enabled": True, "output_path": str(blocker)})
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            _engine(tmp_path, tensorboard={"enabled": True, "output_path": str(tmp_path)})


def test_wandb_is_applied_or_a_clear_error(tmp_path, no_torchrun_env):
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install wandb"):
            _engine(tmp_path, wandb={"enabled": True, "project": "p"})
    else:
        pytest.skip("wandb is installed: a real run would log to the network")

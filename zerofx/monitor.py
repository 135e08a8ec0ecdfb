"""Training curves on disk, from DeepSpeed's monitor config blocks (rank 0 writes).

    {"csv_monitor": {"enabled": true, "output_path": "runs", "job_name": "gpt"}}
    -> runs/gpt/Train_Samples_lr.csv, Train_Samples_train_loss.csv, ...   (step,<name> rows)
    {"tensorboard": {...same keys...}} -> TensorBoard event files in runs/gpt
    {"wandb": {"enabled": true, "project": "p", "group": ..., "team": ...}} -> a wandb run

Events are DeepSpeed's ``(name, value, samples)`` tuples: the engine writes
``Train/Samples/lr``, ``Train/Samples/train_loss`` and, under fp16,
``Train/Samples/loss_scale`` at every optimizer step; a script adds its own (a validation
loss) with ``engine.monitor.write_events([...])``. The CSV layout is DeepSpeed's
csv_monitor's, so tools written for it read these files.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from zerofx.config import Config, ConfigError


class Monitor:
    """The enabled monitors of a config; ``write_events`` is a no-op off rank 0."""

    def __init__(self, config: Config, *, rank: int):
        self.enabled = (config.csv_monitor.enabled or config.tensorboard.enabled
                        or config.wandb.enabled)
        mine = rank == 0
        self._csv = _CsvWriter(config.csv_monitor) if mine and config.csv_monitor.enabled \
            else None
        self._tb = _tensorboard(config.tensorboard) if mine and config.tensorboard.enabled \
            else None
        self._wandb = _wandb(config.wandb) if mine and config.wandb.enabled else None

    def write_events(self, events) -> None:
        """``events``: (name, value, step) tuples, as DeepSpeed's monitors take them."""
        if self._csv is None and self._tb is None and self._wandb is None:
            return
        events = list(events)
        if self._csv is not None:
            self._csv.write(events)
        if self._tb is not None:
            for name, value, step in events:
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            for name, value, step in events:
                self._wandb.log({name: value, "samples": step})


def _folder(block, which: str) -> Path:
    path = Path(block.output_path or ".") / block.job_name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{which}.output_path: cannot create {path} ({e.strerror}); pick a "
                          f"writable directory") from None
    return path


class _CsvWriter:
    def __init__(self, block):
        self.dir = _folder(block, "csv_monitor")
        self._started: set[str] = set()

    def write(self, events) -> None:
        for name, value, step in events:
            file = self.dir / (name.replace("/", "_").replace(" ", "_") + ".csv")
            new = name not in self._started and not file.exists()
            with open(file, "a", newline="") as f:
                w = csv.writer(f)
                if new:  # DeepSpeed's header: the step and the event's last name part
                    w.writerow(["step", name.split("/")[-1]])
                w.writerow([step, value])
            self._started.add(name)


def _tensorboard(block):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard.enabled needs the tensorboard package: pip install "
                          "tensorboard, or use csv_monitor") from None
    return SummaryWriter(log_dir=os.fspath(_folder(block, "tensorboard")))


def _wandb(block):
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb.enabled needs the wandb package: pip install wandb, or use "
                          "csv_monitor") from None
    return wandb.init(project=block.project, group=block.group, entity=block.team)

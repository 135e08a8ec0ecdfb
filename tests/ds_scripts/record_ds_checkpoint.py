"""Record real DeepSpeed ZeRO checkpoints, and the losses DeepSpeed trains on from them.

Run with the Python of the virtual environment that has the real DeepSpeed (see
record_fixtures.py for how it was built), from the repository root:

    DS_ACCELERATOR=cpu /work/dsenv/bin/python tests/ds_scripts/record_ds_checkpoint.py [VARIANT...]

For each variant (default all of VARIANTS: ZeRO stages 0-3 in fp32, and stage 2 in fp16
with dynamic loss scaling) it runs this file on 2 CPU ranks (gloo) under torchrun: a tiny
model (TinyNet, 2,118 parameters, odd sizes so DeepSpeed pads) trains K steps with AdamW,
WarmupLR and gradient clipping, engine.save_checkpoint writes tag global_step{K}
(client_state {"epoch": 1, "note": ...}), and N more steps record every rank's loss. The
checkpoint directory (without the zero_to_fp32.py / zero_to_torch.py copies DeepSpeed drops
beside it, 35 KB each) goes to tests/data/deepspeed_checkpoints/stage{VARIANT}/, with
record.json (losses, the live engine's loss-scaler state at the save, config, versions,
command, date) and, for ZeRO stages 1-3, zero_to_fp32.pt: what DeepSpeed's own
get_fp32_state_dict_from_zero_checkpoint makes of the checkpoint.
tests/test_deepspeed_checkpoint_import.py converts each checkpoint to zerofx's format,
trains the same N steps on the same batches and compares.

The model, the batches and the config are defined here once and imported by the test, so
both sides train the same thing; nothing here imports deepspeed at module level.
"""
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT = REPO / "tests" / "data" / "deepspeed_checkpoints"
WORLD_SIZE = 2
K, N = 3, 4  # steps before the checkpoint, steps recorded after it
MICRO_BATCH = 4
# ZeRO stage, and "fp16" (dynamic loss scaling) or "bf16" (at stage 1: DeepSpeed's
# BF16_Optimizer and its own file layout); only the conversion is compared for these, as
# half-precision rounding on CPU is each program's own)
VARIANTS = ("0", "1", "2", "3", "2fp16", "1bf16")
IN, CLASSES = 12, 5


class TinyNet(nn.Module):
    """Linear-LayerNorm-Linear-head with a persistent buffer; the loss is computed inside."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, 40)
        self.norm = nn.LayerNorm(40)
        self.fc2 = nn.Linear(40, 33)
        self.head = nn.Linear(33, CLASSES, bias=False)
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, x, y):
        h = F.gelu(self.norm(self.fc1(x)))
        logits = self.head(torch.tanh(self.fc2(h))) / self.temperature
        return F.cross_entropy(logits, y)


def make_model() -> TinyNet:
    torch.manual_seed(0)  # every rank, and the test, builds the same initial model
    return TinyNet()


def batch(step: int, rank: int):
    """Rank ``rank``'s micro-batch at optimizer step ``step`` (the same in every program)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(MICRO_BATCH, IN, generator=g), torch.randint(0, CLASSES, (MICRO_BATCH,),
                                                                    generator=g)


def ds_config(stage: int, gas: int = 1, world_size: int = WORLD_SIZE,
              fp16: bool = False, bf16: bool = False) -> dict:
    """The DeepSpeed config of the recorded runs (zerofx reads the same dict). ``fp16``:
    dynamic loss scaling from 2**16, which overflows in the first steps (skipped steps and
    a spent hysteresis by the save), with a window of 2 so the scale also grows."""
    zero = {"stage": stage}
    if stage == 3:
        zero["sub_group_size"] = 1000  # several optimizer sub-groups: their joins are tested
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "train_batch_size": MICRO_BATCH * gas * world_size,
        "steps_per_print": 1000,
        "optimizer": {"type": "AdamW",
                      "params": {"lr": 0.02, "betas": [0.9, 0.99], "eps": 1e-8,
                                 "weight_decay": 0.05}},
        # still warming up after the checkpoint: the scheduler's state must come across
        "scheduler": {"type": "WarmupLR",
                      "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02,
                                 "warmup_num_steps": 6, "warmup_type": "linear"}},
        "gradient_clipping": 0.5,
        "zero_optimization": zero,
        **({"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                     "loss_scale_window": 2, "hysteresis": 2, "min_loss_scale": 1}}
           if fp16 else {}),
        # fp32 gradient accumulation: what makes stage 1 use the BF16_Optimizer
        **({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
           if bf16 else {}),
    }


# ---- one rank, under torchrun -------------------------------------------------------------
def live_state(engine, stage: int) -> dict:
    """The fp32 master and Adam moments of every parameter, whole, as DeepSpeed's live
    engine holds them (its safe_get_full_* API; a collective at every stage)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        if stage == 0:  # no ZeRO, fp32: the module's weights are the master
            state = engine.optimizer.state[p]
            values = (p, state["exp_avg"], state["exp_avg_sq"])
        else:
            values = (safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                      safe_get_full_optimizer_state(p, "exp_avg_sq"))
        for key, value in zip(out, values):
            out[key][name] = value.detach().float().cpu().clone()
    return out


def train_rank(variant: str, ckpt_root: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    stage, fp16, bf16 = int(variant[0]), variant.endswith("fp16"), variant.endswith("bf16")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, fp16=fp16, bf16=bf16))
    dtype = torch.half if fp16 else torch.bfloat16 if bf16 else torch.float32

    def train(step):
        x, y = batch(step, rank)
        loss = engine(x.to(dtype), y)
        engine.backward(loss)
        engine.step()
        return loss.float().item()

    for step in range(K):
        train(step)
    engine.save_checkpoint(ckpt_root, client_state={"epoch": 1, "note": "saved by DeepSpeed"})
    live = live_state(engine, stage)
    if rank == 0:
        torch.save(live, Path(out).with_name("live_state.pt"))
    # what the save held, read from the live engine (stage 0 in fp32 has no scaler)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    scaler = {k: getattr(scaler, k) for k in ("cur_scale", "cur_iter", "last_overflow_iter",
                                               "cur_hysteresis") if hasattr(scaler, k)}
    losses = []
    for step in range(K, K + N):
        every = [None] * WORLD_SIZE
        dist.all_gather_object(every, train(step))
        losses.append(every)
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": losses, "lr_after": engine.get_lr(),
                                         "loss_scaler_at_save": scaler}))


# ---- the driver, in the DeepSpeed venv -----------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(variant: str) -> None:
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage = int(variant[0])
    dest = OUT / f"stage{variant}"
    with tempfile.TemporaryDirectory(prefix=f"ds-ckpt-{variant}-") as tmp:
        ckpt, out = Path(tmp) / "ckpt", Path(tmp) / "losses.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(WORLD_SIZE), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), __file__, "--rank-main", variant,
               str(ckpt), str(out)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        for script in ckpt.rglob("zero_to_*.py"):  # 35 KB each, and not ours to commit
            script.unlink()
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ckpt, dest)
        shutil.copy(out.with_name("live_state.pt"), dest / "live_state.pt")
        result = json.loads(out.read_text())
    if stage > 0 and not variant.endswith("bf16"):  # zero_to_fp32 refuses BF16_Optimizer files
        state = get_fp32_state_dict_from_zero_checkpoint(str(dest))
        torch.save({k: v.clone() for k, v in state.items()}, dest / "zero_to_fp32.pt")
    record_json = {
        "stage": stage, "fp16": variant.endswith("fp16"), "bf16": variant.endswith("bf16"),
        "world_size": WORLD_SIZE,
        "steps_before_save": K, "loss_scaler_at_save": result["loss_scaler_at_save"],
        "tag": f"global_step{K}", "losses_after_load": result["losses"],
        "lr_after": result["lr_after"],
        "config": ds_config(stage, fp16=variant.endswith("fp16"),
                            bf16=variant.endswith("bf16")),
        "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ("DS_ACCELERATOR=cpu /work/dsenv/bin/python "
                    f"tests/ds_scripts/record_ds_checkpoint.py {variant}"),
    }
    (dest / "record.json").write_text(json.dumps(record_json, indent=1) + "\n")
    print(f"wrote {dest.relative_to(REPO)}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-main"]:
        train_rank(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        for v in sys.argv[1:] or VARIANTS:
            record(v)

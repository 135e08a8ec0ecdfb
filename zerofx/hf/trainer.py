"""ZerofxTrainer: ``transformers.Trainer`` whose loop drives a zerofx engine.

    trainer = ZerofxTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                            zerofx_config="ds_config.json")   # "auto" values allowed
    trainer.train()

It follows Hugging Face's DeepSpeed integration step for step, with zerofx's engine where
that one puts DeepSpeed's:
- the config's ``"auto"`` values are filled from ``TrainingArguments`` by HF's rules
  (auto_config.py), when the Trainer knows the number of steps;
- an ``optimizer`` block in the config makes zerofx's fused optimizer (one set of
  hyperparameters for every weight, as DeepSpeed's); without one, the Trainer's own AdamW
  (weight decay off for biases and norms) runs on zerofx's shard;
- a ``scheduler`` block makes the config's schedule drive the lr; without one, the Trainer's
  schedule is handed to the engine, which steps it after each applied update (not after an
  fp16 overflow skip, DeepSpeed's rule), as HF hands it to DeepSpeed;
- the Trainer's backward is the engine's ``backward`` then ``step`` (Accelerate's DeepSpeed
  wrapper does the same), so clipping, the update and the ZeRO collectives are zerofx's, and
  the Trainer's own ``optimizer.step()`` and ``clip_grad_norm_`` are no-ops that report;
- the model never reaches Accelerate's ``prepare``, so no DDP wraps the engine.

The Trainer's hooks overridden here are the ones transformers' DeepSpeed path branches on;
some are private (``_wrap_model``, ``_clip_grad_norm``, ``_get_grad_norm``,
``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``): tested with
transformers 5.x and Accelerate 1.x.
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

from zerofx.config import ConfigError
from zerofx.hf.auto_config import fill_auto, load_raw

try:
    import transformers
    from transformers.trainer import SCHEDULER_NAME
except ImportError as e:  # pragma: no cover - the error users see without the extra
    raise ImportError("zerofx.hf needs transformers and accelerate: "
                      "pip install 'zerofx[hf]'") from e

# The Trainer's private hooks overridden below: a transformers whose Trainer lacks one would
# silently bypass it (DDP around the engine, a second optimizer step), so refuse at import.
HOOKS = ("_wrap_model", "_clip_grad_norm", "_get_grad_norm", "_save_optimizer_and_scheduler",
         "_load_optimizer_and_scheduler", "create_optimizer", "create_scheduler")
_missing = [h for h in HOOKS if not hasattr(transformers.Trainer, h)]
if _missing:
    raise ImportError(f"zerofx.hf: transformers {transformers.__version__}'s Trainer has no "
                      f"{', '.join(_missing)}, which ZerofxTrainer overrides; it is tested "
                      f"with transformers 5.24: pip install 'zerofx[hf]'")

ADAMW = ("adamw_torch", "adamw_torch_fused")  # what zerofx runs as the Trainer's AdamW
GROUPS_KEY = "hf_param_groups"  # the optimizer groups' hyperparameters in the checkpoint


def check_args(args, raw: dict) -> None:
    """One ConfigError for a TrainingArguments setting zerofx cannot honour."""
    def refuse(setting, why):
        raise ConfigError(f"TrainingArguments {setting}: {why}", key=setting.split("=")[0])

    if args.deepspeed:
        refuse("deepspeed=", "ZerofxTrainer takes the DeepSpeed config as zerofx_config=; "
               "drop deepspeed= (it would start DeepSpeed itself)")
    if args.fsdp or getattr(args, "fsdp_config", None) and args.fsdp_config.get("fsdp_version"):
        refuse("fsdp=", "FSDP and zerofx both shard the model; zerofx's ZeRO stage 3 is the "
               "equivalent: drop fsdp= and set zero_optimization.stage 3")
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in ADAMW:
        refuse(f"optim={optim}", f"zerofx runs AdamW only through the Trainer "
               f"({' or '.join(ADAMW)}); put another optimizer (Adam, AdamW, Lamb) in the "
               f"config's optimizer block with optim left at its default")
    if args.auto_find_batch_size:
        refuse("auto_find_batch_size=True", "the batch size is fixed when the engine is "
               "built; give per_device_train_batch_size")
    if args.torch_compile:
        refuse("torch_compile=True", "zerofx compiles the model itself (its own backend); "
               "drop torch_compile")
    if args.n_gpu > 1:
        refuse(f"n_gpu={args.n_gpu}", "one process per device: launch with torchrun or "
               "zerofx-launch, not nn.DataParallel")
    tp = raw.get("tensor_parallel")
    if isinstance(tp, dict) and any(tp.get(k) not in (None, 0, 1) for k in ("size", "autotp_size")):
        raise ConfigError("tensor_parallel through ZerofxTrainer: the Trainer's data loader "
                          "gives every rank its own batch, tensor-parallel ranks need the "
                          "same one; use zerofx.initialize in your own loop",
                          key="tensor_parallel")


class _EngineModule(nn.Module):
    """What the Trainer's loop calls as its model: the engine, without ``no_sync`` (the
    Trainer would enter it for every micro-batch but the last; zerofx's engine accumulates
    by its own count, and refuses ``no_sync`` at stages 2-3)."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def _get_name(self):  # the Trainer's label smoother asks whether this is a causal LM
        return self.engine.module._get_name()


class _SteppedByEngine(torch.optim.Optimizer):
    """The Trainer's optimizer: zerofx's, whose ``step`` already ran in the backward.
    It shares the groups of zerofx's optimizer, so the Trainer's scheduler moves the lr
    the engine's next update reads (Accelerate's DeepSpeedOptimizerWrapper, for zerofx)."""

    def __init__(self, zero_optimizer):
        super().__init__([p for g in zero_optimizer.param_groups for p in g["params"]],
                         zero_optimizer.defaults)
        self.zero_optimizer = zero_optimizer
        self.param_groups = zero_optimizer.param_groups

    def step(self, closure=None):
        """Nothing: the engine updated in ``backward`` (at the accumulation boundary)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: gradients live in zerofx's buckets, emptied by every update."""

    # The state is zerofx's (this rank's shard): saved by the engine's checkpoint, not here.
    # Accelerate reads and writes it back when it prepares the optimizer.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            raise ConfigError("ZerofxTrainer's optimizer state is zerofx's checkpoint "
                              "(engine.save_checkpoint in the Trainer's checkpoint folder)")


class _EngineSchedule(torch.optim.lr_scheduler.LRScheduler):
    """The Trainer's scheduler when the engine steps the schedule (the config's ``scheduler``
    block, or the Trainer's own schedule handed to the engine): the engine steps it after
    each applied update and not after an fp16 overflow skip (DeepSpeed's rule), so the
    Trainer's ``step`` does nothing (Accelerate's DeepSpeedSchedulerWrapper);
    ``get_last_lr`` is the lr the engine's next update uses. Its state is in the engine's
    checkpoint."""

    def __init__(self, engine):  # no super().__init__: it would step the optimizer's lr
        self.engine, self.optimizer = engine, engine.optimizer

    def step(self, epoch=None):
        pass

    def get_last_lr(self):
        return [g["lr"] for g in self.engine.optimizer.param_groups]

    def state_dict(self):
        return {}

    def load_state_dict(self, state_dict):
        pass


class ZerofxTrainer(transformers.Trainer):
    """``transformers.Trainer`` training through zerofx's engine (module doc).

    ``zerofx_config``: a DeepSpeed config (dict or JSON path) with ``"auto"`` where the
    Trainer's arguments decide, as for HF's DeepSpeed integration. After ``train()`` starts,
    ``trainer.engine`` is the zerofx engine."""

    def __init__(self, *args, zerofx_config, **kwargs):
        self.zerofx_raw = load_raw(zerofx_config)
        self.engine = None
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        if given is not None:  # before the Trainer acts on them (deepspeed= starts DeepSpeed)
            check_args(given, self.zerofx_raw)
        super().__init__(*args, **kwargs)
        check_args(self.args, self.zerofx_raw)
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            raise ConfigError("ZerofxTrainer builds its optimizer from the config's optimizer "
                              "block (or the Trainer's AdamW): drop optimizers= / "
                              "optimizer_cls_and_kwargs=", key="optimizers")
        # the Trainer's backward is the engine's (see _backward)
        self.accelerator.backward = self._backward

    # ---- building the engine --------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Build the zerofx engine (the Trainer calls this once the number of steps is
        known) and hand the Trainer an optimizer that the engine steps."""
        if self.engine is not None:
            return self.optimizer
        import zerofx

        config = fill_auto(self.zerofx_raw, self.args, model=self.model,
                           num_training_steps=self.state.max_steps)
        torch_opt = None
        if "optimizer" not in config:  # HF's rule: the Trainer's optimizer, allowed by ZeRO
            torch_opt = super().create_optimizer(model)
            self.optimizer = None
            config["zero_allow_untested_optimizer"] = True
        self.zerofx_config = config
        engine, zero_opt, _, _ = zerofx.initialize(model=self.model, optimizer=torch_opt,
                                                   config=config,
                                                   lr_scheduler=self._schedule_factory(config))
        self.engine = engine
        self.optimizer = _SteppedByEngine(zero_opt)
        return self.optimizer

    def _schedule_factory(self, config):
        """The Trainer's schedule for the engine to step (HF's DeepSpeed integration hands
        DeepSpeed a factory the same way), unless the config has its own or the Trainer's
        is ReduceLROnPlateau (stepped by evaluation metrics, which the Trainer keeps)."""
        if "scheduler" in config or self._plateau():
            return None

        def make(optimizer):
            trainer = copy.copy(self)  # create_scheduler sets lr_scheduler: on a copy
            trainer.lr_scheduler = None
            return transformers.Trainer.create_scheduler(
                trainer, self.state.max_steps, optimizer=optimizer)
        return make

    def _plateau(self) -> bool:
        return str(getattr(self.args.lr_scheduler_type, "value",
                           self.args.lr_scheduler_type)) == "reduce_lr_on_plateau"

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None and self.engine.lr_scheduler is not None:
            self.lr_scheduler = _EngineSchedule(self.engine)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _wrap_model(self, model, training=True, dataloader=None):
        """The engine, for training and for evaluation once it exists: evaluation then runs
        zerofx's compiled model (its precision, its ZeRO-3 gathers), and Accelerate never
        prepares the model (its bf16 autocast would patch the forward zerofx compiled)."""
        if self.engine is not None:
            return _EngineModule(self.engine)
        return super()._wrap_model(model, training, dataloader)

    # ---- one micro-step -------------------------------------------------------------------
    def _backward(self, loss, **kwargs):
        """The engine's backward and step for the loss the Trainer built. That loss is
        already normalized over the accumulation window (divided by its length, or by the
        tokens counted in it), where zerofx divides every gradient by
        gradient_accumulation_steps in the step: the factor undoes that. The Trainer's
        boundary (a short last window of an epoch included) is the engine's."""
        eng = self.engine
        eng.set_gradient_accumulation_boundary(bool(self.accelerator.sync_gradients))
        eng.backward(loss * eng.gradient_accumulation_steps())
        eng.step()

    def _clip_grad_norm(self, model):
        """The engine clipped in its step (gradient_clipping = max_grad_norm): the norm
        before clipping, as HF's DeepSpeed path reports it."""
        return self.engine.get_global_grad_norm()

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()

    # ---- saving ---------------------------------------------------------------------------
    def save_model(self, output_dir=None, _internal_call=False):
        """The Trainer's save, with ZeRO-3's partitioned weights gathered whole (every rank
        enters, as every rank calls save_model)."""
        ctx = contextlib.nullcontext()
        if self.engine is not None and self.engine.zero_optimization_partition_weights():
            ctx = self.engine.runtime.gathered_parameters()
        with ctx:
            super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir):
        """zerofx's checkpoint (each rank its shard of the optimizer state) and the
        Trainer's scheduler."""
        # the groups' lr (and the rest) as the Trainer's optimizer file keeps them: a torch
        # scheduler's load_state_dict does not write the lr back into the groups
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in self.optimizer.param_groups]
        self.engine.save_checkpoint(output_dir, client_state={GROUPS_KEY: groups})
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        path, client = self.engine.load_checkpoint(checkpoint)
        if path is None:
            raise ConfigError(f"resume_from_checkpoint={checkpoint!r}: no zerofx checkpoint "
                              f"there (ZerofxTrainer saves one in each checkpoint folder)",
                              key="resume_from_checkpoint")
        for group, saved in zip(self.optimizer.param_groups, client.get(GROUPS_KEY, [])):
            group.update(saved)
        sched = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(sched):
            self.lr_scheduler.load_state_dict(torch.load(sched, weights_only=True))

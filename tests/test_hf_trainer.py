"""zerofx.hf: the Hugging Face Trainer driving zerofx's engine.

References: the plain ``transformers.Trainer`` (no zerofx) on the same tiny random-init
GPT-2 and data, on 1 process and as its own DDP run on 2 ranks; for "auto" filling, HF's own
``HfTrainerDeepSpeedConfig`` rules run on the same config.
"""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch

pytest.importorskip("accelerate", reason="the Trainer needs it: pip install 'zerofx[test]'")
import transformers as T  # noqa: E402

if int(T.__version__.split(".")[0]) < 5:  # the test extra allows the zoo's older ones
    pytest.skip("ZerofxTrainer overrides hooks of transformers 5's Trainer",
                allow_module_level=True)

from hf_models import VOCAB, make_hf  # noqa: E402
from multiproc import run_ranks  # noqa: E402
from zerofx.config import ConfigError  # noqa: E402
from zerofx.hf import ZerofxTrainer, fill_auto  # noqa: E402

AUTO_BATCH = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}}
OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                         "weight_decay": "auto"}}
SCHEDULER = {"type": "WarmupDecayLR", "params": {
    "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
    "total_num_steps": "auto", "warmup_type": "linear"}}


class LossLog(T.TrainerCallback):
    """(loss, grad_norm, lr) of every logged optimizer step."""

    def __init__(self):
        self.rows = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.rows.append((logs["loss"], logs["grad_norm"], logs["learning_rate"]))


def dataset(n=24, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x.clone()}
            for x in torch.randint(0, VOCAB, (n, seq), generator=g)]


def training_args(out, **kw):
    """AdamW, linear warmup then decay, accumulation 2, clipping: 6 optimizer steps of
    2 micro-batches of 2 (on 1 rank one epoch of 24 samples; on 2 ranks two epochs)."""
    return T.TrainingArguments(**{
        "output_dir": out, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_steps": 6, "learning_rate": 1e-3, "warmup_steps": 2, "lr_scheduler_type": "linear",
        "max_grad_norm": 0.5, "weight_decay": 0.0, "logging_steps": 1, "report_to": [],
        "save_strategy": "no", "seed": 0, "data_seed": 0, "use_cpu": True,
        "disable_tqdm": True, **kw})


def train(zerofx_config=None, optimizers=None, facts=None, n=24, resume=None, **kw):
    """The logged rows of a run: the plain Trainer (``optimizers(model)``: its optimizer
    and scheduler, or its own), or ZerofxTrainer with this config, on ``n`` samples.
    ``facts``, a dict, gets how the run was distributed and its eval loss after training."""
    log = LossLog()
    model = make_hf("gpt2")
    extra = {"zerofx_config": zerofx_config} if zerofx_config is not None else \
        {"optimizers": optimizers(model)} if optimizers else {}
    cls = T.Trainer if zerofx_config is None else ZerofxTrainer
    with tempfile.TemporaryDirectory() as out:
        trainer = cls(model=model, args=training_args(kw.pop("output_dir", out), **kw),
                      train_dataset=dataset(n), eval_dataset=dataset(4, seed=2),
                      callbacks=[log], **extra)
        trainer.train(resume_from_checkpoint=resume)
        if facts is not None:
            facts.update(processes=trainer.accelerator.num_processes,
                         ddp=type(trainer.model_wrapped).__name__ == "DistributedDataParallel",
                         zero_dp=getattr(trainer, "engine", None) and
                         trainer.engine.dp_world_size,
                         eval_loss=trainer.evaluate()["eval_loss"])
        if facts is not None and zerofx_config is None:  # whole weights after training
            facts["model_loss"] = model_loss(trainer.model)
    return log.rows


def model_loss(model):
    """The model's own mean loss on the eval samples (the Trainer's eval_loss divides the
    shifted tokens' sum by every label, shifted or not)."""
    batch = torch.stack([r["input_ids"] for r in dataset(4, seed=2)])
    with torch.no_grad():
        return model.eval()(input_ids=batch, labels=batch).loss.item()


def assert_rows_close(got, want, columns=slice(None)):
    assert len(got) == len(want) == 6
    g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(g[:, columns], w[:, columns], rtol=1e-5, atol=1e-7)
    assert w[-1, 0] != w[1, 0]  # the weights moved: the comparison can fail


def assert_logs_as_deepspeed(got, want):
    """Losses and gradient norms equal the plain Trainer's; the logged lr is the one after
    the step, as HF's DeepSpeed path logs it (the engine steps the schedule inside the
    backward, before the Trainer reads ``get_last_lr``): the plain Trainer's next row, and
    the schedule's end (0) after the last."""
    assert_rows_close(got, want, columns=slice(0, 2))
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want[1:]] + [0.0])
    assert len({r[2] for r in want}) > 2  # the schedule moves: the shift can fail


def deepspeed_warmup_decay(model):
    """AdamW and DeepSpeed's WarmupDecayLR (linear warmup 2, total 6) as a torch schedule:
    DeepSpeed's scheduler starts at warmup_min_lr and its first step() computes iteration 0,
    so update k runs at gamma(k - 1) (update 0 at the minimum, 0 here)."""
    def gamma(i):
        return i / 2 if i < 2 else max(0.0, (6 - i) / (6 - 2))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: gamma(k - 1) if k else 0.0)


# ---- 1 process: the plain Trainer's numbers -----------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", ["trainer_adamw", "config_adamw", "short_window"])
def test_one_process_matches_plain_trainer(case):
    """Losses, pre-clip gradient norms and the eval loss after training equal the plain
    Trainer's over 6 steps: the Trainer's own AdamW (decay off for biases and norms,
    weight_decay 0.1) on zerofx's shard; the config's fused AdamW ("auto" hyperparameters)
    under the Trainer's schedule; an epoch of 11 micro-batches, whose last window holds one
    (the Trainer's boundary is the engine's, the loss normalized over that window)."""
    kw = {"weight_decay": 0.1} if case == "trainer_adamw" else {}
    if case == "short_window":
        kw["n"] = 22
    cfg = {**AUTO_BATCH, "zero_optimization": {"stage": 2}}
    if case == "config_adamw":
        cfg["optimizer"] = OPTIMIZER
    got_facts, want_facts = {}, {}
    assert_logs_as_deepspeed(train(cfg, facts=got_facts, **kw),
                             train(None, facts=want_facts, **kw))
    assert got_facts["eval_loss"] == pytest.approx(want_facts["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_from_checkpoint(tmp_path):
    """A run saved at step 3 (the engine's checkpoint, each rank's optimizer shard, and the
    Trainer's scheduler) and resumed continues with the uninterrupted run's numbers."""
    cfg = {**AUTO_BATCH, "zero_optimization": {"stage": 2}}
    whole = train(cfg, output_dir=str(tmp_path), save_strategy="steps", save_steps=3)
    assert (tmp_path / "checkpoint-3").is_dir()
    log = LossLog()
    resumed = ZerofxTrainer(model=make_hf("gpt2"), train_dataset=dataset(),
                            args=training_args(str(tmp_path / "again")), callbacks=[log],
                            zerofx_config=cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert len(log.rows) == 3
    torch.testing.assert_close(torch.tensor(log.rows), torch.tensor(whole[3:]), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.slow
def test_config_scheduler_is_deepspeeds():
    """A scheduler block in the config is DeepSpeed's schedule, as with HF's DeepSpeed
    integration (the Trainer's own is not made): losses and norms equal the plain Trainer
    under DeepSpeed's WarmupDecayLR written as a torch schedule; the logged lr is the
    schedule's after the step (DeepSpeed's get_last_lr, what HF logs there)."""
    cfg = {**AUTO_BATCH, "zero_optimization": {"stage": 2}, "optimizer": OPTIMIZER,
           "scheduler": SCHEDULER}
    got = train(cfg)
    assert_rows_close(got, train(None, optimizers=deepspeed_warmup_decay), columns=slice(0, 2))
    assert [r[2] for r in got] == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])


@pytest.mark.slow
def test_bf16_from_args():
    """bf16=True fills bf16.enabled "auto": zerofx computes in bf16 (its numbers leave the
    fp32 run's) and stays near the plain Trainer's bf16 autocast run (not bit-equal: the
    casts are placed differently)."""
    cfg = {**AUTO_BATCH, "zero_optimization": {"stage": 2}}
    fp32 = torch.tensor(train(cfg))[:, 0]
    bf16 = torch.tensor(train(cfg, bf16=True))[:, 0]
    autocast = torch.tensor(train(None, bf16=True))[:, 0]
    assert (bf16 - fp32).abs().max() > 1e-5
    torch.testing.assert_close(bf16, autocast, rtol=1e-3, atol=0)


def hf_linear(k):
    """transformers' linear schedule with warmup 2 over 6 steps (training_args'), as a
    factor of the base lr after k updates."""
    return k / 2 if k < 2 else max(0.0, (6 - k) / 4)


@pytest.mark.slow
def test_fp16_overflow_skips_do_not_step_the_trainers_schedule():
    """fp16=True: zerofx's fp16 with dynamic loss scaling. A loss scale of 2**18 overflows
    the first updates; each skipped update leaves the Trainer's schedule where it was
    (DeepSpeed's engine steps the scheduler only after an applied step, and HF hands it the
    Trainer's schedule): the logged lr after each step is HF's linear schedule at the count
    of applied updates so far, not at the Trainer's step count."""
    cfg = {**AUTO_BATCH, "fp16": {"enabled": "auto", "initial_scale_power": 18,
                                  "hysteresis": 1},
           "zero_optimization": {"stage": 2}}
    rows = train(cfg, fp16=True)
    skipped = [r[1] == float("inf") for r in rows]
    assert 0 < sum(skipped) < 6, rows  # some skipped, some applied
    applied = [sum(1 for s in skipped[:i + 1] if not s) for i in range(6)]
    assert [r[2] for r in rows] == pytest.approx([1e-3 * hf_linear(k) for k in applied])
    assert all(r[0] == r[0] for r in rows)  # the losses stay numbers


@pytest.mark.slow
def test_fp16_from_args_trains_near_fp32():
    """fp16=True at the default loss scale: no skip on this model, and the losses are fp16's
    (not fp32's exactly) within fp16's rounding of the fp32 run's."""
    cfg = {**AUTO_BATCH, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    fp32 = torch.tensor(train(cfg))
    fp16 = torch.tensor(train(cfg, fp16=True))
    assert torch.isfinite(fp16[:, 1]).all()  # no overflow skip
    assert (fp16[:, 0] - fp32[:, 0]).abs().max() > 1e-6
    torch.testing.assert_close(fp16[:, 0], fp32[:, 0], rtol=5e-3, atol=0)
    torch.testing.assert_close(fp16[:, 2], fp32[:, 2])  # the same schedule


# ---- 2 ranks: the plain Trainer's DDP run ----------------------------------------------------
def _two_rank_body(rank, world_size, stages, out):
    """The plain Trainer's DDP run, then per ZeRO stage ZerofxTrainer's (saving at step 3) and
    ZerofxTrainer resumed from that checkpoint, on this rank: one DDP reference for both
    stages (it does not depend on the stage)."""
    ddp_facts = {}
    ddp = train(None, facts=ddp_facts)
    ddp_eval, ddp_model_loss = ddp_facts.pop("eval_loss"), ddp_facts.pop("model_loss")
    assert ddp_facts == {"processes": 2, "ddp": True, "zero_dp": None}, ddp_facts
    runs = {}
    for stage in stages:
        cfg = {**AUTO_BATCH, "zero_optimization": {"stage": stage}}
        if stage == 3:  # every weight partitioned (the default keeps this model's small ones
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # whole)
        zero_facts, run = {}, f"{out}/stage{stage}"
        zero = train(cfg, facts=zero_facts, output_dir=f"{run}/run", save_strategy="steps",
                     save_steps=3)
        assert zero_facts.pop("eval_loss") == pytest.approx(ddp_eval, rel=1e-5), stage
        # the model file of the last checkpoint is the trained model, whole (gathered at
        # stage 3)
        saved = T.GPT2LMHeadModel.from_pretrained(f"{run}/run/checkpoint-6")  # a local folder
        assert model_loss(saved) == pytest.approx(ddp_model_loss, rel=1e-5), stage
        assert zero_facts == {"processes": 2, "ddp": False, "zero_dp": 2}, zero_facts
        resumed = train(cfg, output_dir=f"{run}/again", resume=f"{run}/run/checkpoint-3")
        runs[stage] = (zero, resumed)
    return ddp, runs


@pytest.mark.slow
def test_two_ranks_match_trainer_ddp(tmp_path):
    """ZeRO stages 2 and 3 on 2 ranks through ZerofxTrainer log the numbers of the plain
    Trainer's own data-parallel run (Accelerate's DDP over gloo) on the same 2 ranks, and
    its eval loss after training; the last saved model file (gathered whole at stage 3) is
    DDP's trained model; resumed from the step-3 checkpoint (each rank's optimizer shard)
    each logs steps 4-6 again."""
    results = run_ranks(_two_rank_body, 2, args=((2, 3), str(tmp_path)), timeout_s=500)
    for ddp, runs in results:
        for stage, (zero, resumed) in runs.items():
            assert_logs_as_deepspeed(zero, ddp)
            torch.testing.assert_close(torch.tensor(resumed), torch.tensor(zero[3:]),
                                       rtol=1e-5, atol=1e-7, msg=f"stage {stage}")
    assert results[0][0] == results[1][0]  # DDP's ranks agree (the logged loss is global)


# ---- "auto": HF's own rules as the reference -------------------------------------------------
def hf_rules(config, args, model, steps):
    """transformers' HfTrainerDeepSpeedConfig rules run on ``config``. Without an installed
    DeepSpeed its class does not derive from Accelerate's config reader, so the rules (HF's
    functions, unchanged) are put on that reader here."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig as Hf

    rules = ("is_auto", "fill_match", "fill_only", "trainer_config_process",
             "trainer_config_finalize")
    Ref = type("Ref", (HfDeepSpeedConfig,), {k: Hf.__dict__[k] for k in rules})
    ref = Ref(config)
    ref._dtype, ref.mismatches = None, []
    ref.trainer_config_process(args)
    ref.trainer_config_finalize(args, model, steps)
    return ref.config


@pytest.mark.parametrize("stage", [2, 3])
def test_auto_resolves_as_hf(stage, tmp_path):
    """Every "auto" HF fills (batch sizes, clipping, optimizer, scheduler, bf16, the
    hidden-size bucket keys) resolves to the value HF's rules give, numbers HF checks
    stay, and nothing is left "auto"."""
    cfg = {**AUTO_BATCH, "optimizer": OPTIMIZER, "scheduler": SCHEDULER,
           "fp16": {"enabled": "auto"},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto"}}
    if stage == 3:  # HF fills these at stage 3 only
        cfg["zero_optimization"].update(stage3_prefetch_bucket_size="auto",
                                        stage3_param_persistence_threshold="auto")
    args = training_args(str(tmp_path), per_device_train_batch_size=3,
                         gradient_accumulation_steps=4, learning_rate=3e-4, adam_beta1=0.8,
                         adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.01,
                         max_grad_norm=0.7, warmup_steps=0.1, bf16=True)
    model = make_hf("gpt2")
    got = fill_auto(cfg, args, model=model, num_training_steps=50)
    want = hf_rules(copy.deepcopy(cfg), args, model, 50)
    assert got == want
    assert cfg["optimizer"]["params"]["lr"] == "auto"  # the caller's dict is not edited
    assert got["train_batch_size"] == 12 and got["scheduler"]["params"]["warmup_num_steps"] == 5
    assert got["zero_optimization"]["reduce_bucket_size"] == 32 * 32


def test_auto_refusals(tmp_path):
    """A number contradicting TrainingArguments is listed (HF raises too); an "auto" HF's
    rules do not fill is named."""
    args = training_args(str(tmp_path))
    model = make_hf("gpt2")
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=4 vs hf "
                                          r"gradient_accumulation_steps=2"):
        fill_auto({"gradient_accumulation_steps": 4}, args, model=model, num_training_steps=6)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4"):  # HF's verdict
        hf_rules({"gradient_accumulation_steps": 4}, args, model, 6)
    with pytest.raises(ConfigError, match=r"'zero_optimization.sub_group_size' is \"auto\""):
        fill_auto({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, args,
                  model=model, num_training_steps=6)


# ---- what zerofx cannot honour --------------------------------------------------------------
@pytest.mark.parametrize("setting, match", [
    ({"optim": "sgd"}, r"optim=sgd: zerofx runs AdamW only"),
    ({"torch_compile": True}, r"torch_compile=True"),
    ({"deepspeed": {"train_batch_size": 2}}, r"deepspeed=: ZerofxTrainer takes"),
    ({"fsdp": "full_shard"}, r"fsdp=: FSDP and zerofx"),
])
def test_refuses_arguments(setting, match, tmp_path):
    args = training_args(str(tmp_path))
    for k, v in setting.items():  # set after construction: TrainingArguments(deepspeed=)
        object.__setattr__(args, k, v)  # needs DeepSpeed installed, fsdp= a GPU
    if "optim" in setting:
        args.optim = T.training_args.OptimizerNames(setting["optim"])
    with pytest.raises(ConfigError, match=match):
        ZerofxTrainer(model=make_hf("gpt2"), args=args, train_dataset=dataset(),
                      zerofx_config=dict(AUTO_BATCH))


def test_refuses_own_optimizer_and_tensor_parallel(tmp_path):
    model = make_hf("gpt2")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="drop optimizers="):
        ZerofxTrainer(model=model, args=training_args(str(tmp_path)), train_dataset=dataset(),
                      optimizers=(opt, None), zerofx_config=dict(AUTO_BATCH))
    with pytest.raises(ConfigError, match="tensor_parallel through ZerofxTrainer"):
        ZerofxTrainer(model=model, args=training_args(str(tmp_path)), train_dataset=dataset(),
                      zerofx_config={**AUTO_BATCH, "tensor_parallel": {"autotp_size": 2}})

"""DeepSpeed ZeRO checkpoints converted to zerofx's format train on as DeepSpeed does.

The checkpoints in tests/data/deepspeed_checkpoints/stage{0,1,2,3}/ (fp32), stage2fp16/
(dynamic loss scaling, saved after two overflows) and stage1bf16/ (DeepSpeed's
BF16_Optimizer) were written by real DeepSpeed 0.19.8 (tests/ds_scripts/
record_ds_checkpoint.py: 2 CPU ranks, AdamW, WarmupLR, clipping, K steps, then save). The
references are DeepSpeed's own: its zero_to_fp32 output (zero_to_fp32.pt), the fp32 master
and moments its live engine held at the save (live_state.pt), the loss scaler it held
(record.json), and the losses it trained on from the save for N more steps, every rank's
(record.json), which zerofx must reproduce after converting and loading at another world
size and stage. A conversion that lost the moments would change the losses far beyond
RTOL (the control test measures it).
"""
import importlib.util
import itertools
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from multiproc import run_ranks

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data" / "deepspeed_checkpoints"
RTOL = 1e-6  # fp32, one program's rounding against another's (about 1.5e-7 observed)
STAGES = (0, 1, 2, 3)  # fp32, as recorded in stage{S}/


def _recorder():
    spec = importlib.util.spec_from_file_location(
        "record_ds_checkpoint", TESTS / "ds_scripts" / "record_ds_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REC = _recorder()


def _record(stage):
    return json.loads((DATA / f"stage{stage}" / "record.json").read_text())


def _convert(stage, out, **kw):
    from zerofx.checkpoint.deepspeed_import import convert

    return convert(DATA / f"stage{stage}", out, **kw)


# ---- what the conversion reads ------------------------------------------------------------
@pytest.mark.parametrize("stage", [*STAGES, "2fp16"])
def test_weights_equal_deepspeeds_own_consolidation(stage, tmp_path):
    from zerofx.checkpoint.files import full_states

    path, imported = _convert(stage, tmp_path)
    if stage == 0:  # no ZeRO: DeepSpeed keeps the whole weights in the module state
        ref = torch.load(DATA / "stage0" / "global_step3" / "mp_rank_00_model_states.pt",
                         weights_only=False)["module"]
    else:
        ref = torch.load(DATA / f"stage{stage}" / "zero_to_fp32.pt", weights_only=True)
    trained = {n for n, p in REC.make_model().named_parameters()}
    assert set(imported.master) == trained
    for name in trained:
        assert torch.equal(imported.master[name], ref[name]), name
    # what zerofx reads back from the files written is what was converted
    states, counters = full_states(path)
    for key in ("master", "exp_avg", "exp_avg_sq"):
        for name in trained:
            assert torch.equal(states[key][name], getattr(imported, key)[name]), (key, name)
    # the buffer, carried in the checkpoint itself (nothing left for the extras file)
    assert imported.buffers.keys() == {"temperature"} and imported.extra == {}
    assert torch.equal(counters["buffers"]["temperature"], torch.tensor(1.5))


@pytest.mark.parametrize("variant", [*STAGES, "2fp16", "1bf16"])
def test_master_and_moments_equal_deepspeeds_live_engine(variant, tmp_path):
    """live_state.pt: every parameter's fp32 master, exp_avg and exp_avg_sq as DeepSpeed's
    engine held them right after the save (its safe_get_full_* API), bit for bit. 1bf16 is
    the BF16_Optimizer's own file layout (bf16_ prefix, no zero_stage, padded slices)."""
    _, imported = _convert(variant, tmp_path)
    live = torch.load(DATA / f"stage{variant}" / "live_state.pt", weights_only=True)
    for key in ("master", "exp_avg", "exp_avg_sq"):
        assert live[key].keys() == getattr(imported, key).keys()
        for name, ref in live[key].items():
            assert torch.equal(getattr(imported, key)[name], ref), (key, name)


@pytest.mark.parametrize("stage", STAGES)
def test_counters_scheduler_and_client_state(stage, tmp_path):
    from zerofx.engine import SCHEDULER_KEY

    rec = _record(stage)
    _, imported = _convert(stage, tmp_path)
    k = rec["steps_before_save"]
    warm = rec["config"]["scheduler"]["params"]
    assert (imported.step, imported.global_steps, imported.skipped) == (k, k, 0)
    # WarmupLR (linear) after K steps: iteration K-1 of warmup_num_steps
    expected_lr = warm["warmup_max_lr"] * (k - 1) / warm["warmup_num_steps"]
    assert imported.lr == pytest.approx(expected_lr, rel=1e-12)
    assert imported.client_state == {"epoch": 1, "note": "saved by DeepSpeed",
                                     SCHEDULER_KEY: {"last_batch_iteration": k - 1}}
    assert float(imported.scaler["scale"]) == 1.0  # fp32: DeepSpeed's static scaler of 1
    assert imported.source == {"deepspeed": "0.19.8", "zero_stage": stage, "dp_size": 2,
                               "path": str(DATA / f"stage{stage}" / f"global_step{k}")}


def test_fp16_loss_scaler_and_skipped_steps_carry_over(tmp_path, no_torchrun_env):
    """fp16 with dynamic loss scaling, saved after 2 overflows (skipped steps) and 1 taken:
    the scaler's state is what DeepSpeed's live engine held at the save, and zerofx's
    engine resumes with it."""
    import zerofx

    rec = _record("2fp16")
    _, imported = _convert("2fp16", tmp_path)
    ds = rec["loss_scaler_at_save"]
    assert ds["cur_iter"] == 3 and ds["last_overflow_iter"] == 1  # the recording is as meant
    assert {k: v.item() for k, v in imported.scaler.items()} == {
        "scale": ds["cur_scale"], "iter": ds["cur_iter"],
        "last_overflow_iter": ds["last_overflow_iter"], "hysteresis": ds["cur_hysteresis"]}
    assert (imported.global_steps, imported.skipped, imported.step) == (3, 2, 1)
    engine, *_ = zerofx.initialize(model=REC.make_model(),
                                   config=REC.ds_config(2, world_size=1, gas=2, fp16=True))
    engine.load_checkpoint(tmp_path)
    assert (engine.optimizer.loss_scale, engine.skipped_steps, engine.global_steps) == (
        ds["cur_scale"], 2, 3)
    assert float(engine.runtime.state.step_count) == 1.0


# ---- training on from the converted checkpoint --------------------------------------------
def _train_from(ckpt, *, load_stage, world, rank, zero_moments=False):
    """Load ``ckpt`` into a zerofx engine (other initial weights: the load must win) and
    train N steps on the recorded batches; one process stands for ``world`` ranks by
    accumulating their micro-batches. Returns [[loss of rank r] per step]."""
    import zerofx

    torch._dynamo.reset()
    model = REC.make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        model.temperature.fill_(3.0)  # divides the logits: DeepSpeed's 1.5 must be restored
    gas = REC.WORLD_SIZE // world
    engine, *_ = zerofx.initialize(model=model,
                                   config=REC.ds_config(load_stage, gas=gas, world_size=world))
    path, client = engine.load_checkpoint(ckpt)
    assert client == {"epoch": 1, "note": "saved by DeepSpeed"}
    assert engine.global_steps == REC.K
    assert torch.equal(model.temperature, torch.tensor(1.5))  # DeepSpeed's DP rank 0's
    if zero_moments:
        engine.runtime.state.exp_avg.zero_()
        engine.runtime.state.exp_avg_sq.zero_()
    losses = []
    for step in range(REC.K, REC.K + REC.N):
        row = []
        for micro in range(gas):
            loss = engine(*REC.batch(step, rank * gas + micro))
            engine.backward(loss)
            engine.step()
            row.append(loss.item())
        losses.append(row)
    return losses


def _worst(ours, theirs):
    ours, theirs = list(itertools.chain(*ours)), list(itertools.chain(*theirs))
    assert len(ours) == len(theirs)
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))


# stage 3's layout (per-parameter partitions, sub-groups) stays in the fast loop: ~1 s
@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) if s != 3 else s
                                   for s in STAGES])
def test_one_process_trains_on_as_deepspeed(stage, tmp_path, no_torchrun_env):
    load_stage = (stage + 1) % 4  # never the saving stage
    _convert(stage, tmp_path)
    ours = _train_from(tmp_path, load_stage=load_stage, world=1, rank=0)
    worst = _worst(ours, _record(stage)["losses_after_load"])
    print(f"stage {stage} -> 1 process stage {load_stage}: max relative loss difference "
          f"against DeepSpeed {worst:.3g}")
    assert worst <= RTOL


def _two_rank_body(rank, world, ckpt, load_stage):
    return _train_from(ckpt, load_stage=load_stage, world=world, rank=rank)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_train_on_as_deepspeed(stage, tmp_path):
    load_stage = (stage + 2) % 4
    _convert(stage, tmp_path)
    results = run_ranks(_two_rank_body, 2, args=(str(tmp_path), load_stage), timeout_s=240)
    ours = [[results[r][i][0] for r in range(2)] for i in range(REC.N)]
    worst = _worst(ours, _record(stage)["losses_after_load"])
    print(f"stage {stage} -> 2 ranks stage {load_stage}: max relative loss difference "
          f"against DeepSpeed {worst:.3g}")
    assert worst <= RTOL


@pytest.mark.slow
def test_control_without_the_moments_the_losses_differ(tmp_path, no_torchrun_env):
    """The loss comparison can see the moments: zeroing them after the load moves the
    losses by far more than RTOL."""
    _convert(2, tmp_path)
    ours = _train_from(tmp_path, load_stage=2, world=1, rank=0, zero_moments=True)
    assert _worst(ours, _record(2)["losses_after_load"]) > 100 * RTOL


# ---- bad input: one clear error naming the file and the fix -------------------------------
def _copy(stage, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(DATA / f"stage{stage}", dst)
    return dst, dst / "global_step3"


def _edit_model_states(path, edit):
    state = torch.load(path, weights_only=False)  # these hold no deepspeed objects
    edit(state)
    torch.save(state, path)


def _refused(ds_dir, out, match):
    from zerofx.checkpoint import CheckpointError
    from zerofx.checkpoint.deepspeed_import import convert

    with pytest.raises(CheckpointError, match=match):
        convert(ds_dir, out)
    assert not (Path(out) / "latest").exists()  # nothing published


def test_missing_rank_file(tmp_path):
    ds, tag = _copy(1, tmp_path)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _refused(ds, tmp_path / "out", "saved by 2 data-parallel ranks, but "
             "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing; copy every rank's file")


def test_files_of_two_world_sizes(tmp_path):
    ds, tag = _copy(3, tmp_path)
    shutil.copy(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    _refused(ds, tmp_path / "out", r"zero_pp_rank_2_mp_rank_00_optim_states.pt is from a save "
             r"by more than the 2 data-parallel ranks.*copy the tag directory again")


def test_two_optimizer_files_for_one_rank(tmp_path):
    ds, tag = _copy(1, tmp_path)
    shutil.copy(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    _refused(ds, tmp_path / "out", "two optimizer files for DP rank 0.*copy the tag directory")


@pytest.mark.parametrize("stage", [1, 3])
def test_param_shapes_that_do_not_match_the_partitions(stage, tmp_path):
    ds, tag = _copy(stage, tmp_path)
    name = "mp_rank_00_model_states.pt" if stage < 3 else \
        "zero_pp_rank_0_mp_rank_00_model_states.pt"
    _edit_model_states(tag / name, lambda s: s["param_shapes"][0].popitem())  # head.weight
    _refused(ds, tmp_path / "out", r"the parameters use \d+ of the \d+ saved elements.*"
             r"do not match their param_shapes")


def test_a_tag_directory_itself_converts_under_its_name(tmp_path):
    path, _ = _convert("3/global_step3", tmp_path)
    assert path == tmp_path / "global_step3"


def test_model_parallel_checkpoint(tmp_path):
    ds, tag = _copy(1, tmp_path)
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    _refused(ds, tmp_path / "out", "mp_rank_01_model_states.pt belongs to model-parallel "
             "rank 01.*save with model parallel size 1")


def test_pipeline_checkpoint(tmp_path):
    ds, tag = _copy(1, tmp_path)
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "layer_01-model_00-model_states.pt")
    _refused(ds, tmp_path / "out", "layer_01-model_00-model_states.pt is a pipeline-parallel")


def test_tensor_parallel_degree_recorded(tmp_path):
    ds, tag = _copy(2, tmp_path)
    _edit_model_states(tag / "mp_rank_00_model_states.pt",
                       lambda s: s["checkpoint_parallel_dimensions"].update(tp_degree=2))
    _refused(ds, tmp_path / "out", "mp_rank_00_model_states.pt was saved with model "
             "parallel size 1 \\(tensor 2, pipeline 1\\): only data-parallel")


def test_optimizer_other_than_adam(tmp_path):
    ds, tag = _copy(1, tmp_path)
    _edit_model_states(tag / "mp_rank_00_model_states.pt",
                       lambda s: s["ds_config"]["optimizer"].update(type="Lamb"))
    _refused(ds, tmp_path / "out", "optimizer is 'Lamb'; only Adam and AdamW states convert")


def test_optimizer_state_that_is_not_adams(tmp_path):
    def sgd(s):  # a client optimizer (no "optimizer" in ds_config) with SGD's state
        del s["ds_config"]["optimizer"]
        for state in s["optimizer"]["state"].values():
            state["momentum_buffer"] = state.pop("exp_avg")
            del state["exp_avg_sq"]

    ds, tag = _copy(0, tmp_path)
    _edit_model_states(tag / "mp_rank_00_model_states.pt", sgd)
    _refused(ds, tmp_path / "out", r"keys \['momentum_buffer', 'step'\] is not Adam's")


def test_client_state_that_is_not_plain_data(tmp_path):
    from zerofx.checkpoint.deepspeed_import import convert

    ds, tag = _copy(1, tmp_path)
    _edit_model_states(tag / "mp_rank_00_model_states.pt",
                       lambda s: s.update(sampler={"seen": {1, 2}}))
    _refused(ds, tmp_path / "out", r"client_state\['sampler'\]\['seen'\] is a builtins.set"
             r".*--drop-client-key sampler")
    _, imported = convert(ds, tmp_path / "out", drop_client_keys=("sampler",))
    assert "sampler" not in imported.client_state


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_a_pickle_naming_other_code_runs_nothing(tmp_path, monkeypatch):
    ds, tag = _copy(1, tmp_path)
    _edit_model_states(tag / "mp_rank_00_model_states.pt", lambda s: s.update(x=_Payload()))
    monkeypatch.chdir(tmp_path)
    _refused(ds, tmp_path / "out", r"mp_rank_00_model_states.pt: client_state\['x'\] is a "
             r"(posix|os)\.system.*--drop-client-key x")
    assert not (tmp_path / "PWNED").exists()
    assert pickle.dumps(0)  # the module's pickle is untouched


def test_shapes_that_do_not_fit_the_model_at_load(tmp_path, no_torchrun_env):
    import torch.nn as nn

    import zerofx
    from zerofx.checkpoint import CheckpointError

    _convert(1, tmp_path)
    model = REC.make_model()
    model.fc2 = nn.Linear(40, 34)
    model.head = nn.Linear(34, REC.CLASSES, bias=False)
    engine, *_ = zerofx.initialize(model=model, config=REC.ds_config(1, world_size=1))
    with pytest.raises(CheckpointError, match=r"meta.pt does not fit this model: .*fc2.weight "
                       r"shape \[33, 40\] in the checkpoint, \[34, 40\] in the model"):
        engine.load_checkpoint(tmp_path)


def test_loading_a_deepspeed_directory_names_the_converter(tmp_path, no_torchrun_env):
    import zerofx
    from zerofx.checkpoint import CheckpointError

    ds, _ = _copy(2, tmp_path)
    engine, *_ = zerofx.initialize(model=REC.make_model(), config=REC.ds_config(2, world_size=1))
    with pytest.raises(CheckpointError, match=f"is a DeepSpeed checkpoint.*`zerofx-from-deepspeed "
                       f"{ds} {ds}_zerofx --tag global_step3`"):
        engine.load_checkpoint(ds)


# ---- the command line ---------------------------------------------------------------------
def test_cli_converts_and_reports(tmp_path, capsys):
    from zerofx.tools.from_deepspeed import main

    assert main([str(DATA / "stage3"), str(tmp_path), "--tag", "global_step3"]) == 0
    out = capsys.readouterr().out
    assert "7 parameters, 2118 elements" in out and "ZeRO stage 3 on 2 data-parallel" in out
    assert (tmp_path / "latest").read_text() == "global_step3"
    assert "buffers (DeepSpeed's DP rank 0's, restored by load_checkpoint): temperature" in out
    # the buffer is in the checkpoint; no frozen parameters: no extras file
    assert not (tmp_path / "global_step3_module_extras.pt").exists()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from zerofx.tools.from_deepspeed import main

    assert main([str(DATA / "stage1"), str(tmp_path), "--tag", "global_step9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zerofx-from-deepspeed: ") and "global_step9 does not exist; " \
        "tags present: global_step3" in err

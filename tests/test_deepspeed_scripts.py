"""DeepSpeed users' scripts run on zerofx with only the import changed, and give DeepSpeed's
numbers.

tests/ds_scripts/cifar_style.py and bert_style.py use DeepSpeed's API as DeepSpeedExamples'
training/cifar/cifar10_deepspeed.py and training/HelloDeepSpeed/train_bert_ds.py do (see their
docstrings), on synthetic data, fp32, ZeRO stage 2, 2 ranks. Real DeepSpeed 0.19.8 ran them
on 2 CPU ranks (gloo) and its per-step losses are the fixtures in
tests/data/deepspeed_fixtures/ (with the command, versions and date;
tests/ds_scripts/record_fixtures.py records them again). Here the same runs go through
torchrun on zerofx: tests/ds_scripts/run_as_zerofx.py calls zerofx.as_deepspeed() and runs
the script unchanged as __main__, so `import deepspeed` gives zerofx and the script sees
exactly torchrun's environment. Every loss must equal DeepSpeed's to RTOL (fp32: one
program's rounding against another's; observed up to about 2.5e-7).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCRIPTS = TESTS / "ds_scripts"
FIXTURES = TESTS / "data" / "deepspeed_fixtures"
RUNNER = SCRIPTS / "run_as_zerofx.py"
RTOL = 1e-5
RUN_TIMEOUT_S = 200  # one torchrun of one script (about 20 s here)


def _recorder():
    spec = importlib.util.spec_from_file_location("ds_record_fixtures",
                                                  SCRIPTS / "record_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(cmd, timeout_s):
    """Run torchrun in its own session; on timeout kill it with its ranks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                        "MASTER_ADDR", "MASTER_PORT")}
    # this checkout's zerofx; one intra-op thread per rank, as the fixtures were recorded
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, f"timed out after {timeout_s} s\n{output}"
    return proc.returncode, output


_RESULTS: dict = {}


def zerofx_runs(name: str, tmp_path_factory):
    """The fixture of script `name` and zerofx's results of its runs (run once per session;
    a later run may resume from an earlier one's checkpoint). A failed run is a string."""
    if name not in _RESULTS:
        fixture = json.loads((FIXTURES / f"{name}.json").read_text())
        recorder = _recorder()
        tmp = tmp_path_factory.mktemp(f"zerofx-{name}")
        results = []
        for i, run in enumerate(fixture["runs"]):
            out = tmp / f"run{i}.json"
            cmd = recorder.torchrun_command(
                sys.executable,
                [str(RUNNER), str(SCRIPTS / f"{name}.py"), *recorder.fill(run["args"], out, tmp)])
            rc, output = _torchrun(cmd, RUN_TIMEOUT_S)
            if rc == 0 and out.exists():
                results.append(json.loads(out.read_text()))
            else:
                tail = "\n".join(output.splitlines()[-60:])
                results.append(f"`{' '.join(cmd)}` exited {rc}:\n{tail}")
                results.extend(["an earlier run failed"] * (len(fixture["runs"]) - i - 1))
                break
        _RESULTS[name] = (fixture, results)
    return _RESULTS[name]


def _result(name, run, tmp_path_factory):
    fixture, results = zerofx_runs(name, tmp_path_factory)
    ours = results[run]
    if isinstance(ours, str):
        pytest.fail(f"{name} run {run} on zerofx: {ours}")
    return fixture["runs"][run]["result"], ours, fixture["versions"]["deepspeed"]


def assert_losses_equal(ours, theirs, what, version):
    """Equal lengths, and every loss within RTOL; the message names the first step off."""
    assert len(ours) == len(theirs), (
        f"{what}: zerofx ran {len(ours)} steps, DeepSpeed {version} {len(theirs)}")
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    worst = max(rel, default=0.0)
    print(f"{what}: max relative loss difference against DeepSpeed {version}: {worst:.3g}")
    if worst > RTOL:
        first = next(i for i, r in enumerate(rel) if r > RTOL)
        pytest.fail(
            f"{what}: zerofx's losses leave DeepSpeed {version}'s at step index {first} "
            f"(zerofx {ours[first]!r}, DeepSpeed {theirs[first]!r}); max relative difference "
            f"{worst:.3g} > {RTOL}\n  zerofx:    {ours}\n  DeepSpeed: {theirs}")


# ---- cifar_style: training_data loader, WarmupLR, clipping, accumulation 2, two epochs -------
def _cifar_epochs(losses):
    half = len(losses) // 2  # the script's default --epochs 2
    return losses[:half], losses[half:]


@pytest.mark.slow
def test_cifar_style_first_epoch_losses_are_deepspeeds(tmp_path_factory):
    theirs, ours, version = _result("cifar_style", 0, tmp_path_factory)
    assert_losses_equal(_cifar_epochs(ours["losses"])[0], _cifar_epochs(theirs["losses"])[0],
                        "cifar_style epoch 1", version)


@pytest.mark.slow
def test_cifar_style_second_epoch_losses_are_deepspeeds(tmp_path_factory):
    # DeepSpeed's training_data loader (DeepSpeedDataLoader) never calls set_epoch on its
    # DistributedSampler: every epoch reads the same per-rank order.
    theirs, ours, version = _result("cifar_style", 0, tmp_path_factory)
    assert_losses_equal(_cifar_epochs(ours["losses"])[1], _cifar_epochs(theirs["losses"])[1],
                        "cifar_style epoch 2", version)


@pytest.mark.slow
def test_cifar_style_eval_is_deepspeeds(tmp_path_factory):
    theirs, ours, version = _result("cifar_style", 0, tmp_path_factory)
    ours, theirs = ours["eval"], theirs["eval"]
    assert_losses_equal([ours["mean_loss"]], [theirs["mean_loss"]], "cifar_style eval loss",
                        version)
    counts = ("correct", "total", "per_class_correct", "per_class_total")
    assert {k: ours[k] for k in counts} == {k: theirs[k] for k in counts}


# ---- bert_style: own loader, config without gradient_clipping, checkpoint and resume ----------
@pytest.mark.slow
def test_bert_style_losses_are_deepspeeds(tmp_path_factory):
    # The config sets no gradient_clipping: DeepSpeed >= 0.19.3 clips at 1.0 by default.
    theirs, ours, version = _result("bert_style", 0, tmp_path_factory)
    assert [s for s, _ in ours["losses"]] == [s for s, _ in theirs["losses"]]
    assert_losses_equal([l for _, l in ours["losses"]], [l for _, l in theirs["losses"]],
                        "bert_style", version)


@pytest.mark.slow
def test_bert_style_resumed_from_its_checkpoint_gives_deepspeeds_losses(tmp_path_factory):
    theirs, ours, version = _result("bert_style", 1, tmp_path_factory)
    assert ours["resumed_from"] == theirs["resumed_from"]  # client_state came back
    assert [s for s, _ in ours["losses"]] == [s for s, _ in theirs["losses"]]
    assert_losses_equal([l for _, l in ours["losses"]], [l for _, l in theirs["losses"]],
                        "bert_style resumed", version)


# ---- what the original scripts import beyond these scripts -----------------------------------
def test_cifar_originals_moe_helper_import(as_deepspeed):
    # cifar10_deepspeed.py imports this helper at its top, MoE or not: zerofx serves it
    # (deepspeed.moe.layer, the MoE layers themselves, stays refused)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [], "name": "parameters"})
    assert groups

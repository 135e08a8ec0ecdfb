"""benchmarks/gpu_check.py, run here with --device cpu: the C++ kernels pass it, and a kernel
that drifts from the reference fails it (so a green run on a GPU means something); its
--offload comparison runs the host-offload path forced on CPU parameters; and
benchmarks/gpu_train.py's single-device comparison runs end to end here."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"
ARGS = ["--device", "cpu", "--numel", "5003", "--bandwidth_numel", "100000"]


def _load(path=SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_kernels_pass_every_case(capsys):
    assert _load().main(ARGS) == 0
    out = capsys.readouterr().out
    assert out.count("| yes |") == 42 and "| NO |" not in out  # 36 Adam + 6 LAMB cases
    assert "GB/s" in out


@pytest.mark.slow
def test_a_kernel_off_by_a_little_fails(monkeypatch, capsys):
    check = _load()
    real = check.optim_ops.adam_step_fallback

    def drifting(param, *args, **kw):  # the reference moves 1e-4 further each step
        real(param, *args, **kw)
        param.mul_(1 + 1e-4)

    monkeypatch.setattr(check.optim_ops, "adam_step_fallback", drifting)
    assert check.main(ARGS) == 1
    out = capsys.readouterr().out
    assert "| NO |" in out


@pytest.mark.slow
def test_single_device_training_runs_beside_its_peer(no_torchrun_env, capsys):
    """The main job's GPT on one device, zerofx and the peer from the same weights and
    batches: their first losses agree (the script checks it) and both rows are printed."""
    train = _load(BENCH / "gpu_train.py")
    assert train.main(["--device", "cpu", "--steps", "3", "--warmup", "1",
                       "--peer_backend", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "| zerofx (bf16" in out and "| torch.compile (aot_eager)" in out


OFFLOAD_ARGS = ["--offload", "--device", "cpu", "--offload_steps", "3", "--offload_warmup", "1"]


@pytest.mark.slow
def test_offload_comparison_runs_and_gives_the_same_bits(no_torchrun_env, capsys):
    """--offload on the CPU forces the GPU path's host offload: the same bits as in memory,
    and the device side holds 12 bytes per parameter less (the fp32 master and moments)."""
    assert _load().main(OFFLOAD_ARGS) == 0
    out = capsys.readouterr().out
    assert "same bits (losses and parameters): yes" in out
    rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines()
            if line.startswith("| in memory") or line.startswith("| offload_optimizer")}
    mem, off = float(rows["| in memory"][4]), float(rows["| offload_optimizer cpu"][4])
    assert off < mem / 3  # bf16 parameters and gradients stay; 12 of 16 bytes/param leave


@pytest.mark.slow
def test_offload_comparison_fails_when_the_host_step_differs(no_torchrun_env, monkeypatch,
                                                              capsys):
    from zerofx.runtime.offload.host import HostOffload

    real = HostOffload.adam

    def drifting(self, g, out, **kw):  # the host update lands a little off
        real(self, g, out, **kw)
        out.mul_(1 + 2 ** -6)

    monkeypatch.setattr(HostOffload, "adam", drifting)
    assert _load().main(OFFLOAD_ARGS) == 1
    assert "same bits (losses and parameters): NO" in capsys.readouterr().out

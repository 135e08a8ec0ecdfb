"""zerofx errors on a multi-rank run: one line, printed once, by the rank that found it."""
import subprocess
import sys
from pathlib import Path

import pytest

from zerofx.config import ConfigError
from zerofx.runtime.comm.error_report import zerofx_error

SCRIPT = Path(__file__).parent / "launch_scripts" / "config_error.py"


def test_finds_the_zerofx_error_behind_dynamos_wrapper():
    inner = ConfigError("tensor_parallel.plan: bad")
    try:
        try:
            raise inner
        except ConfigError as e:
            raise RuntimeError("BackendCompilerFailed") from e
    except RuntimeError as outer:
        assert zerofx_error(outer) is inner
    assert zerofx_error(KeyError("x")) is None  # a bug keeps its traceback


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_same_error_on_every_rank_is_one_line(tmp_path):
    from test_launch import free_port

    done = subprocess.run([sys.executable, "-m", "zerofx.tools.launch", "--num_procs", "2",
                           "--master_port", str(free_port()), str(SCRIPT)], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=100)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    lines = [line for line in text.splitlines() if "zerofx: error" in line]
    assert len(lines) == 1, text
    assert "matches no Linear layer" in lines[0] and "Traceback" not in text


def test_a_config_typo_before_the_process_group_is_one_line_per_rank(tmp_path):
    """A misspelt key fails while the config is read, before any process group exists (no
    store to agree on who prints): each launched rank prints one line, no traceback."""
    import os

    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "ZEROFX_TRACEBACK": "0"}
    code = ("import zerofx; zerofx.Config.from_dict("
            "{'zero_optimization': {'stgae': 2}})")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert line.startswith("zerofx: error (rank 1): ConfigError: ") and "'stage'" in line, line

"""What a multi-node launch exports to the remote hosts (tools/launch_env.py)."""
import pytest

from zerofx.tools import launch_env
from zerofx.tools.launch_env import EnvFileError


def test_prefixes_path_and_virtualenv_are_exported(tmp_path):
    environ = {"PATH": "/venv/bin:/usr/bin", "VIRTUAL_ENV": "/venv", "PYTHONPATH": "/src",
               "NCCL_DEBUG": "INFO", "GLOO_SOCKET_IFNAME": "lo", "HOME": "/root",
               "CUDA_VISIBLE_DEVICES": "3", "SECRET_TOKEN": "x", "TORCHELASTIC_RUN_ID": "r"}
    exports = launch_env.remote_exports(environ, cwd=str(tmp_path), home=str(tmp_path))
    assert exports == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_DEBUG": "INFO",
                       "PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/src", "VIRTUAL_ENV": "/venv"}


def test_env_files_home_then_cwd(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "job"
    home.mkdir()
    cwd.mkdir()
    (home / ".zerofx_env").write_text("# mine\nA=home\nB=home\n")
    (cwd / ".zerofx_env").write_text("B=job value\n\nexport C = 3\nFROM_ENV\nMISSING\n")
    exports = launch_env.read_env_files(cwd=str(cwd), home=str(home),
                                        environ={"FROM_ENV": "here"})
    assert exports == {"A": "home", "B": "job value", "C": "3", "FROM_ENV": "here"}


def test_env_file_same_directory_read_once(tmp_path):
    (tmp_path / ".zerofx_env").write_text("A=1\n")
    exports = launch_env.read_env_files(cwd=str(tmp_path), home=str(tmp_path), environ={})
    assert exports == {"A": "1"}


@pytest.mark.parametrize("line", ["1A=x", "A B=x", "=x", "A-B"])
def test_malformed_env_line_names_file_line_and_text(tmp_path, line):
    (tmp_path / ".zerofx_env").write_text(f"OK=1\n{line}\n")
    with pytest.raises(EnvFileError) as e:
        launch_env.read_env_files(cwd=str(tmp_path), home=str(tmp_path / "none"), environ={})
    assert f"{tmp_path / '.zerofx_env'} line 2 ({line!r})" in str(e.value)

"""The README's example runs and its loss falls (a shortened run)."""
import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_loss_falls(no_torchrun_env, tmp_path):
    main = runpy.run_path(str(EXAMPLES / "quickstart.py"))["main"]
    assert main(["--steps", "25", "--dump", str(tmp_path / "dump")]) == 0
    assert list((tmp_path / "dump").glob("rank0/*/joint/01_mixed_precision.py"))

"""Graph dumps (ZEROFX_DUMP) and the zerofx-dump renderer."""
import json

import pytest
import torch

from models import make
from zerofx.tools import dump as dump_cli


@pytest.fixture
def dumped(tmp_path, monkeypatch, no_torchrun_env):
    """Compile one bf16 training step with dumping on; return the dump root."""
    monkeypatch.setenv("ZEROFX_DUMP", str(tmp_path / "dump"))
    model, batch = make("mlp")
    torch.compile(model, backend="zero", options={"config": {"bf16": {"enabled": True}}})(
        *batch).backward()
    return tmp_path / "dump"


def _only(root, kind):
    (d,) = dump_cli.find_graphs(root, kind=kind)
    return d


def test_files_for_every_graph_and_pass(dumped):
    graph_dir = _only(dumped, "joint").parent
    assert (graph_dir / "plan.txt").read_text().startswith("plan: rank 0, world 1")
    for kind, files in {"joint": ["00_input.py", "01_mixed_precision.py"],
                        "forward": ["00_input.py", "01_matmul_tuning.py"],
                        "backward": ["00_input.py", "01_matmul_tuning.py"]}.items():
        d = graph_dir / kind
        assert sorted(p.name for p in d.glob("*.py")) == files
        assert (d / "summary.txt").exists() and (d / "summary.json").exists()


def test_added_nodes_are_attributed_to_their_pass(dumped):
    d = _only(dumped, "joint")
    rows = json.loads((d / "summary.json").read_text())["passes"]
    mp = next(r for r in rows if r["name"] == "mixed_precision")
    code = (d / mp["file"]).read_text()
    marked = [line for line in code.splitlines() if line.endswith("# +mixed_precision")]
    assert len(marked) == mp["added"] > 0
    # every cast in the graph was added by the pass (AOTAutograd's fp32 graph has none)
    casts = [line for line in code.splitlines() if "= torch.ops.prims.convert_element_type" in line]
    assert casts and all(line.endswith("# +mixed_precision") for line in casts)
    assert mp["kinds"]["cast"] == len(casts)


def test_renderer_lists_passes_and_summary(dumped, capsys):
    assert dump_cli.main([str(dumped)]) == 0
    out = capsys.readouterr().out
    assert "rank0 /" in out and "mixed_precision" in out and "+added" in out
    assert dump_cli.main([str(dumped), "--kind", "joint", "--diff", "mixed_precision"]) == 0
    diff = capsys.readouterr().out
    assert diff.startswith("--- 00_input.py") and "+" in diff


@pytest.mark.parametrize("argv, message", [
    (["{root}/missing"], "no such directory"),
    (["{root}", "--kind", "joint", "--show", "bucketing"], "no pass 'bucketing' ran here"),
    (["{root}", "--rank", "3"], "present: rank0/"),
])
def test_renderer_errors_are_one_line(dumped, capsys, argv, message):
    assert dump_cli.main([a.format(root=dumped) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unwritable_dump_dir_is_a_config_error(no_torchrun_env, tmp_path):
    import zerofx

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    model, batch = make("mlp")
    rt = zerofx.ZeroRuntime(model, {"optimizer": {"type": "Adam"},
                                    "zerofx": {"dump_dir": str(blocker / "dumps")}})
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(*batch)
    assert isinstance(info.value.inner_exception, zerofx.ConfigError)
    assert "cannot be written" in str(info.value.inner_exception)

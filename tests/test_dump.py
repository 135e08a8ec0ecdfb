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
    plan = (graph_dir / "plan.txt").read_text()
    assert plan.startswith("plan: rank 0, world 1")
    assert "CPU matmuls: bfloat16 " in plan  # the matmul form the program was compiled with
    for kind, files in {"joint": ["00_input.py", "01_mixed_precision.py"],
                        "forward": ["00_input.py", "01_matmul_form.py"],
                        "backward": ["00_input.py", "01_matmul_form.py"]}.items():
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
    casts = [line for line in code.splitlines() if "= torch.ops.aten._to_copy" in line]
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


def test_dumped_code_names_the_inputs_and_html_colours_the_passes(dumped):
    d = _only(dumped, "joint")
    code = (d / "00_input.py").read_text()
    assert "=param fc1.weight" in code.replace(" = ", "=") and "=param fc2.bias" in \
        code.replace(" = ", "=")
    page = (d / "graph.html").read_text()
    assert page.startswith("<!doctype html>") and "mixed_precision" in page
    assert "param fc1.weight" in page and "plan: rank 0" in page
    # the casts the pass added are coloured rows, AOTAutograd's are not
    assert page.count("<tr style='background:") == \
        json.loads((d / "summary.json").read_text())["passes"][1]["added"]


def _explode(gm, ctx):
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    raise ValueError(f"cannot handle {node.name}")


def test_a_failing_pass_leaves_a_record_naming_pass_node_and_model_line(tmp_path, monkeypatch,
                                                                         no_torchrun_env):
    from zerofx.passes import PassSpec

    monkeypatch.setenv("ZEROFX_DUMP", str(tmp_path / "dump"))
    model, batch = make("mlp")
    compiled = torch.compile(model, backend="zero", options={
        "config": {}, "extra_passes": [PassSpec("explode", _explode, frozenset({"joint"}))]})
    with pytest.raises(Exception) as info:
        compiled(*batch).backward()
    assert "raised in pass 'explode'" in "".join(getattr(info.value, "__notes__", [])) or \
        "raised in pass 'explode'" in str(info.value) + "".join(
            getattr(getattr(info.value, "inner_exception", None), "__notes__", []))
    (failure,) = (tmp_path / "dump").glob("rank0/*/joint/failure.txt")
    text = failure.read_text()
    assert text.startswith("pass explode raised ValueError: cannot handle")
    assert "models.py" in text and "self.fc" in text  # the model line of the named node
    assert (failure.parent / "01_explode.failed.py").exists()


@pytest.mark.slow
def test_torch_trace_carries_zerofx_graphs(tmp_path):
    import subprocess
    import sys

    script = ("import torch, sys; sys.path.insert(0, 'tests'); from models import make; "
              "m, b = make('mlp'); torch.compile(m, backend='zero', options={'config': "
              "{'bf16': {'enabled': True}}})(*b).backward()")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["TORCH_TRACE"] = str(tmp_path / "trace")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300,
                   cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    logs = "".join(p.read_text() for p in (tmp_path / "trace").glob("*"))
    assert "zerofx_" in logs and "mixed_precision" in logs

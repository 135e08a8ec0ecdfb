"""The collective-form cache: a rerun on this host takes the form an earlier run timed."""
import json

import torch

from zerofx.runtime.comm import form_cache


def test_stored_choice_is_loaded_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(form_cache, "_MEMORY", {})
    key = form_cache.key_of("gather", ("all_gather", "p2p"), 2, "gloo", 1000, torch.bfloat16)
    assert form_cache.load(key) is None
    form_cache.store(key, "p2p", (("all_gather", 2.0), ("p2p", 1.0)))
    monkeypatch.setattr(form_cache, "_MEMORY", {})  # a new process: only the file remains
    assert form_cache.load(key) == {"form": "p2p", "times_ms": [["all_gather", 2.0],
                                                                ["p2p", 1.0]]}
    other = form_cache.key_of("gather", ("all_gather", "p2p"), 4, "gloo", 1000, torch.bfloat16)
    assert form_cache.load(other) is None  # another world size is another question
    assert [p.name for p in tmp_path.iterdir()] == ["collective_forms.json"]  # no temp left


def test_an_unreadable_file_means_timing_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(form_cache, "_MEMORY", {})
    (tmp_path / "collective_forms.json").write_text("{not json")
    key = form_cache.key_of("reduce", ("p2p",), 2, "gloo", 10, torch.float32)
    assert form_cache.load(key) is None
    form_cache.store(key, "p2p", (("p2p", 1.0),))  # and the next store repairs it
    assert json.loads((tmp_path / "collective_forms.json").read_text())[key]["form"] == "p2p"


def test_a_read_only_cache_dir_keeps_the_choice_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROFX_CACHE_DIR", str(tmp_path / "file" / "sub"))
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setattr(form_cache, "_MEMORY", {})
    key = form_cache.key_of("reduce", ("p2p",), 2, "gloo", 10, torch.float32)
    form_cache.store(key, "p2p", (("p2p", 1.0),))
    assert form_cache.load(key)["form"] == "p2p"

"""runtime/host_memory.py: /proc/meminfo and /proc/self/status, read for see_memory_usage and
the benchmarks' memory watches."""
import os
import sys

import pytest

import torch

from zerofx.runtime.host_memory import available_memory, meminfo, process_status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/meminfo is Linux's")
def test_meminfo_agrees_with_the_kernels_page_count():
    fields = meminfo()
    # sysconf's physical pages and MemTotal are the same kernel count (totalram_pages)
    assert fields["MemTotal"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available_memory() <= fields["MemTotal"]
    assert fields["MemFree"] <= fields["MemTotal"]
    # a count without a unit stays a count (HugePages_Total is pages, not kB)
    if "HugePages_Total" in fields:
        assert fields["HugePages_Total"] * fields.get("Hugepagesize", 1) <= fields["MemTotal"]


def test_no_meminfo_is_none_not_an_error(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_proc(path, *a, **kw):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert meminfo() is None and available_memory() is None
    from zerofx.ds_utils.memory import _host_memory

    used, total = _host_memory()  # see_memory_usage still prints: sysconf's total
    assert used == 0 and total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_process_status_sees_an_allocation_touched_in_anonymous_memory():
    before = process_status()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: its own mapping, every page
    after = process_status()                          # written
    grew = after["RssAnon"] - before["RssAnon"]
    assert 0.9 * block.numel() < grew < 1.5 * block.numel(), grew
    assert after["VmRSS"] >= after["RssAnon"] and after["Threads"] >= 1  # a count stays one
    del block

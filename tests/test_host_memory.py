"""runtime/host_memory.py: /proc/meminfo read once for the runtime and see_memory_usage."""
import os
import sys

import pytest

from zerofx.runtime.host_memory import available_memory, meminfo


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

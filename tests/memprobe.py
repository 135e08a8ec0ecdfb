"""Anonymous memory of this process, read from /proc/self/status (RssAnon), independently of
anything zerofx records: the probe memory tests assert on (file-backed pages, which the
kernel writes back and drops, are not in it)."""
import ctypes
import threading
import time

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def malloc_returns_frees(threshold: int = 128 << 10) -> None:
    """From now on glibc gives every block of ``threshold`` bytes or more its own mapping and
    unmaps it at free, and trims a heap top past ``threshold``: RssAnon then follows the
    bytes alive. By default the mapping threshold rises to the largest block freed (up to
    32 MiB), after which such blocks are kept in the heaps of whichever threads freed them:
    how many stay there depends on thread timing (a clean-clone CI run measured 4.1 x where
    runs here measure 2.4 x). Process-wide and for good: call it in a rank, not in pytest."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                         threshold)):
        raise AssertionError("mallopt refused the thresholds")


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


class PeakAnon:
    """``with PeakAnon() as p: ...``; ``p.peak``: the largest RssAnon growth over the block,
    seen by a sampling thread (the code measured must release the GIL now and then: torch's
    kernels and file I/O do)."""

    def __enter__(self):
        self.base, self.peak, self._stop = rss_anon(), 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_anon() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_anon() - self.base)

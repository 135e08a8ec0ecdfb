"""Anonymous memory of this process, read from /proc/self/status (RssAnon), independently of
anything zerofx records: the probe memory tests assert on (file-backed pages, which the
kernel writes back and drops, are not in it)."""
import threading
import time


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

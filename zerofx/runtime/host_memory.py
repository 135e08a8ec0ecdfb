"""The host's and this process's memory as Linux's /proc/meminfo and /proc/self/status state
them, in bytes: one reader for DeepSpeed's ``see_memory_usage`` (zerofx/ds_utils/memory.py)
and the benchmarks' memory watches (RssAnon, MemAvailable)."""
from __future__ import annotations


def meminfo() -> dict[str, int] | None:
    """{field: bytes} of /proc/meminfo (MemTotal, MemAvailable, ...); None where there is
    none (not Linux) or it cannot be read."""
    return _read_kb_fields("/proc/meminfo")


def process_status() -> dict[str, int] | None:
    """{field: bytes or count} of /proc/self/status's numeric fields (RssAnon, VmHWM,
    Threads, ...); None where there is none."""
    return _read_kb_fields("/proc/self/status")


def _read_kb_fields(path: str) -> dict[str, int] | None:
    try:
        with open(path) as f:
            fields = {}
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():  # "<n> kB", or a bare count (HugePages_*)
                    fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
            return fields
    except OSError:
        return None


def available_memory() -> int | None:
    """MemAvailable in bytes (None where /proc/meminfo does not say)."""
    return (meminfo() or {}).get("MemAvailable")

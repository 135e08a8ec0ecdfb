"""The host's memory as Linux's /proc/meminfo states it, in bytes: one reader for the
runtime's checks (can an offloaded state pass through memory?) and DeepSpeed's
``see_memory_usage`` (zerofx/ds_utils/memory.py)."""
from __future__ import annotations


def meminfo() -> dict[str, int] | None:
    """{field: bytes} of /proc/meminfo (MemTotal, MemAvailable, ...); None where there is
    none (not Linux) or it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
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

"""Hostfiles and resource filters: which slots on which hosts a launch may use.

A hostfile lists one host per line, ``hostname slots=N``; ``#`` starts a comment. The result
of every function here is a *resource map*, ``{host: [slot, ...]}``, ordered as the ranks
will be: hosts in hostfile order, slots ascending. Filters follow DeepSpeed's launcher:

    --include worker-0@worker-1:0,2     keep all of worker-0, slots 0 and 2 of worker-1
    --exclude worker-0:0,1@worker-1     drop two slots of worker-0 and all of worker-1

Every error is a :class:`HostfileError` whose message names the culprit (file, line, text or
filter) and the fix, so the command line can print it as one line.
"""
from __future__ import annotations

import dataclasses
import logging
import re

log = logging.getLogger(__name__)

# Hostnames reach ssh's argv and remote shells: a strict grammar keeps out option injection
# (a leading "-") and shell metacharacters. ":" and "@" are the filter's separators, so
# IPv6 literals are not accepted; name such hosts in /etc/hosts or ~/.ssh/config.
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
# ASCII digits only: str patterns' \d also matches '١' and other scripts' digits.
_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>[0-9]+)")
_SLOT = re.compile(r"[0-9]{1,6}")
# Processes (GPUs) one host may run: well above any machine's GPU count, small enough that a
# typo (slots=100000000) is an error instead of minutes and gigabytes of plans.
MAX_SLOTS = 4096

Resources = dict[str, list[int]]


class HostfileError(ValueError):
    """A bad hostfile or filter; the message is one line that names the culprit and the fix."""


@dataclasses.dataclass(frozen=True)
class Host:
    """One hostfile entry, with where it came from for error messages."""

    name: str
    slots: int
    path: str  # the hostfile, or a description of the local resources
    line: int = 0
    text: str = ""

    @property
    def origin(self) -> str:
        """Where the entry came from, e.g. ``/job/hostfile line 3 ('worker-1 slots=4')``."""
        return f"{self.path} line {self.line} ({self.text!r})" if self.line else self.path


def is_valid_hostname(name: str) -> bool:
    """True for names safe to hand to ssh: letters, digits, '_', '-', '.'; no leading '-'."""
    return _HOSTNAME.fullmatch(name) is not None


def parse_hostfile(text: str, *, path: str) -> dict[str, Host]:
    """Parse hostfile text; ``path`` is only used in error messages."""
    hosts: dict[str, Host] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path} line {number} ({raw.strip()!r})"
        match = _LINE.fullmatch(line)
        if match is None:
            raise HostfileError(f"{where}: expected 'hostname slots=N'")
        name, digits = match["host"], match["slots"]
        if len(digits) > 6 or int(digits) > MAX_SLOTS:
            raise HostfileError(f"{where}: slots={digits} is more than the {MAX_SLOTS} "
                                f"processes one host can run; give its GPU count")
        slots = int(digits)
        if not is_valid_hostname(name):
            raise HostfileError(
                f"{where}: {name!r} is not a valid hostname (letters, digits, '.', '-', '_'; "
                "no leading '-'); use a name from /etc/hosts or ~/.ssh/config")
        if slots == 0:
            raise HostfileError(f"{where}: slots=0 leaves nothing to run; remove the line "
                                "or give a positive count")
        if name in hosts:
            raise HostfileError(f"{where}: duplicate host {name!r}, first listed in "
                                f"{hosts[name].origin}; keep one line per host")
        hosts[name] = Host(name, slots, path, number, raw.strip())
    if not hosts:
        raise HostfileError(f"{path}: no hosts (the file is empty or all comments); add lines "
                            "'hostname slots=N'")
    return hosts


def read_hostfile(path: str) -> dict[str, Host]:
    """Read and parse the hostfile at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"cannot read hostfile {path}: {e}; pass an existing file with "
                            "-H/--hostfile") from None
    return parse_hostfile(text, path=path)


def parse_filter(spec: str, *, flag: str) -> dict[str, list[int] | None]:
    """Parse ``host[:slot[,slot...]][@host...]``; ``None`` slots means the whole host."""
    wanted: dict[str, list[int] | None] = {}
    for part in spec.split("@"):
        name, sep, slot_text = part.partition(":")
        if not is_valid_hostname(name) or (sep and not slot_text):
            raise HostfileError(f"{flag} {spec!r}: bad entry {part!r}; expected "
                                "host[:slot[,slot...]][@host...], e.g. worker-0:0,1@worker-1")
        slots = _parse_slots(slot_text, spec=spec, flag=flag) if sep else None
        if name in wanted and (wanted[name] is None or slots is None):
            wanted[name] = None  # a bare host anywhere means the whole host
        elif name in wanted:
            wanted[name] = sorted(set(wanted[name]) | set(slots))
        else:
            wanted[name] = slots
    return wanted


def _parse_slots(text: str, *, spec: str, flag: str) -> list[int]:
    parts = text.split(",")
    slots = [int(s) if _SLOT.fullmatch(s) else -1 for s in parts]  # no '+1', ' 1', '1_0'
    if any(s < 0 for s in slots):
        raise HostfileError(f"{flag} {spec!r}: bad slot list {text!r}; slots are "
                            "comma-separated non-negative integers, e.g. worker-0:0,2")
    return sorted(set(slots))


def select(hosts: dict[str, Host], *, include: str | None = None, exclude: str | None = None,
           num_nodes: int | None = None, num_gpus: int | None = None) -> Resources:
    """Apply the launcher's resource flags to ``hosts``; returns the resource map."""
    for flag, spec in (("--include", include), ("--exclude", exclude)):
        if spec is not None and not spec.strip():
            raise HostfileError(f"{flag} is empty: name hosts (host[:slot,...][@host...]) "
                                f"or leave the flag out to use every host")
    if include and exclude:
        raise HostfileError("--include and --exclude are mutually exclusive; use one")
    if (include or exclude) and (num_nodes is not None or num_gpus is not None):
        raise HostfileError("--include/--exclude cannot be combined with --num_nodes/"
                            "--num_gpus; select slots with one or the other")
    resources = {h.name: list(range(h.slots)) for h in hosts.values()}
    if include:
        resources = _apply_include(hosts, resources, wanted=parse_filter(include, flag="--include"),
                                   spec=include)
    if exclude:
        resources = _apply_exclude(hosts, resources, wanted=parse_filter(exclude, flag="--exclude"),
                                   spec=exclude)
    if num_nodes is not None:
        resources = _first_nodes(resources, num_nodes=num_nodes)
    if num_gpus is not None:
        resources = _first_slots(hosts, resources, num_gpus=num_gpus)
    return resources


def _check_known(hosts: dict[str, Host], wanted: dict[str, list[int] | None], *, flag: str,
                 spec: str) -> None:
    for name, slots in wanted.items():
        if name not in hosts:
            path = next(iter(hosts.values())).path
            raise HostfileError(f"{flag} {spec!r}: unknown host {name!r}, not in {path} "
                                f"(hosts: {', '.join(hosts)}); fix the filter or the hostfile")
        bad = [s for s in slots or [] if s >= hosts[name].slots]
        if bad:
            raise HostfileError(
                f"{flag} {spec!r}: {name} has no slot {bad[0]}; {hosts[name].origin} gives "
                f"slots 0-{hosts[name].slots - 1}")


def _apply_include(hosts: dict[str, Host], resources: Resources, *,
                   wanted: dict[str, list[int] | None], spec: str) -> Resources:
    _check_known(hosts, wanted, flag="--include", spec=spec)
    # Rank order stays the hostfile's, whatever order the filter names hosts in.
    return {name: (slots if wanted[name] is None else list(wanted[name]))
            for name, slots in resources.items() if name in wanted}


def _apply_exclude(hosts: dict[str, Host], resources: Resources, *,
                   wanted: dict[str, list[int] | None], spec: str) -> Resources:
    _check_known(hosts, wanted, flag="--exclude", spec=spec)
    kept: Resources = {}
    for name, slots in resources.items():
        if name in wanted:
            slots = [] if wanted[name] is None else [s for s in slots if s not in wanted[name]]
        if slots:
            kept[name] = slots
    if not kept:
        raise HostfileError(f"--exclude {spec!r} removes every slot; exclude less")
    return kept


def _first_nodes(resources: Resources, *, num_nodes: int) -> Resources:
    if num_nodes < 1 or num_nodes > len(resources):
        raise HostfileError(f"--num_nodes {num_nodes}: between 1 and {len(resources)} "
                            f"host(s) are available ({', '.join(resources)})")
    return dict(list(resources.items())[:num_nodes])


def _first_slots(hosts: dict[str, Host], resources: Resources, *, num_gpus: int) -> Resources:
    for name, slots in resources.items():
        if num_gpus < 1 or num_gpus > len(slots):
            raise HostfileError(
                f"--num_gpus {num_gpus}: {hosts[name].origin} has {len(slots)} slot(s); "
                f"ask for between 1 and {len(slots)}")
    return {name: slots[:num_gpus] for name, slots in resources.items()}


def local_hosts(num_slots: int) -> dict[str, Host]:
    """The single-host view used when there is no hostfile: this machine, ``num_slots``."""
    path = f"the local resources (no hostfile; localhost slots={num_slots})"
    return {"localhost": Host("localhost", num_slots, path)}

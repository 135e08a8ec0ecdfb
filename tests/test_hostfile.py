"""Hostfile parsing and DeepSpeed's resource filters (tools/hostfile.py)."""
import pytest

from zerofx.tools import hostfile
from zerofx.tools.hostfile import HostfileError

TWO_HOSTS = "worker-0 slots=4\nworker-1 slots=4\n"


def hosts(text=TWO_HOSTS, path="/job/hostfile"):
    return hostfile.parse_hostfile(text, path=path)


def select(text=TWO_HOSTS, **flags):
    return hostfile.select(hosts(text), **flags)


def test_parse_comments_blank_lines_and_order():
    parsed = hosts("# cluster\n\nworker-1 slots=2  # fast one\n  worker-0   slots=8\n")
    assert [(h.name, h.slots) for h in parsed.values()] == [("worker-1", 2), ("worker-0", 8)]
    assert parsed["worker-0"].origin == "/job/hostfile line 4 ('worker-0   slots=8')"


@pytest.mark.parametrize("line", ["worker-0", "worker-0 slots=", "worker-0 slots=x",
                                  "worker-0 slots=-1", "worker-0 gpus=4",
                                  "worker-0 slots=4 extra", "slots=4"])
def test_malformed_line_names_file_line_and_text(line):
    with pytest.raises(HostfileError) as e:
        hosts(f"# header\n{line}\n", path="/tmp/hf")
    assert f"/tmp/hf line 2 ({line!r})" in str(e.value)
    assert "hostname slots=N" in str(e.value)


def test_duplicate_host_names_both_lines():
    with pytest.raises(HostfileError, match=r"line 3 .*duplicate host 'a'.*line 1"):
        hosts("a slots=1\nb slots=1\na slots=2\n")


@pytest.mark.parametrize("count", ["99999999999999999999", "100000000", "4097"])
def test_slot_counts_are_bounded(count):
    with pytest.raises(HostfileError, match=f"slots={count} is more than the 4096"):
        hosts(f"a slots={count}\n")


@pytest.mark.parametrize("digits", ["\u0661", "\uff14", "\u0967"])  # Arabic-Indic, fullwidth, Devanagari
def test_non_ascii_digits_are_not_counts(digits):
    with pytest.raises(HostfileError, match="hostname slots=N"):
        hosts(f"a slots={digits}\n")
    with pytest.raises(HostfileError, match="bad slot list"):
        hostfile.parse_filter(f"a:{digits}", flag="--include")


@pytest.mark.parametrize("spec", ["a:+1", "a: 1", "a:1_0", "a:0x1"])
def test_slot_lists_are_plain_ascii_integers(spec):
    with pytest.raises(HostfileError, match="bad slot list"):
        hostfile.parse_filter(spec, flag="--include")


def test_zero_slots():
    with pytest.raises(HostfileError, match=r"/job/hostfile line 1 \('a slots=0'\): slots=0"):
        hosts("a slots=0\n")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text):
    with pytest.raises(HostfileError, match=r"/job/hostfile: no hosts"):
        hosts(text)


@pytest.mark.parametrize("name", ["-oProxyCommand=x", "a;rm", "a$(id)", "a b", "a:1", "a@b",
                                  "host-", "'q'"])
def test_invalid_hostnames_rejected(name):
    assert not hostfile.is_valid_hostname(name)


@pytest.mark.parametrize("name", ["worker-1", "node_3", "a.b.example.com", "10.0.0.7", "x"])
def test_valid_hostnames(name):
    assert hostfile.is_valid_hostname(name)


def test_invalid_hostname_in_file_is_an_error():
    with pytest.raises(HostfileError, match=r"line 1 .*not a valid hostname"):
        hosts("-oProxyCommand=evil slots=1\n")


def test_read_hostfile_missing_file(tmp_path):
    with pytest.raises(HostfileError, match=r"cannot read hostfile .*absent.*-H/--hostfile"):
        hostfile.read_hostfile(str(tmp_path / "absent"))


def test_read_hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text(TWO_HOSTS)
    assert list(hostfile.read_hostfile(str(path))) == ["worker-0", "worker-1"]


def test_no_filter_keeps_everything():
    assert select() == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3]}


def test_exclude_slots_deepspeed_example():
    assert select(exclude="worker-0:0,1@worker-1:3") == {"worker-0": [2, 3],
                                                         "worker-1": [0, 1, 2]}


def test_exclude_bare_host_removes_it():
    assert select(exclude="worker-0") == {"worker-1": [0, 1, 2, 3]}


def test_exclude_all_slots_of_a_host_removes_it():
    assert select(exclude="worker-1:0,1,2,3") == {"worker-0": [0, 1, 2, 3]}


def test_exclude_everything_is_an_error():
    with pytest.raises(HostfileError, match="removes every slot"):
        select(exclude="worker-0@worker-1")


def test_include_slots_keeps_only_those():
    assert select(include="worker-1:0,2") == {"worker-1": [0, 2]}


def test_include_bare_host_keeps_all_slots_in_hostfile_order():
    assert select(include="worker-1@worker-0:3") == {"worker-0": [3], "worker-1": [0, 1, 2, 3]}


def test_include_repeated_host_merges():
    assert select(include="worker-0:2@worker-0:0") == {"worker-0": [0, 2]}
    assert select(include="worker-0:2@worker-0") == {"worker-0": [0, 1, 2, 3]}


def test_num_nodes_keeps_first_hosts():
    assert select(num_nodes=1) == {"worker-0": [0, 1, 2, 3]}


def test_num_gpus_keeps_first_slots_of_each_host():
    assert select(num_gpus=2) == {"worker-0": [0, 1], "worker-1": [0, 1]}


def test_num_nodes_and_num_gpus_together():
    assert select(num_nodes=1, num_gpus=3) == {"worker-0": [0, 1, 2]}


@pytest.mark.parametrize("flags, message", [
    ({"num_nodes": 3}, r"--num_nodes 3: between 1 and 2 host\(s\)"),
    ({"num_gpus": 5}, r"--num_gpus 5: /job/hostfile line 1 \('worker-0 slots=4'\) has 4"),
])
def test_too_many_nodes_or_gpus(flags, message):
    with pytest.raises(HostfileError, match=message):
        select(**flags)


@pytest.mark.parametrize("flag", ["include", "exclude"])
def test_unknown_host_in_filter(flag):
    with pytest.raises(HostfileError) as e:
        select(**{flag: "worker-0@worker-9:1"})
    message = str(e.value)
    assert f"--{flag} 'worker-0@worker-9:1': unknown host 'worker-9'" in message
    assert "/job/hostfile" in message and "worker-0, worker-1" in message


@pytest.mark.parametrize("flag", ["include", "exclude"])
def test_unknown_slot_in_filter_names_the_hostfile_line(flag):
    with pytest.raises(HostfileError) as e:
        select(**{flag: "worker-1:1,4"})
    assert "worker-1 has no slot 4" in str(e.value)
    assert "/job/hostfile line 2 ('worker-1 slots=4') gives slots 0-3" in str(e.value)


@pytest.mark.parametrize("spec", ["", "worker-0:", "worker-0:a", "worker-0:1,,2", "@worker-0",
                                  "worker-0:-1", "bad host", "worker-0@"])
def test_malformed_filter(spec):
    with pytest.raises(HostfileError, match=r"--include .*(bad entry|bad slot list)"):
        hostfile.parse_filter(spec, flag="--include")


def test_include_and_exclude_are_exclusive():
    with pytest.raises(HostfileError, match="mutually exclusive"):
        select(include="worker-0", exclude="worker-1")


@pytest.mark.parametrize("flags", [{"include": "worker-0", "num_nodes": 1},
                                   {"exclude": "worker-0", "num_gpus": 1}])
def test_filters_with_counts_are_an_error(flags):
    with pytest.raises(HostfileError, match="cannot be combined"):
        select(**flags)


def test_local_hosts_describe_themselves_in_errors():
    local = hostfile.local_hosts(2)
    assert hostfile.select(local) == {"localhost": [0, 1]}
    with pytest.raises(HostfileError, match=r"no slot 2; the local resources"):
        hostfile.select(local, include="localhost:2")

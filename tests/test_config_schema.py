"""zerofx.config.schema: checkers, key checks, error prefixing, JSON file reading."""
import math
from dataclasses import dataclass

import pytest

from zerofx.config.schema import (
    ConfigError, Invalid, boolean, check_keys, choice, dump, integer, load_json, names, number,
    optional, parse_block, parse_in, required_setting, setting, show, validate,
)


@pytest.mark.parametrize("value,expected", [(3, 3), (5e8, 500_000_000), (0, 0)])
def test_integer_accepts_integral_numbers(value, expected):
    out = integer(0)(value)
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", [True, False, 1.5, -1, "1", None, math.nan, math.inf, 11])
def test_integer_rejects(value):
    with pytest.raises(Invalid, match="integer in"):
        integer(0, 10)(value)


@pytest.mark.parametrize("value", [True, "1", None, math.nan, -math.inf, 10**400, -0.5, 1.0])
def test_number_rejects(value):
    with pytest.raises(Invalid, match=r"a number in \[0, 1\)"):
        number(0, 1, hi_open=True)(value)


def test_number_returns_float_and_honours_open_bounds():
    assert type(number(0)(3)) is float
    assert number(0, lo_open=True)(1e-300) == 1e-300
    with pytest.raises(Invalid, match="> 0"):
        number(0, lo_open=True)(0)


def test_boolean_is_strict():
    assert boolean(True) is True
    for value in (1, 0, "true", None):
        with pytest.raises(Invalid, match="true or false"):
            boolean(value)


def test_choice_folds_case_only_when_asked():
    assert choice("Adam", fold=True)("ADAM") == "Adam"
    with pytest.raises(Invalid, match="one of 'Adam'"):
        choice("Adam")("adam")
    with pytest.raises(Invalid):
        choice("Adam", fold=True)(["adam"])


def test_optional_and_names():
    assert optional(integer(1))(None) is None
    assert names(["a", "b"]) == ("a", "b")
    with pytest.raises(Invalid):
        names(["a", ""])


def test_show_never_fails_and_stays_short():
    deep = []
    for _ in range(10_000):
        deep = [deep]
    assert len(show(deep)) < 100
    assert show(10**5000) == "<int>"  # str() refuses ints this long
    assert len(show("x" * 10_000)) < 100


def test_check_keys_suggests_and_requires():
    with pytest.raises(ConfigError, match=r"'lrr' \(value 1\) is not known; did you mean 'lr'"):
        check_keys({"lrr": 1}, ("lr", "eps"))
    with pytest.raises(ConfigError, match="'eps' is required"):
        check_keys({}, ("lr", "eps"), required=("eps",))
    with pytest.raises(ConfigError, match="because"):
        check_keys({"x": 1}, ("lr",), notes={"x": " because"})


def test_errors_are_prefixed_per_level():
    def inner(raw):
        return parse_in("b", lambda r: integer(0)(r), raw)
    with pytest.raises(ConfigError) as info:
        parse_in("a", inner, -1)
    assert info.value.key == "a.b"
    assert str(info.value) == "config key 'a.b' has value -1; expected an integer >= 0"
    assert str(info.value.in_file("f.json")).startswith("f.json: config key 'a.b'")


@dataclass(frozen=True)
class _Block:
    need: int = required_setting(integer(0))
    ratio: float = setting(0.5, number(0, 1))
    tags: tuple = setting((), names)

    def __post_init__(self):
        validate(self)


def test_parse_block_and_dump_round_trip():
    b = parse_block(_Block, {"need": 2.0, "tags": ["x"]})
    assert b == _Block(need=2, tags=("x",)) and type(b.ratio) is float
    assert dump(b) == {"need": 2, "ratio": 0.5, "tags": ["x"]}
    with pytest.raises(ConfigError, match="'need' is required"):
        parse_block(_Block, {})
    with pytest.raises(ConfigError, match="'ratio' has value 2"):
        _Block(need=1, ratio=2)


def test_load_json_reports_duplicates_with_their_path(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": [{"b": {"c": 1, "c": 2}}]}')
    with pytest.raises(ConfigError, match=r"'a\[0\]\.b\.c' appears twice"):
        load_json(str(path))
    path.write_text('{"a": 1,\n "a": 1}')
    with pytest.raises(ConfigError, match="'a' appears twice"):
        load_json(str(path))


def test_load_json_reads_plain_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"a": [1, 2.5, "x", null, true]}')
    assert load_json(str(path)) == {"a": [1, 2.5, "x", None, True]}

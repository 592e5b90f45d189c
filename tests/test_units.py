"""Durations and sizes as people write them in config files, and back."""

from __future__ import annotations

import pytest

from watcherd.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5),
    ("2s", 2.0),
    ("5m", 300.0),
    ("1h", 3600.0),
    ("1d", 86400.0),
    ("1h30m", 5400.0),
    ("1.5s", 1.5),
    (" 2s ", 2.0),
    ("0s", 0.0),
])
def test_parse_duration_reads_units_and_combinations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["2", "10", "1.5"])
def test_parse_duration_refuses_a_number_without_unit_and_suggests_one(text):
    with pytest.raises(ValueError, match="no unit") as info:
        parse_duration(text)
    assert f'"{text}s"' in str(info.value)


@pytest.mark.parametrize("text", ["-1s", "-5m", " -2s"])
def test_parse_duration_refuses_negative_durations(text):
    with pytest.raises(ValueError, match="negative"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "s", "2x", "2 s", "1h 30m", "2S", "two seconds", "2s!", "1e3s",
                                  "nan", "inf"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("100MiB", 100 * 2**20),
    ("500MiB", 500 * 2**20),
    ("1GiB", 2**30),
    ("1.5GiB", 3 * 2**29),
    ("512KiB", 512 * 1024),
    ("100MB", 100 * 10**6),
    ("4096B", 4096),
    ("100 MiB", 100 * 2**20),
    ("100mib", 100 * 2**20),
    ("1TiB", 2**40),
])
def test_parse_size_reads_binary_and_decimal_units(text, size):
    assert parse_size(text) == size


def test_parse_size_refuses_a_number_without_unit_because_500_probably_meant_megabytes():
    with pytest.raises(ValueError, match="no unit") as info:
        parse_size("500")
    assert '"500MiB"' in str(info.value)


def test_parse_size_refuses_negative_sizes():
    with pytest.raises(ValueError, match="negative"):
        parse_size("-1MiB")


@pytest.mark.parametrize("text", ["", "MiB", "100XB", "100MiBs", "1,5GiB", "100 M iB", "0x10B"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("seconds", [0.5, 0.001, 2, 30, 60, 90, 600, 3600, 5400, 86400, 90061])
def test_format_duration_reads_back_exactly(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(("seconds", "text"), [(2, "2s"), (60, "1m"), (600, "10m"), (3600, "1h"),
                                               (0.25, "250ms"), (90, "90s")])
def test_format_duration_picks_the_shortest_whole_unit(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("n", "text"), [(100 * 2**20, "100MiB"), (3 * 2**29, "1.5GiB"), (512, "512B"),
                                         (2**10, "1KiB")])
def test_format_size_is_short_for_people(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("n", [1, 512, 1024, 1310720, 100 * 2**20, 3 * 2**29, 2**40 + 1, 10**8])
def test_format_size_exact_reads_back_the_same_number(n):
    assert parse_size(format_size(n, exact=True)) == n


def test_format_size_exact_does_not_round_an_odd_limit():
    # 1.25MiB reads as "1.2MiB" for people; the config check must show what is in force.
    assert format_size(1310720) == "1.2MiB"
    assert format_size(1310720, exact=True) == "1280KiB"

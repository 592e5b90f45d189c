"""Durations ("2s", "5m", "1h30m") and sizes ("100MiB") as people write them in config files."""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_duration(text: str) -> float:
    """Seconds in ``text`` ("500ms", "2s", "5m", "1h30m"); ValueError when it is not one."""
    s = text.strip()
    if s.startswith("-"):
        raise ValueError(f"{text!r}: a duration cannot be negative")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        raise ValueError(f"{text!r} has no unit: write e.g. \"{s}s\" or \"{s}m\"")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(f"{text!r} is not a duration (use e.g. \"500ms\", \"2s\", \"5m\", \"1h30m\")")
    return total


def parse_size(text: str) -> int:
    """Bytes in ``text`` ("100MiB", "1GB", "4096B"); ValueError when it is not one.

    The unit is required: a bare ``500`` meant as megabytes would otherwise refuse every bundle.
    """
    s = text.strip()
    if s.startswith("-"):
        raise ValueError(f"{text!r}: a size cannot be negative")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        raise ValueError(f"{text!r} has no unit: write e.g. \"{s}MiB\" (or \"{s}B\" for bytes)")
    m = _SIZE.fullmatch(s)
    if not m:
        raise ValueError(f"{text!r} is not a size (use e.g. \"100MiB\", \"1GiB\", \"500MB\")")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` that :func:`parse_duration` reads back."""
    ms = round(seconds * 1000)
    if ms % 1000:
        return f"{ms}ms"
    s = ms // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def format_size(n: int, *, exact: bool = False) -> str:
    """``n`` bytes for people ("100MiB", "1.5GiB", "512B").

    ``exact`` spells it so that :func:`parse_size` reads back the same number (the config check
    must not show "1.2MiB" for a limit of 1.25MiB): the largest unit that divides it, else bytes.
    """
    units = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    if exact:
        unit, size = next(((u, z) for u, z in units if n and n % z == 0), ("B", 1))
        return f"{n // size}{unit}"
    for unit, size in units:
        if n >= size:
            value = n / size
            return f"{value:g}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"

"""docs/operations.md is where an operator looks up a log line: every warning and error event the
code can log is in its table."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_EVENT = re.compile(r'\.(?:warning|error|exception|critical)\(\s*(f?)"([a-z0-9_.{}]+)"')
# The daemon logs "<op>.failed" for each of its operations.
_OPS = ("snapshot", "upload")


def logged_events() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "watcherd").rglob("*.py"):
        for is_f, name in _EVENT.findall(path.read_text()):
            if is_f and "{op}" in name:
                names.update(name.replace("{op}", op) for op in _OPS)
            else:
                names.add(name)
    return names


def test_every_warning_and_error_event_is_in_the_operations_table():
    doc = (ROOT / "docs" / "operations.md").read_text()
    table = doc[doc.index("## Log events"):]
    names = logged_events()
    assert len(names) > 40  # the scan itself works
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert missing == [], f"add these to docs/operations.md's log events table: {missing}"

"""The numbers an out-of-memory message states: how much was asked for, allocated, reserved, and the total.

CUDA and HIP (PyTorch's caching allocator), Ascend NPU and the CPU allocator each
word them differently; every figure becomes bytes, and a figure the message does
not state stays None.  Standard library only.
"""

from __future__ import annotations

import re

_UNITS = {"B": 1, "BYTES": 1, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_SIZE = r"([\d.]+)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\b"
#: (figure, pattern); the first pattern that matches a figure wins.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("tried", re.compile(r"Tried to allocate " + _SIZE, re.I)),
    ("tried", re.compile(r"you tried to allocate (\d+) (bytes)", re.I)),
    ("total", re.compile(r"total capacity of " + _SIZE, re.I)),
    ("total", re.compile(_SIZE + r" total capacity", re.I)),
    ("allocated", re.compile(_SIZE + r" already allocated", re.I)),
    ("allocated", re.compile(r"Of the allocated memory " + _SIZE + r" is allocated by PyTorch", re.I)),
    ("reserved", re.compile(_SIZE + r" reserved in total by PyTorch", re.I)),
    ("unallocated_reserved", re.compile(_SIZE + r" is reserved by PyTorch but unallocated", re.I)),
    ("free", re.compile(r"of which " + _SIZE + r" is free", re.I)),
    ("free", re.compile(_SIZE + r" free\b", re.I)),
)
FIGURES = ("tried", "allocated", "reserved", "total", "free")


def _bytes(number: str, unit: str) -> int | None:
    try:
        return int(float(number) * _UNITS[unit.upper()])
    except (ValueError, KeyError):
        return None


def oom_figures(text: str) -> dict[str, int | None]:
    """``tried``/``allocated``/``reserved``/``total``/``free`` in bytes from an OOM message (None when
    absent).  The newer PyTorch wording gives "allocated by PyTorch" and "reserved but unallocated"
    instead of a reserved total; their sum is the reserved figure."""
    found: dict[str, int | None] = {}
    for name, pattern in _PATTERNS:
        if found.get(name) is None:
            m = pattern.search(text or "")
            if m:
                found[name] = _bytes(m.group(1), m.group(2))
    spare = found.pop("unallocated_reserved", None)
    if found.get("reserved") is None and spare is not None and found.get("allocated") is not None:
        found["reserved"] = found["allocated"] + spare
    return {name: found.get(name) for name in FIGURES}

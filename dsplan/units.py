"""Parsing and printing byte sizes.

GPU and host sizes are binary: ``80G``, ``80GB`` and ``80GiB`` all mean 80 GiB.
That matches what ``nvidia-smi``/``rocm-smi`` report (MiB) and what a card sold
as "80GB" actually offers to the allocator (81920 MiB on an A100-80GB).
"""

from __future__ import annotations

import re

from dsplan.errors import UserError, excerpt

GiB = 1024**3
MiB = 1024**2

_UNITS = {
    "": GiB,  # a bare number is GiB: "--host-ram 512"
    "K": 1024, "KB": 1024, "KIB": 1024,
    "M": MiB, "MB": MiB, "MIB": MiB,
    "G": GiB, "GB": GiB, "GIB": GiB,
    "T": 1024**4, "TB": 1024**4, "TIB": 1024**4,
}
#: A size is at most this many characters ("1536.25 GiB" is 11).
MAX_SIZE_TEXT = 32
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]{0,3})\s*$", re.ASCII)


def parse_size(text: str, what: str = "size", maximum: int | None = None) -> int:
    """Parse ``64G``/``64GB``/``64GiB``/``512M`` into bytes; raise UserError otherwise,
    also when the size is zero or above ``maximum`` bytes."""
    text = str(text)
    m = _SIZE_RE.match(text) if len(text) <= MAX_SIZE_TEXT else None
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"bad {what} {excerpt(text)}: expected a number with a unit such as 64G, 80GiB or 512M")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise UserError(f"bad {what} {excerpt(text)}: must be greater than zero")
    if maximum is not None and value > maximum:
        raise UserError(f"bad {what} {excerpt(text)}: at most {size_token(maximum)} is supported")
    return int(value)


def size_token(n_bytes: int) -> str:
    """Shortest exact spec token for a size: 80G, 1536M, 512K."""
    for unit, mult in (("T", 1024**4), ("G", GiB), ("M", MiB), ("K", 1024)):
        if n_bytes % mult == 0:
            return f"{n_bytes // mult}{unit}"
    return f"{n_bytes / GiB:.2f}G"

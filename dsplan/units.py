"""Parsing and printing byte sizes.

GPU and host sizes are binary: ``80G``, ``80GB`` and ``80GiB`` all mean 80 GiB.
That matches what ``nvidia-smi``/``rocm-smi`` report (MiB) and what a card sold
as "80GB" actually offers to the allocator (81920 MiB on an A100-80GB).
"""

from __future__ import annotations

import re

from dsplan.errors import UserError

GiB = 1024**3
MiB = 1024**2

_UNITS = {
    "": GiB,  # a bare number is GiB: "--host-ram 512"
    "K": 1024, "KB": 1024, "KIB": 1024,
    "M": MiB, "MB": MiB, "MIB": MiB,
    "G": GiB, "GB": GiB, "GIB": GiB,
    "T": 1024**4, "TB": 1024**4, "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``64G``/``64GB``/``64GiB``/``512M`` into bytes; raise UserError otherwise."""
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"bad {what} {text!r}: expected a number with a unit such as 64G, 80GiB or 512M")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise UserError(f"bad {what} {text!r}: must be greater than zero")
    return int(value)


def size_token(n_bytes: int) -> str:
    """Shortest exact spec token for a size: 80G, 1536M, 512K."""
    for unit, mult in (("T", 1024**4), ("G", GiB), ("M", MiB), ("K", 1024)):
        if n_bytes % mult == 0:
            return f"{n_bytes // mult}{unit}"
    return f"{n_bytes / GiB:.2f}G"

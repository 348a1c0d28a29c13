"""User-facing errors, and how a piece of bad input is quoted in one.

A :class:`UserError` is a mistake in what the user asked for (a bad ``--gpus``
string, an unknown tier, a missing model folder, malformed YAML).  The CLI turns
it into one line on stderr and exit code 2, before anything is written.

Error lines quote the input that was wrong, but only a bounded excerpt of it
(:func:`excerpt`), and :func:`one_line` makes sure that whatever ends up in the
message (a newline, an escape sequence, a byte that is not UTF-8) cannot split the
line or reach the terminal raw.
"""

from __future__ import annotations

#: At most this many characters of a bad value are quoted in an error line.
EXCERPT_CHARS = 80
#: An error line is never longer than this; a longer one keeps its start and end.
MAX_LINE_CHARS = 1000
#: A run of text without spaces longer than this is cut to an excerpt by :func:`one_line`.
MAX_TOKEN_CHARS = 200

#: Characters that end a line for Python's ``str.splitlines``.
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


class UserError(Exception):
    """Bad input from the user; reported as one line, exit code 2."""

    exit_code = 2  # ExitCode.USAGE (dsplan.codes)


def shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` itself if short enough, else its start and end joined by ``...``."""
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return f"{text[:keep]}...{text[len(text) - keep:]}"


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (its start and end, joined by
    ``...``).  Control characters and bytes that are not UTF-8 come out escaped."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (Python refuses over 4,300 digits)
        text = f"<an integer of {value.bit_length()} bits>"
    return shorten(text, limit)


def one_line(message: str) -> str:
    """``message`` as a single printable line of bounded length: line breaks become
    spaces, other unprintable characters are escaped, very long words are cut."""
    chars = []
    for ch in message:
        if ch in _LINE_BREAKS:
            chars.append(" ")
        elif ch.isprintable():
            chars.append(ch)
        else:
            chars.append(repr(ch)[1:-1])
    words = "".join(chars).split(" ")
    text = " ".join(shorten(w, EXCERPT_CHARS) if len(w) > MAX_TOKEN_CHARS else w for w in words)
    return shorten(text, MAX_LINE_CHARS)

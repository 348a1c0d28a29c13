"""Reading the files users hand dsplan (LF YAML, presets, config.json) within fixed bounds.

Every reader here refuses, as one :class:`~dsplan.errors.UserError` line, what
would otherwise hang, exhaust memory or end in a traceback:

- files that are not regular files (a FIFO would block the read forever), larger
  than a limit, or not UTF-8;
- YAML with anchors or aliases (LLaMA-Factory configs never need them, and a 1 KB
  "billion laughs" document expands to gigabytes), nested deeper than
  :data:`MAX_DEPTH`, or with integers of absurd length;
- JSON nested past what the parser can recurse into, or with integers of absurd
  length.

The YAML loader is PyYAML's safe loader with those refusals added to the step that
builds the tree from parse events; the events come from libyaml where PyYAML has it
(its scanner is linear on a long line of brackets, PyYAML's own is not).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from dsplan.errors import UserError, excerpt, shorten

#: The largest YAML document dsplan reads (LF configs and presets are a few KB).
MAX_YAML_BYTES = 1024 * 1024
#: The largest config.json dsplan reads (real ones are under 100 KB).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Deepest nesting of lists and mappings accepted in a YAML document.
MAX_DEPTH = 64
#: Longest integer literal accepted, in characters.
MAX_INT_DIGITS = 100


def path_kind(path: str | Path) -> str | None:
    """"file", "dir" or "other" for what ``path`` names, None when nothing usable is there
    (missing, a name too long for the file system, a NUL byte in it, no permission)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def read_text(path: str | Path, what: str, limit: int) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} is not a regular file")
        if st.st_size > limit:
            raise UserError(f"{what} is {st.st_size} bytes; at most {limit} are read")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UserError(f"cannot read {what}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UserError(f"{what} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start})") from None


class _BoundedComposer(Composer):
    """PyYAML's composer with refusals: anchors, aliases, nesting past MAX_DEPTH."""

    def __init__(self):
        super().__init__()
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise ConstructorError(None, None, "aliases (*name) are not accepted", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise ConstructorError(None, None, "anchors (&name) are not accepted", event.start_mark)
        if isinstance(event, CollectionStartEvent):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise ConstructorError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if isinstance(event, CollectionStartEvent):
                self._depth -= 1


class _BoundedConstructor(SafeConstructor):
    """``SafeConstructor`` that refuses integer literals over MAX_INT_DIGITS characters."""

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_INT_DIGITS:
            raise ConstructorError(None, None, f"an integer of {len(node.value)} characters", node.start_mark)
        return super().construct_yaml_int(node)


_BoundedConstructor.add_constructor("tag:yaml.org,2002:int", _BoundedConstructor.construct_yaml_int)


class BoundedLoader(Reader, Scanner, Parser, _BoundedComposer, _BoundedConstructor, Resolver):
    """``yaml.SafeLoader`` with the refusals of :class:`_BoundedComposer` and :class:`_BoundedConstructor`."""

    def __init__(self, stream):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _BoundedComposer.__init__(self)
        _BoundedConstructor.__init__(self)
        Resolver.__init__(self)


try:
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    CParser = None

if CParser is not None:
    class BoundedCLoader(_BoundedComposer, CParser, _BoundedConstructor, Resolver):
        """The same refusals over libyaml's scanner and parser (PyYAML's own scanner spends
        O(1024) steps per token on a long line of brackets); the tree is still built here."""

        def __init__(self, stream):
            CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            _BoundedConstructor.__init__(self)
            Resolver.__init__(self)

    _LOADER: type = BoundedCLoader
else:  # pragma: no cover
    _LOADER = BoundedLoader


def load_yaml(text: str, where: str):
    """Parse one YAML document with :class:`BoundedLoader`; every problem is one line."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{where}: larger than {MAX_YAML_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 -- safe constructors only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = shorten(getattr(e, "problem", None) or "parse error", 120)
        if isinstance(e, yaml.reader.ReaderError):
            at, problem = f" at character {e.position}", "a character YAML does not allow"
        raise UserError(f"malformed YAML in {where}{at}: {problem}") from None
    except (ValueError, OverflowError, RecursionError) as e:  # a timestamp out of range, and the like
        raise UserError(f"malformed YAML in {where}: {excerpt(str(e))}") from None


def read_yaml(path: str | Path, what: str):
    """Read and parse a YAML file (see :func:`read_text` and :func:`load_yaml`)."""
    return load_yaml(read_text(path, what, MAX_YAML_BYTES), what)


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def read_json(path: str | Path, what: str):
    """Read and parse a JSON file; integers over :data:`MAX_INT_DIGITS` digits are refused.
    ``NaN`` and ``Infinity`` parse (as Python does); whoever reads a field checks it is finite."""
    text = read_text(path, what, MAX_JSON_BYTES)
    try:
        return json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise UserError(f"{what}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError is one
        raise UserError(f"{what}: not readable JSON ({excerpt(str(e), 120)})") from None

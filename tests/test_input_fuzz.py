"""Generated bad input, for every flag, user-YAML key, config.json field, path and preset.

Each case runs the CLI in this process (click's test runner: stdout strict UTF-8 like a
real terminal, stderr with backslash escapes) and checks the contract of a user error:
exit code 2, exactly one line on stderr, nothing on stdout, no traceback and nothing
written.  Cases that are bad by construction must give exactly that; cases drawn from
wider junk ("any") may also be valid, and then must give a clean success whose YAML
reads back the value as given.  A generous per-case alarm turns a hang into a failure.

``scripts/bench_input_fuzz.py`` runs the same cases and times each one.  The subprocess
smoke tests run the worst known inputs as a user would, under a 2 GiB address-space cap.
The last tests check that both YAML loaders (libyaml's events and PyYAML's own) refuse the
same documents, and that the planner's micro-batch search bisects yet finds what a full
scan of the divisors finds.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsplan.cli import cli
from dsplan.inputs import catalog
from dsplan.inputs.hardware import find_gpu_model
from dsplan.inputs.model import CONFIG_LIMITS
from dsplan.plan.tiers import ALIASES, TIER_NAMES
from dsplan.schema.lf import BY_NAME, KEYS
from tests.conftest import QWEN_SMALL, REPO

#: Seconds one in-process case may take before it counts as a hang (the bench reports the real times).
HANG_GUARD_S = 60
#: The cases that are bad by construction (the families below that draw no valid input); the suite
#: fails if fewer ran.  The families that may also draw a valid input come on top.
MIN_TOTAL_CASES = 2000
#: Families whose draws may be valid input (checked then for a clean success); not counted above.
MAY_BE_VALID = frozenset({"free-text-flags", "output-folders", "yaml-kept-values", "yaml-junk-text", "site-presets"})
MODEL = "Qwen2.5-0.5B"
BASE = ("--gpus=8x64G", f"--model={MODEL}")


# ---------------------------------------------------------------- running one case
@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    error: BaseException | None  # an exception that escaped dsplan (a traceback for a user)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def _on_alarm(signum, frame):
    raise TimeoutError(f"a case ran past the {HANG_GUARD_S} s hang guard")


def invoke(args: list[str], env: dict | None = None) -> Outcome:
    """Run ``dsplan ARGS`` in this process; the exit code, both streams and any escaped exception."""
    base_env = {"XDG_CONFIG_HOME": "/nonexistent-dsplan-fuzz", "DSPLAN_PRESETS": ""}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_GUARD_S)
    try:
        r = _runner().invoke(cli, args, prog_name="dsplan", env={**base_env, **(env or {})})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    escaped = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    return Outcome(r.exit_code, r.stdout, r.stderr, escaped)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def check_user_error(o: Outcome, before: set[str], work: Path) -> None:
    """The contract of a user error."""
    assert o.error is None, f"escaped {type(o.error).__name__}: {o.error}"
    assert o.code == 2, (o.code, o.stdout[-500:], o.stderr[-500:])
    lines = o.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsplan"), o.stderr[:2000]
    assert len(lines[0]) <= 1100, len(lines[0])
    assert "Traceback" not in o.stderr and o.stdout == ""
    assert _files(work) == before, sorted(_files(work) - before)


def check_outcome(o: Outcome, before: set[str], work: Path, bad: bool) -> None:
    """A bad input must be a user error; any other input a user error or a clean success."""
    if bad or o.code == 2 or o.error is not None:
        check_user_error(o, before, work)
        return
    assert o.code in (0, 4), (o.code, o.stderr[-500:])  # 4: nothing fits (plan)
    assert "Traceback" not in o.stderr
    o.stdout.encode("utf-8")  # what a UTF-8 terminal can print


def run_case(args: list[str], work: Path, bad: bool, env: dict | None = None) -> Outcome:
    before = _files(work)
    o = invoke(args, env)
    check_outcome(o, before, work, bad)
    return o


def render_yaml(out: Path) -> dict:
    """The zero2 LF YAML of a successful render (every render below asks for zero2)."""
    return yaml.safe_load((out / "lf_zero2.yaml").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- value strategies
_SPECIAL = ["\x00", "\n", "\r", "\t", "\x0b", "\x1b", "\x85", "\u2028", "\u2029", "\ufeff", "\u202e"]
_NON_UTF8 = [chr(c) for c in range(0xDC80, 0xDD00)]  # how Python spells bytes that are not UTF-8 in argv
junk_char = st.characters() | st.sampled_from(_SPECIAL + _NON_UTF8)
junk_text = st.text(junk_char, max_size=120) | st.text(junk_char, min_size=200, max_size=6000)
#: What argv can hold: bytes decoded the way Python decodes them (no NUL; any surrogate other
#: than U+DC80..U+DCFF becomes the bytes it stands for).
arg_text = junk_text.map(lambda s: os.fsdecode(s.replace("\x00", "").encode("utf-8", "surrogatepass")))
_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_DECIMAL_RE = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)


def bad_int_text(lo: int, hi: int) -> st.SearchStrategy[str]:
    """Text that is not a whole number in [lo, hi]."""
    return st.one_of(
        st.integers(max_value=lo - 1).map(str),
        st.integers(min_value=hi + 1).map(str),
        st.integers(min_value=len(str(hi)) + 1, max_value=6000).map(lambda n: "9" * n),
        st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity", "1e19", "1.5", "0x10", "1_000", "", " ",
                         "\u0663", "\uff11", "+", "-", "1e400"]),
        st.floats().map(repr),
        arg_text.filter(lambda s: not _INT_RE.fullmatch(s)),
    )


def bad_float_text(lo: float, hi: float, hi_open: bool) -> st.SearchStrategy[str]:
    """Text that is not a finite number in [lo, hi] (or [lo, hi))."""
    above = st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False)
    return st.one_of(
        st.floats(max_value=lo, exclude_max=True, allow_nan=False).map(repr),
        above.map(repr),
        st.sampled_from(["nan", "inf", "-inf", "NaN", "-nan", "Infinity", "1e400", "", "0x1p-2", "1_0", "\u0663"]),
        st.integers(33, 6000).map(lambda n: "9" * n),
        arg_text.filter(lambda s: not _DECIMAL_RE.fullmatch(s)),
    )


#: Numeric flags: (command prefix, flag, bad-value strategy).
_RENDER = ("render", *BASE, "--tier=zero2")
_PLAN = ("plan", *BASE)
_RUN = ("run", "--dry-run", *BASE)
NUMBER_FLAGS = [
    *[(cmd, k.flag, bad_int_text(k.minimum, k.maximum)) for k in KEYS if k.flag and k.type is int
      for cmd in (_RENDER, _PLAN, _RUN)],
    (_PLAN, "--headroom", bad_float_text(0, 0.5, hi_open=True)),
    (_RUN, "--headroom", bad_float_text(0, 0.5, hi_open=True)),
    (_PLAN, "--allow-cutoff", bad_int_text(16, 10_000_000)),
    (_RUN, "--max-attempts", bad_int_text(1, 1000)),
    (_RUN, "--stall-timeout", bad_float_text(1, 10_000_000, hi_open=False)),
    (_RUN, "--nnodes", bad_int_text(1, 1024)),
    (_RUN, "--node-rank", bad_int_text(0, 1023)),
    (_RUN, "--master-port", bad_int_text(1, 65535)),
    (("validate", str(REPO)), "--world-size", bad_int_text(1, 1024 * 64)),
    (("diagnose", str(REPO / "README.md")), "--exit-code", bad_int_text(-255, 255)),
]


def _bad_gpus() -> st.SearchStrategy[str]:
    counts = st.integers(1, 64)
    mem = st.sampled_from(["80G", "24GB", "64GiB", "1536M"])
    return st.one_of(
        st.builds("{}x{}".format, st.integers(max_value=0) | st.integers(min_value=65), mem),
        st.builds("{}x{}x{}".format, st.integers(max_value=0) | st.integers(min_value=1025), counts, mem),
        st.builds("{}x{}G".format, counts, st.integers(min_value=2049) | st.integers(max_value=0)),
        st.builds("{}x{}T".format, counts, st.integers(min_value=3)),
        st.builds("{}x{}M".format, counts, st.integers(min_value=1, max_value=1023)),
        st.builds("{}x{}".format, counts, st.integers(min_value=1)),  # no unit
        st.sampled_from(["1x9999999999999999999999999999", "1x9999999999999999999999999999G",
                         "100000000x80G", "8x1e400G", "8xnanG", "8xinfG"]),
        st.integers(60, 6000).map(lambda n: f"1x{'9' * n}G"),
        arg_text.filter(lambda s: not re.search(r"[xX*]", s)),
    )


def _not_a(known: Callable[[str], bool]) -> st.SearchStrategy[str]:
    return arg_text.filter(lambda s: not known(s))


_TIER_WORDS = set(TIER_NAMES) | set(ALIASES) | {"all"}
_BUILT_IN_PRESETS = {p.stem for p in (REPO / "presets").glob("*.yaml")}
STRING_FLAGS = [
    (("render", "--model=" + MODEL, "--tier=zero2"), "--gpus", _bad_gpus()),
    (("plan", "--model=" + MODEL), "--gpus", _bad_gpus()),
    (("run", "--dry-run", "--model=" + MODEL), "--gpus", _bad_gpus()),
    (_PLAN, "--host-ram", arg_text.filter(lambda s: s != "" and not re.search(r"[0-9]", s))
     | st.sampled_from(["0G", "65T", "99999999999T", "1e9G", "nanG", "-5G"])),
    (_PLAN, "--gpu-name", _not_a(lambda s: s == "" or find_gpu_model(s) is not None)),
    (_PLAN, "--backend", _not_a(lambda s: s.lower() in ("cuda", "rocm", "dcu"))),
    (_PLAN, "--method", _not_a(lambda s: s in ("lora", "qlora", "full", "freeze"))),
    (_PLAN, "--tier", _not_a(lambda s: s == "" or s.strip().lower().replace("-", "_") in _TIER_WORDS)),
    (("render", "--gpus=8x64G", "--tier=zero2"), "--model", _not_a(lambda s: catalog.lookup(s) is not None)),
    (_PLAN, "--preset", _not_a(lambda s: s == "" or s in _BUILT_IN_PRESETS)),
    (_RUN, "--master-addr", arg_text.filter(lambda s: not re.fullmatch(r"[A-Za-z0-9.:_\[\]%-]{1,255}", s))),
]


# ---------------------------------------------------------------- YAML strategies
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), junk_text)
nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _accepted(key, v) -> bool:
    """What the schema row of ``key`` says LLaMA-Factory accepts (None: not set)."""
    if v is None:
        return True
    if key.choices is not None:
        parts = [p.strip() for p in v.split(",")] if key.comma_list and isinstance(v, str) else [v]
        return all(p in key.choices for p in parts)
    if key.type is bool:
        return isinstance(v, bool)
    if isinstance(v, bool) or not isinstance(v, key.type):
        return False
    if isinstance(v, float) and v != v or v in (float("inf"), -float("inf")):
        return False
    return (key.minimum is None or v >= key.minimum) and (key.maximum is None or v <= key.maximum)


def _bad_for_key(key) -> st.SearchStrategy:
    """Values the schema row of ``key`` refuses: wrong types, out of range, not finite."""
    edges = [float("nan"), float("inf"), -float("inf")]
    if key.minimum is not None:
        edges.append(key.minimum - 1)
    if key.maximum is not None:
        edges += [key.maximum + 1, 10**30]
    return st.one_of(nested, st.sampled_from(edges), st.integers()).filter(lambda v: not _accepted(key, v))


_CHECKED_KEYS = [k for k in KEYS if k.type is not None or k.choices is not None]
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)
bad_keys = st.text(junk_char, min_size=1, max_size=40).filter(lambda k: not _KEY_RE.fullmatch(k)) \
    | st.integers(min_value=129, max_value=5000).map(lambda n: "k" * n)


def _deep(depth: int, flow: bool) -> str:
    if flow:
        return "x: " + "[" * depth + "]" * depth + "\n"
    return "".join("  " * i + "- \n" if i < depth - 1 else "  " * i + "- 1\n" for i in range(depth))


def _bomb(width: int, levels: int) -> str:
    lines = [f'a0: &a0 [{", ".join(["lol"] * width)}]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


bad_yaml_docs = st.one_of(
    st.builds(_deep, st.integers(65, 5000), st.booleans()),
    st.builds(_bomb, st.integers(2, 12), st.integers(2, 12)),
    st.sampled_from(["a: &x 1\nb: *x\n", "base: &b {k: 1}\nother:\n  <<: *b\n", "x: !!python/object:os.system 1\n",
                     "x: 9999-99-99\n", "- a\n- b\n", "42\n", '"just a string"\n', "a: 1\na: [\n"]),
    st.integers(101, 6000).map(lambda n: f"cutoff_len: {'9' * n}\n"),
    st.integers(101, 6000).map(lambda n: f"custom: {'1' * n}\n"),
    st.just("custom: '" + "x" * (1024 * 1024) + "'\n"),
)
bad_yaml_bytes = st.binary(min_size=1, max_size=200).filter(lambda b: not _utf8(b)) \
    | st.just(b"dataset: caf\xe9\n")


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------- config.json strategies
_OPTIONAL = {"num_key_value_heads", "head_dim", "num_local_experts", "num_experts", "moe_intermediate_size"}


def _bad_config_value(field: str) -> st.SearchStrategy:
    """Values config.json must not hold in ``field``: not a whole number, below 1, above the limit.
    For the optional fields null and 0 mean "absent" and are fine."""
    limit = CONFIG_LIMITS[field]
    junk = nested.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))))
    numbers = st.one_of(st.integers(max_value=-1), st.integers(min_value=limit + 1),
                        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()))
    if field not in _OPTIONAL:
        numbers = numbers | st.sampled_from([0, None, 0.0])
    raw = st.sampled_from(["NaN", "Infinity", "-Infinity"]) | st.integers(101, 6000).map(lambda n: "1" * n)
    return st.one_of(numbers, junk, raw.map(_Raw))


@dataclass(frozen=True)
class _Raw:
    """A JSON token written as-is (NaN, Infinity, a 5,000-digit integer)."""

    text: str


def _config_text(cfg: dict) -> str:
    """JSON text of ``cfg``, with :class:`_Raw` values written as their raw tokens."""
    plain = {k: v for k, v in cfg.items() if not isinstance(v, _Raw)}
    text = json.dumps(plain)[:-1]
    for k, v in cfg.items():
        if isinstance(v, _Raw):
            text += f", {json.dumps(k)}: {v.text}"
    return text + "}"


bad_config_docs = st.one_of(
    st.integers(1000, 200_000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(["", "{", "[]", "null", "42", '"text"', "{not json", "\ufeff{}"]),
    st.binary(min_size=1, max_size=100).filter(lambda b: not _utf8(b)),
)


# ---------------------------------------------------------------- the cases
@dataclass
class Case:
    """One family of generated inputs: a strategy, what to do with each draw, how many draws."""

    name: str
    strategy: st.SearchStrategy
    check: Callable[[object, Path], None]
    examples: int


CASES: list[Case] = []


def case(name: str, strategy: st.SearchStrategy, examples: int):
    def register(fn):
        CASES.append(Case(name, strategy, fn, examples))
        return fn
    return register


@case("number-flags", st.sampled_from(NUMBER_FLAGS).flatmap(
    lambda f: st.tuples(st.just(f[0]), st.just(f[1]), f[2])), 600)
def number_flag(draw, work: Path):
    prefix, flag, value = draw
    args = [*prefix, f"{flag}={value}"]
    if prefix[0] == "render":
        args.append(f"--out={work / 'out'}")
    run_case(args, work, bad=True)


@case("string-flags", st.sampled_from(STRING_FLAGS).flatmap(
    lambda f: st.tuples(st.just(f[0]), st.just(f[1]), f[2])), 350)
def string_flag(draw, work: Path):
    prefix, flag, value = draw
    args = [*prefix, f"{flag}={value}"]
    if prefix[0] == "render":
        args.append(f"--out={work / 'out'}")
    run_case(args, work, bad=True)


@case("free-text-flags", st.tuples(st.sampled_from(["--dataset", "--template", "--dataset-dir", "--output-dir"]),
                                   arg_text), 150)
def free_text_flag(draw, work: Path):
    flag, value = draw
    out = work / "out"
    o = run_case([*_RENDER, f"{flag}={value}", f"--out={out}"], work, bad=False)
    if o.code == 0:
        key = {"--dataset": "dataset", "--template": "template", "--dataset-dir": "dataset_dir",
               "--output-dir": "output_dir"}[flag]
        if value:  # an empty flag means "not given"
            assert render_yaml(out)[key] == value


@case("output-folders", arg_text.map(lambda s: s.replace("/", "_")).filter(lambda s: s not in ("", ".", "..")), 150)
def output_folder(value, work: Path):
    # One folder inside the work folder; names with control characters or non-UTF-8 bytes are refused.
    bad = any(not ch.isprintable() and ch != " " for ch in value) or len(value.encode("utf-8", "surrogateescape")) > 255
    cwd = os.getcwd()
    os.chdir(work)
    try:
        o = run_case([*_RENDER, f"--out={value}"], work, bad=bad)
    finally:
        os.chdir(cwd)
    if o.code == 0:
        assert render_yaml(work / value)["deepspeed"] == str((work / value).resolve() / "ds_zero2.json")


@case("yaml-known-keys", st.sampled_from(_CHECKED_KEYS).flatmap(lambda k: st.tuples(st.just(k.name),
                                                                                      _bad_for_key(k))), 300)
def yaml_known_key(draw, work: Path):
    key, value = draw
    user = work / "u.yaml"
    user.write_text(yaml.safe_dump({key: value}, allow_unicode=True), encoding="utf-8")
    run_case(["render", str(user), *BASE, "--tier=zero2", f"--out={work / 'out'}"], work, bad=True)


@case("yaml-bad-keys", st.tuples(bad_keys, scalars), 100)
def yaml_bad_key(draw, work: Path):
    key, value = draw
    user = work / "u.yaml"
    user.write_text(yaml.safe_dump({key: value}, allow_unicode=True, width=float("inf")), encoding="utf-8")
    run_case(["render", str(user), *BASE, "--tier=zero2", f"--out={work / 'out'}"], work, bad=True)


@case("yaml-kept-values", st.tuples(st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)
                                    .filter(lambda k: k not in BY_NAME), nested), 200)
def yaml_kept_value(draw, work: Path):
    key, value = draw
    user = work / "u.yaml"
    user.write_text(yaml.safe_dump({key: value}, allow_unicode=True), encoding="utf-8")
    out = work / "out"
    o = run_case(["render", str(user), *BASE, "--tier=zero2", f"--out={out}"], work, bad=False)
    if o.code == 0:  # the rendered YAML holds what the user's YAML held
        assert _same(render_yaml(out)[key], yaml.safe_load(user.read_text(encoding="utf-8"))[key])


def _same(a, b) -> bool:
    """Equal, NaN included."""
    return json.dumps(a, default=repr) == json.dumps(b, default=repr)


@case("yaml-documents", bad_yaml_docs, 120)
def yaml_document(text, work: Path):
    user = work / "u.yaml"
    user.write_text(text, encoding="utf-8")
    run_case(["render", str(user), *BASE, "--tier=zero2", f"--out={work / 'out'}"], work, bad=True)


@case("yaml-bytes", bad_yaml_bytes, 50)
def yaml_bytes(blob, work: Path):
    user = work / "u.yaml"
    user.write_bytes(blob)
    run_case(["render", str(user), *BASE, "--tier=zero2", f"--out={work / 'out'}"], work, bad=True)


@case("yaml-junk-text", st.text(junk_char, max_size=300), 100)
def yaml_junk(text, work: Path):
    user = work / "u.yaml"
    user.write_text(text, encoding="utf-8", errors="surrogatepass")
    run_case(["render", str(user), *BASE, "--tier=zero2", f"--out={work / 'out'}"], work, bad=False)


@case("config-fields", st.sampled_from(sorted(CONFIG_LIMITS)).flatmap(
    lambda f: st.tuples(st.just(f), _bad_config_value(f))), 380)
def config_field(draw, work: Path):
    field, value = draw
    folder = work / "model"
    folder.mkdir()
    cfg = {**QWEN_SMALL, field: value}
    if value is None:
        del cfg[field]
    (folder / "config.json").write_text(_config_text(cfg), encoding="utf-8")
    run_case(["render", "--gpus=8x64G", f"--model={folder}", "--tier=zero2", f"--out={work / 'out'}"], work,
             bad=True)


@case("config-documents", bad_config_docs, 40)
def config_document(doc, work: Path):
    folder = work / "model"
    folder.mkdir()
    path = folder / "config.json"
    path.write_bytes(doc) if isinstance(doc, bytes) else path.write_text(doc, encoding="utf-8")
    run_case(["render", "--gpus=8x64G", f"--model={folder}", "--tier=zero2", f"--out={work / 'out'}"], work,
             bad=True)


_name_part = st.text(junk_char, max_size=30).map(
    lambda s: os.fsdecode(s.replace("/", "_").replace("\x00", "_").encode("utf-8", "surrogatepass")))


@case("model-folder-names", st.builds(lambda a, c, b: a + c + b, _name_part,
                                      st.sampled_from([c for c in _SPECIAL + _NON_UTF8 if c != "\x00"]), _name_part),
      100)
def model_folder_name(name, work: Path):
    folder = work / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN_SMALL), encoding="utf-8")
    run_case(["render", "--gpus=8x64G", f"--model={folder}", "--tier=zero2", f"--out={work / 'out'}"], work,
             bad=True)


@case("long-model-paths", st.integers(256, 5000).map(lambda n: "m" * n), 20)
def long_model_path(name, work: Path):
    run_case(["render", "--gpus=8x64G", f"--model={work / name}", "--tier=zero2", f"--out={work / 'out'}"], work,
             bad=True)


_PRESET_DOCS = st.one_of(
    bad_yaml_docs.filter(lambda d: len(d) < 100_000),
    bad_yaml_bytes,
    st.builds(lambda v: yaml.safe_dump({"hardware": {"gpus": "8x80G"}, "training": {"micro_batch": v}}),
              st.integers(max_value=0) | st.integers(min_value=1_000_001) | st.text(max_size=5)),
    st.builds(lambda v: yaml.safe_dump({"hardware": {"gpus": v}}), junk_text),
    st.builds(lambda v: yaml.safe_dump({"hardware": {"gpus": "8x80G"}, "description": v}), junk_text),
)


@case("site-presets", _PRESET_DOCS, 150)
def site_preset(doc, work: Path):
    folder = work / "presets"
    folder.mkdir()
    path = folder / "site.yaml"
    path.write_bytes(doc) if isinstance(doc, bytes) else path.write_text(doc, encoding="utf-8")
    env = {"DSPLAN_PRESETS": str(folder)}
    before = _files(work)
    listed = invoke(["presets", "list"], env)
    assert listed.error is None and listed.code == 0, (listed.code, listed.error, listed.stderr[-300:])
    assert "single-16g" in listed.stdout and len(listed.stderr.splitlines()) <= 1
    listed.stdout.encode("utf-8")
    assert _files(work) == before
    run_case(["render", "--preset=site", f"--model={MODEL}", "--tier=zero2", f"--out={work / 'out'}"], work,
             bad=False, env=env)


# ---------------------------------------------------------------- the tests
_RAN: dict[str, int] = {}
_SETTINGS = dict(deadline=None, database=None, derandomize=False,
                 suppress_health_check=list(HealthCheck))


def run_family(c: Case, on_example: Callable[[float, object], None] | None = None) -> int:
    """Run one family's examples (each in a fresh folder); returns how many ran.  ``on_example``
    gets each example's seconds (the check and the dsplan call in it) and its input."""
    count = 0

    @settings(max_examples=c.examples, **_SETTINGS)
    @given(c.strategy)
    def one(draw):
        nonlocal count
        count += 1
        with tempfile.TemporaryDirectory(prefix="dsplan-fuzz-") as tmp:
            start = time.perf_counter()
            c.check(draw, Path(tmp))
            if on_example is not None:
                on_example(time.perf_counter() - start, draw)

    one()
    return count


@pytest.mark.parametrize("family", CASES, ids=[c.name for c in CASES])
def test_generated_inputs(family: Case):
    _RAN[family.name] = run_family(family)


def test_case_count_covers_the_contract():
    """At least MIN_TOTAL_CASES bad-by-construction inputs, when the whole family list is asked for."""
    bad = [c.name for c in CASES if c.name not in MAY_BE_VALID]
    assert MAY_BE_VALID <= {c.name for c in CASES}
    assert sum(c.examples for c in CASES if c.name in bad) >= MIN_TOTAL_CASES
    if set(_RAN) == {c.name for c in CASES}:
        assert sum(_RAN[name] for name in bad) >= MIN_TOTAL_CASES, _RAN


# ---------------------------------------------------------------- the worst cases, as a user runs them
def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


WORST = [
    ("render", "--gpus", "1x9999999999999999999999999999", "--model", MODEL),
    ("render", "--gpus", "1x9999999999999999999999999999G", "--model", MODEL),
    ("plan", "--gpus", "8x64G", "--model", MODEL, "--headroom", "nan"),
    ("plan", "--gpus", "8x64G", "--model", MODEL, "--cutoff-len", "99999999999999999999"),
    ("plan", "--gpus", "8x64G", "--model", MODEL, "--lora-rank", "1e19"),
    ("plan", "--gpus", "8x64G", "--model", MODEL, "--micro-batch", "1000000000"),
    ("run", "--dry-run", "--gpus", "100000000x80G", "--model", MODEL),
    ("run", "--dry-run", "--gpus", "10000000x80G", "--model", MODEL),
]


@pytest.mark.parametrize("args", WORST, ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_worst_flags_in_a_subprocess(tmp_path, args):
    _smoke(tmp_path, [*args, *(["-o", str(tmp_path / "out")] if args[0] == "render" else [])])


def worst_file_cases(work: Path) -> list[list[str]]:
    """Command lines for the worst hostile files, written into ``work``: a YAML alias bomb, YAML
    nested 3,000 deep, config.json with a 5,000-digit integer, Infinity or 100,000 brackets, a
    300-character model path."""
    (work / "bomb.yaml").write_text(_bomb(9, 10))
    (work / "deep.yaml").write_text(_deep(3000, True))
    cases = [["render", str(work / f"{name}.yaml"), "--gpus", "8x64G", "--model", MODEL] for name in ("bomb", "deep")]
    for i, text in enumerate(('{"hidden_size": ' + "9" * 5000 + "}", '{"hidden_size": Infinity}', "[" * 100_000)):
        (work / f"m{i}").mkdir()
        (work / f"m{i}" / "config.json").write_text(text)
        cases.append(["render", "--gpus", "8x64G", "--model", str(work / f"m{i}")])
    cases.append(["render", "--gpus", "8x64G", "--model", str(work / ("x" * 300))])
    return [[*c, "-o", str(work / "out")] for c in cases]


def test_worst_files_in_a_subprocess(tmp_path):
    for args in worst_file_cases(tmp_path):
        _smoke(tmp_path, args)


def _smoke(tmp_path: Path, args: list[str]) -> None:
    before = _files(tmp_path)
    r = subprocess.run([sys.executable, "-m", "dsplan", *args], capture_output=True, text=True, timeout=120,
                       preexec_fn=_limit_memory, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg")))
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert len(lines[0]) <= 1100 and len(r.stdout) == 0
    assert _files(tmp_path) == before


def test_non_utf8_site_preset_is_skipped_with_one_warning(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "broken.yaml").write_bytes(b"name: broken\ndescription: caf\xe9\nhardware: {gpus: 8x80G}\n")
    (folder / "good.yaml").write_text(yaml.safe_dump({"hardware": {"gpus": "2x24G"}}))
    env = dict(os.environ, DSPLAN_PRESETS=str(folder), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    r = subprocess.run([sys.executable, "-m", "dsplan", "presets", "list"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "good" in r.stdout and "single-16g" in r.stdout
    assert len(r.stderr.splitlines()) == 1 and "broken.yaml" in r.stderr and "UTF-8" in r.stderr
    r = subprocess.run([sys.executable, "-m", "dsplan", "plan", "--preset", "good", "--model", MODEL],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- both YAML loaders refuse the same
@pytest.mark.parametrize("loader", ["BoundedLoader", "BoundedCLoader"])
@pytest.mark.parametrize("text,needle", [
    ("a: &x 1\nb: *x\n", "anchors"),
    ("b: *x\n", "alias"),
    ("x: " + "[" * 70 + "]" * 70 + "\n", "nest"),
    ("x: " + "[" * 100_000 + "]" * 100_000 + "\n", "nest"),
    ("x: " + "9" * 200 + "\n", "an integer of 200 characters"),
    ("x: !!python/object:os.system 1\n", "constructor"),
])
def test_bounded_yaml_loaders(monkeypatch, loader, text, needle):
    from dsplan.errors import UserError
    from dsplan.inputs import reading

    if not hasattr(reading, loader):
        pytest.skip("PyYAML without libyaml")
    monkeypatch.setattr(reading, "_LOADER", getattr(reading, loader))
    with pytest.raises(UserError, match=needle):
        reading.load_yaml(text, "doc")
    assert reading.load_yaml("a: [1, {b: x}]\nc: 1.5\n", "doc") == {"a": [1, {"b": "x"}], "c": 1.5}


# ---------------------------------------------------------------- the micro-batch search is a bisection
@pytest.mark.parametrize("model,gpus,requested",
                         [("Qwen2.5-0.5B", "8x80G", n) for n in (720720, 1_000_000, 999_983, 4096)]
                         + [("Qwen2.5-7B", "8x24G", 720720)])
def test_micro_batch_search_bisects_and_matches_a_full_scan(monkeypatch, model, gpus, requested):
    from dsplan.inputs.hardware import make_profile
    from dsplan.inputs.model import load_model_spec
    from dsplan.inputs.settings import merge_settings
    from dsplan.plan import planner
    from dsplan.plan.fallback import divisors_desc
    from dsplan.plan.tiers import TIERS

    spec, profile = load_model_spec(model), make_profile(gpus, host_ram="1024G")
    settings = merge_settings({}, model_name_or_path="m", default_template="qwen", precision_supported="bf16",
                              flags={"micro_batch": requested, "cutoff_len": 1024})
    w = planner.workload_from(settings)
    calls = []
    real = planner._evaluate
    monkeypatch.setattr(planner, "_evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    for tier in TIERS:
        calls.clear()
        got = planner._plan_tier(spec, profile, tier, w, settings, 0.05, requested)
        n = len(divisors_desc(requested))
        assert len(calls) <= 2 * (2 + n.bit_length())  # two variants at ZeRO-3, per probe
        scan = next((fit for mb in divisors_desc(requested)
                     for _, fit, _ in [planner._at(spec, profile, tier, w, settings, 0.05, requested, mb)] if fit),
                    None)
        assert (got.micro_batch, got.fits) == ((scan.micro_batch, True) if scan else (requested, False))

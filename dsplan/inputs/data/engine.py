"""The entry: pick the engine that measures a spec (LF, tokenizer, chars), run it, cache first.

One job: run the flow for each spec (resolve the sources, then LF's pipeline where
asked and available, else the tokenizer estimate, else the characters estimate, each
answered from the cache when it can be) and give back a
:class:`~dsplan.inputs.data.result.DataProfile`; or the raw rows of chosen samples.
Data LF will surely refuse (:class:`~dsplan.inputs.data.spec.Refused`, raised by any stage)
becomes a profile with :attr:`~dsplan.inputs.data.result.DataProfile.refused` set.
(Not named measure.py: the package re-exports :func:`measure`, and a submodule of that
name would be hidden behind the function in ``import dsplan.inputs.data.measure``.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dsplan.errors import UserError, shorten
from dsplan.inputs.data.cache import (CACHE_VERSION, cache_read, cache_write, counter_fingerprint,
                                      default_cache_dir, files_key, key_digest)
from dsplan.inputs.data.lengths import (CHARS_PER_TOKEN, find_tokenizer, load_counter, sample_length,
                                        tokenize_sources)
from dsplan.inputs.data.lf import lf_available, lf_key, measure_lf, run_lf
from dsplan.inputs.data.result import METHODS, DataProfile, SampleRef
from dsplan.inputs.data.sources import Source, read_source, resolve, unreadable_here
from dsplan.inputs.data.spec import DataSpec, Refused
from dsplan.inputs.data.templates import pick_template

#: Ways to measure; "auto" takes the best one available.
ENGINES = ("auto", "lf", "tokenizer", "chars")


# ---------------------------------------------------------------- the public entry
def measure(spec: DataSpec, *, python: str | None = None, engine: str = "auto",
            cache_dir: str | Path | None = None, use_cache: bool = True, timeout: float = 1800) -> DataProfile:
    """Token lengths of ``spec``'s data.  ``engine``: "auto" runs LF's own pipeline when
    ``python`` names an interpreter that has llamafactory, else the tokenizer estimate, else
    the characters estimate; "lf"/"tokenizer"/"chars" ask for one (falling back, with a
    note, when it cannot run).  ``python=None`` with "auto" never starts LF: the login-node path."""
    return measure_many([spec], python=python, engine=engine, cache_dir=cache_dir, use_cache=use_cache,
                        timeout=timeout)[0]


def measure_many(specs: list[DataSpec], *, python: str | None = None, engine: str = "auto",
                 cache_dir: str | Path | None = None, use_cache: bool = True,
                 timeout: float = 1800) -> list[DataProfile]:
    """:func:`measure` for several specs (cutoffs, templates, datasets); LF's pipeline, when it
    runs, runs once for all of them in one worker process."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    t0 = time.monotonic()
    cache = None if not use_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    resolved = [_resolve(spec) for spec in specs]
    todo = [(s, r[0]) for s, r in zip(specs, resolved) if r[0] is not None]
    lf_python = python or (sys.executable if engine == "lf" else None)
    hits = {}  # LF's lengths already in the cache, by key digest
    for spec, sources in todo if lf_python and engine in ("auto", "lf") else []:
        key = lf_key(spec, sources, lf_python)
        data = cache_read(cache, key)
        if data is not None:
            hits[key_digest(key)] = data
    # "auto" asks the interpreter whether it has LF only when the cache cannot answer
    use_lf = engine == "lf" or bool(engine == "auto" and lf_python and (len(hits) == len(todo)
                                                                         or lf_available(lf_python)))
    fresh = run_lf(lf_python, todo, hits, cache, timeout) if use_lf else {}
    out = []
    for spec, (sources, notes, refused) in zip(specs, resolved):
        if sources is not None:
            try:
                profile = measure_lf(spec, sources, lf_python, fresh, hits, notes, t0) if use_lf else None
                out.append(profile or _measure_estimate(spec, sources, engine, cache, notes, t0))
                continue
            except Refused as e:  # found reading the rows (LF's worker, if it ran, failed on them too)
                refused = str(e)
        out.append(_at_cutoff(spec, notes, t0, refused))
    return out


def _resolve(spec: DataSpec) -> tuple[list[Source] | None, list[str], str | None]:
    """:func:`~dsplan.inputs.data.sources.resolve`, with LF's sure refusal as a third item."""
    try:
        sources, notes = resolve(spec)
    except Refused as e:
        return None, [], str(e)
    return sources, notes, None


def _at_cutoff(spec: DataSpec, notes: list[str], t0: float, refused: str | None = None) -> DataProfile:
    return DataProfile(spec=spec, method="none", method_note=f"planned at cutoff_len {spec.cutoff_len}",
                       notes=tuple(notes + [refused] if refused else notes), seconds=time.monotonic() - t0,
                       refused=refused)


# ---------------------------------------------------------------- the estimate (no LF)
def _measure_estimate(spec, sources, engine, cache, notes, t0) -> DataProfile:
    """The tokenizer (else characters) estimate, from the cache when it has this data."""
    blocked = unreadable_here(sources)
    if blocked:
        return _at_cutoff(spec, notes + [blocked], t0)
    name, tpl = pick_template(spec, notes)
    folder = None if engine == "chars" else find_tokenizer(spec.model_name_or_path)
    if folder is None and engine != "chars":
        notes.append(f"no tokenizer.json for {shorten(str(spec.model_name_or_path), 80)!r}: "
                     "lengths from characters per token")
    base = {"v": CACHE_VERSION, "what": "shapes", "files": files_key(sources), "stage": spec.stage,
            "template": name, "tpl": repr(tpl), "packs": spec.packs, "max_samples": spec.max_samples,
            "thinking": [spec.enable_thinking, spec.preserve_thinking, spec.mask_history],
            "image_tokens": spec.image_tokens}
    for choice in ([folder, None] if folder else [None]):
        key = {**base, "counter": counter_fingerprint(choice)}
        data = cache_read(cache, key)
        if data is not None:
            return _profile(spec, data, tpl, notes, True, t0)
        counter = load_counter(choice, tpl, notes)
        if counter is None:
            continue  # the tokenizer would not load: count characters instead
        data, note = tokenize_sources(spec, sources, tpl, counter)
        if data is None:
            return _at_cutoff(spec, notes + [note], t0)
        cache_write(cache, key, data)
        return _profile(spec, data, tpl, notes, False, t0)
    raise AssertionError("unreachable: the characters counter always loads")


def _profile(spec, data, tpl, notes, cached, t0) -> DataProfile:
    """Lengths at ``spec``'s cutoff from the cached shapes (cheap arithmetic, any cutoff);
    :class:`Refused` when no sample is left (LF's loader stops on an empty dataset)."""
    cutoff = spec.sample_cutoff
    stage = "sft" if spec.stage not in ("pt", "kto") and not spec.pairwise else spec.stage
    lengths, rejected = [], []
    truncated, longest = 0, 0
    for shape in data["shapes"]:
        n, r, raw = sample_length(shape, stage, cutoff, tpl.efficient_eos, spec.mask_history)
        lengths.append(n)
        rejected.append(r)
        truncated += raw > cutoff
        longest = max(longest, raw)
    sources = tuple((name, rows, tuple(drop)) for name, rows, drop in data["sources"])
    dropped = sum(len(d) for _, _, d in sources)
    if not lengths:
        limit = spec.max_samples
        keep = f"; max_samples {limit} keeps none" if limit is not None and limit <= 0 else ""
        raise Refused(f"0 usable samples ({dropped} dropped{keep}): LF will refuse this dataset")
    how = METHODS[data["method"]][1].format(**CHARS_PER_TOKEN)
    note = f"{how}; {dropped} malformed row(s) LF drops" if dropped else how
    return DataProfile(spec=spec, method=data["method"], method_note=note, lengths=tuple(lengths),
                       rejected=tuple(rejected) if spec.pairwise else None, truncated=truncated, dropped=dropped,
                       rows_read=sum(rows for _, rows, _ in sources), longest_untruncated=longest,
                       notes=tuple(notes + data["notes"]), cached=cached, seconds=time.monotonic() - t0,
                       sources=sources)


# ---------------------------------------------------------------- the rows themselves
def read_samples(spec: DataSpec, refs: list[SampleRef]) -> list[dict]:
    """The raw rows ``refs`` name, as the dataset files hold them (for a preflight dataset
    written with the same dataset_info.json entry); raises UserError when they cannot be read."""
    sources, notes = resolve(spec)
    if sources is None:
        raise UserError(notes[0])
    rows = {src.name: read_source(src, spec.max_samples) for src in sources if any(r.dataset == src.name
                                                                                   for r in refs)}
    return [rows[r.dataset][r.row] for r in refs]

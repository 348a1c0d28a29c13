"""Text pieces to token counts, and token counts to per-sample lengths at a cutoff.

One job: count the rendered pieces (the model's ``tokenizer.json`` through the light
``tokenizers`` package, imported lazily, else a characters-per-token rate), keep each
sample's *shape* (token counts per message, or prompt/chosen/rejected) so any cutoff is
arithmetic, and truncate a shape to ``cutoff_len`` with LF's ``infer_seqlen``.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
from pathlib import Path

from dsplan.errors import UserError, one_line
from dsplan.inputs.data.formats import convert, image_count, valid
from dsplan.inputs.data.sources import Source, hf_home, read_source
from dsplan.inputs.data.spec import LF_REFUSES, PAIRWISE_STAGES, DataSpec, Refused
from dsplan.inputs.data.templates import BOS, Template, render_parts
from dsplan.inputs.reading import read_json

#: Characters per token used without a tokenizer, by script.  Set on the short side (real
#: BPE vocabularies give about 4 Latin characters a token) so the rough estimate errs
#: toward more memory, not less; digits are one token each, as Qwen's tokenizers split them.
CHARS_PER_TOKEN = {"latin": 3.5, "digit": 1.0, "cjk": 1.0, "other": 2.0}
#: Samples rendered and tokenized per batch (bounds the memory held at once).
_CHUNK = 4096


# ---------------------------------------------------------------- counting tokens
_CJK = re.compile("[\u1100-\u11ff\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef]")
_NON_ASCII = re.compile("[^\x00-\x7f]")
_DIGITS = re.compile("[0-9]")
#: Strings that are one token in the templates' vocabularies; the characters estimate counts them so.
_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>|<(?:start|end)_of_turn>|\[/?INST\]|<</?SYS>>"
                      r"|\[/?(?:TOOL_CALLS|TOOL_RESULTS|AVAILABLE_TOOLS|SYSTEM_PROMPT)\]|\[gMASK\]|<sop>|</?s>|<eos>")


class CharCounter:
    """Token counts from characters: :data:`CHARS_PER_TOKEN` per script, special tokens one each."""

    method = "chars"
    has_bos = True  # unknown without a tokenizer: count the token where a template asks for it
    add_bos = False
    eos_text = "<|endoftext|>"

    def count(self, texts: list[str]) -> list[int]:
        return [self._one(t) for t in texts]

    @staticmethod
    def _one(text: str) -> int:
        specials = len(_SPECIAL.findall(text))
        if specials:
            text = _SPECIAL.sub("", text)
        rate = CHARS_PER_TOKEN
        digits = len(_DIGITS.findall(text))
        cjk = 0 if text.isascii() else len(_CJK.findall(text))
        other = 0 if text.isascii() else len(_NON_ASCII.findall(text)) - cjk
        latin = len(text) - digits - cjk - other
        return specials + math.ceil(latin / rate["latin"] + digits / rate["digit"] + cjk / rate["cjk"]
                                    + other / rate["other"])


class TokenCounter:
    """Token counts from the model's ``tokenizer.json`` (the ``tokenizers`` package, no torch),
    with the special tokens LF's template adds to the tokenizer added here too."""

    method = "tokenizer"

    def __init__(self, folder: Path, tpl: Template):
        from tokenizers import AddedToken, Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        cfg = _tokenizer_config(folder)
        self.has_bos = bool(cfg.get("bos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False)) and self.has_bos
        eos = cfg.get("eos_token") or "<|endoftext|>"
        self.eos_text = tpl.stop_words[0] if tpl.replace_eos and tpl.stop_words else eos
        extra = [w for w in (*tpl.stop_words, self.eos_text) if w]
        self.tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in extra])
        self._encode = getattr(self.tok, "encode_batch_fast", None) or self.tok.encode_batch

    def count(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._encode(texts, add_special_tokens=False)]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _tokenizer_config(folder: Path) -> dict:
    """bos/eos tokens and add_bos_token from tokenizer_config.json (special_tokens_map.json fills gaps)."""
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                data = read_json(path, str(path))
            except UserError:
                continue
            if isinstance(data, dict):
                for key in ("bos_token", "eos_token"):
                    if key in data:
                        out[key] = _token_text(data[key])
                if "add_bos_token" in data:
                    out["add_bos_token"] = bool(data["add_bos_token"])
    return out


def find_tokenizer(model: str | None) -> Path | None:
    """The folder holding ``model``'s tokenizer.json: the model folder itself, or its
    snapshot in the local HF hub cache for a hub id.  None when there is none."""
    if not model:
        return None
    path = Path(model).expanduser()
    if (path / "tokenizer.json").is_file():
        return path
    if path.exists() or model.count("/") != 1:
        return None
    repo = Path(os.environ.get("HF_HUB_CACHE") or hf_home() / "hub") / f"models--{model.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if (snap / "tokenizer.json").is_file():
            return snap
    found = sorted(glob.glob(str(repo / "snapshots" / "*" / "tokenizer.json")), key=os.path.getmtime)
    return Path(found[-1]).parent if found else None


def load_counter(folder: Path | None, tpl: Template, notes: list[str]):
    """The tokenizer in ``folder``, or None (with a note) when it cannot be loaded; the
    characters counter for no folder."""
    if folder is None:
        return CharCounter()
    try:
        return TokenCounter(folder, tpl)
    except ImportError:
        notes.append("the tokenizers package is not installed (pip install tokenizers): lengths from characters")
    except Exception as e:  # a tokenizer.json this tokenizers version cannot load
        notes.append(one_line(f"cannot load {folder / 'tokenizer.json'} ({type(e).__name__}: {e}): "
                              "lengths from characters"))
    return None


# ---------------------------------------------------------------- per-sample shapes
def _sample_shapes(rows: list[dict], src: Source, spec: DataSpec, tpl: Template, counter) -> tuple[list, list[int]]:
    """Per kept row its shape (token counts, see :func:`sample_length`); and the rows LF drops.
    Raises :class:`Refused` at the first kept row LF would stop on (a message that is not text)."""
    shapes: list = []
    dropped: list[int] = []
    for start in range(0, len(rows), _CHUNK):
        parts_of: list[list[list]] = []
        for i, row in enumerate(rows[start:start + _CHUNK], start):
            conv = convert(row, src)
            if not valid(conv, spec.stage):
                dropped.append(i)
                continue
            if conv.bad:
                raise Refused(one_line(f"row {i + 1} of {src.name!r}: {conv.bad}: {LF_REFUSES}"))
            parts = render_parts(conv, tpl, spec, counter.eos_text, counter.add_bos)
            images = image_count(row, src)
            if images and parts:  # LF expands each image's placeholder into the prompt's tokens
                parts[0] = parts[0] + [images * spec.image_tokens]
            parts_of.append(parts)
        texts = list({e for parts in parts_of for part in parts for e in part if isinstance(e, str) and e})
        counts = dict(zip(texts, counter.count(texts)))
        counts[""] = 0  # LF skips empty strings
        counts[BOS] = 1 if counter.has_bos else 0  # eos and named tokens: one each (LF ensures an eos)
        shapes += [[sum(e if isinstance(e, int) else counts.get(e, 1) for e in part) for part in parts]
                   for parts in parts_of]
    return shapes, dropped


def uncounted_media(src: Source, spec: DataSpec) -> str | None:
    """A note when ``src`` holds media whose tokens dsplan cannot count (videos, audios, or images
    for a model dsplan does not know as a VLM): its lengths would then be too short to plan on."""
    media = [k for k in ("videos", "audios") if src.columns.get(k)]
    if src.columns.get("images") and spec.image_tokens <= 0:
        media.insert(0, "images")
    if not media:
        return None
    return (f"planned at cutoff_len: {src.name!r} has {', '.join(media)}, whose tokens count toward cutoff_len "
            "and which dsplan does not count" + (" for this model" if media[0] == "images" else ""))


def tokenize_sources(spec, sources, tpl, counter) -> tuple[dict | None, str]:
    """Every source's rows as shapes, with the rows LF drops and the notes on what is not
    modelled: the cache entry of an estimate; None and a note when a source cannot be read."""
    data = {"method": counter.method, "shapes": [], "sources": [], "notes": []}
    for src in sources:
        note = uncounted_media(src, spec)
        if note:
            return None, note
        rows, note = _read(src, spec)
        if rows is None:
            return None, note
        shapes, dropped = _sample_shapes(rows, src, spec, tpl, counter)
        data["shapes"] += shapes
        data["sources"].append([src.name, len(rows), dropped])
        data["notes"] += _source_notes(src, spec)
    return data, ""


def _read(src: Source, spec: DataSpec) -> tuple[list[dict] | None, str]:
    """``src``'s rows, or None and a note when this Python reads them differently from LF's
    (the csv module is stricter than the pandas reader ``datasets`` uses; another pyarrow, another
    hub snapshot).  A local json, csv or text file that does not read or decode stops LF's
    loader too: :class:`Refused`."""
    try:
        return read_source(src, spec.max_samples), ""
    except (OSError, ValueError, csv.Error) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        why = f"cannot read {src.name!r} ({type(e).__name__}: {e})"
        local_text = src.load_from == "file" and src.kind in ("json", "csv", "text")
        if local_text and not isinstance(e, csv.Error):
            raise Refused(one_line(f"{why}: {LF_REFUSES}")) from None
        return None, one_line(f"planned at cutoff_len: {why}")


def _source_notes(src: Source, spec: DataSpec) -> list[str]:
    """What the estimate of ``src`` leaves out or reads differently from LF."""
    notes = []
    if src.num_samples is not None:
        notes.append(f"{src.name!r}: num_samples draws rows at random; all rows were measured")
    if src.columns.get("images") and spec.image_tokens > 0:
        notes.append(f"{src.name!r}: each image counted as {spec.image_tokens} tokens, the most LF's resize to "
                     "image_max_pixels keeps")
    if src.formatting == "openai":
        notes.append(f"{src.name!r}: openai formatting read as sharegpt")
    return notes


# ---------------------------------------------------------------- truncation (LF's arithmetic)
def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LF's infer_seqlen: how a (prompt, response) pair is cut to fit ``cutoff_len``."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def sample_length(shape, stage: str, cutoff: int, efficient_eos: bool, mask_history: bool) -> tuple[int, int, int]:
    """(length, rejected length, untruncated length) of one sample's shape at ``cutoff``.

    Shapes: sft the token count per message; pairwise (prompt, chosen, rejected); kto
    (prompt, response); pt (text,)."""
    if stage == "pt":
        return min(shape[0], cutoff), 0, shape[0]
    if stage in PAIRWISE_STAGES:
        p, c, r = shape
        s, t = infer_seqlen(p, max(c, r), cutoff)
        return s + min(t, c), s + min(t, r), p + max(c, r)
    if stage == "kto":
        s, t = infer_seqlen(shape[0], shape[1], cutoff)
        return s + t, 0, shape[0] + shape[1]
    pairs = list(zip(shape[0::2], shape[1::2]))
    if mask_history:
        pairs.reverse()
    total = 1 if efficient_eos else 0
    for s, t in pairs:
        if total >= cutoff:
            break
        ns, nt = infer_seqlen(s, t, cutoff - total)
        total += ns + nt
    return total, 0, sum(shape) + (1 if efficient_eos else 0)

"""Rows to conversations: LF's alpaca and sharegpt converters, and which samples each stage keeps.

One job: a raw row plus its :class:`~dsplan.inputs.data.sources.Source` mapping becomes a
:class:`Conv` (prompt and response messages, system text, tools) as LF's
AlpacaDatasetConverter / SharegptDatasetConverter build it; :func:`valid` says whether
LF's processor for a stage keeps the sample or drops it as malformed, and :attr:`Conv.bad`
whether LF would stop on it instead (a message that is not text: LF's converter joins the
query parts, its template's formatters take only strings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dsplan.inputs.data.sources import Source


# ---------------------------------------------------------------- LF's converters
@dataclass
class Conv:
    """A sample in LF's standard form: messages as (role, content)."""

    prompt: list[tuple[str, str]]
    response: list[tuple[str, str]]
    system: str = ""
    tools: str = ""
    bad: str = ""  # why LF raises on this sample when it keeps it (a message that is not text); "" if it does not


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _not_text(named: list[tuple[str | None, object]], empty_ok: bool) -> str:
    """The first (column, value) that is not text ("" if none); ``empty_ok``: LF skips falsy values there."""
    for name, value in named:
        if not isinstance(value, str) and not (empty_ok and not value):
            return f"{name or 'a message'} is {_kind(value)}, not text"
    return ""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _col(row: dict, name: str | None):
    return row.get(name) if name else None


def image_count(row: dict, src: Source) -> int:
    """How many images a row holds (LF's ``images`` column: a list of paths, or one path)."""
    value = _col(row, src.columns.get("images"))
    if isinstance(value, (list, tuple)):
        return len(value)
    return 1 if value else 0


def _alpaca(row: dict, src: Source) -> Conv:
    """LF's AlpacaDatasetConverter."""
    c = src.columns
    prompt: list[tuple[str, str]] = []
    history, bad = _col(row, c["history"]), ""
    if isinstance(history, list):
        for turn in history:
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                prompt += [("user", _text(turn[0])), ("assistant", _text(turn[1]))]
                bad = bad or _not_text([(c["history"], turn[0]), (c["history"], turn[1])], empty_ok=False)
            else:
                bad = bad or f"{c['history']} holds {_kind(turn)}, not a (query, response) pair"
    parts = [(c["prompt"], _col(row, c["prompt"])), (c["query"], _col(row, c["query"]))]
    bad = bad or _not_text(parts + [(c["system"], _col(row, c["system"]))], empty_ok=True)
    query = [_text(v) for _, v in parts if v]
    prompt.append(("user", "\n".join(query)))
    tag, chosen, rejected = _col(row, c["kto_tag"]), _col(row, c["chosen"]), _col(row, c["rejected"])
    if isinstance(tag, bool):
        answer, empty = ("assistant", _text(_col(row, c["response"]))), ("assistant", "")
        response = [answer, empty] if tag else [empty, answer]
        bad = bad or _not_text([(c["response"], _col(row, c["response"]))], empty_ok=False)
    elif src.ranking and isinstance(chosen, str) and isinstance(rejected, str):
        response = [("assistant", chosen), ("assistant", rejected)]
    elif isinstance(_col(row, c["response"]), str):
        response = [("assistant", row[c["response"]])]
    else:
        response = []
    return Conv(prompt, response, _text(_col(row, c["system"])), _text(_col(row, c["tools"])), bad)


def _sharegpt(row: dict, src: Source) -> Conv:
    """LF's SharegptDatasetConverter (openai-format data is read the same way: an estimate)."""
    c, t = src.columns, src.tags
    role_of = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["observation_tag"]: "observation",
               t["function_tag"]: "function", t["system_tag"]: "system"}
    accept = ((t["user_tag"], t["observation_tag"]), (t["assistant_tag"], t["function_tag"]))
    messages = _col(row, c["messages"])
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else None
    system = _col(row, c["system"])
    if messages and t["system_tag"] and messages[0].get(t["role_tag"]) == t["system_tag"]:
        system, messages = messages[0].get(t["content_tag"]), messages[1:]
    aligned, broken, raw = [], messages is None, []
    for i, m in enumerate(messages or []):
        if m.get(t["role_tag"]) not in accept[i % 2]:
            broken = True
            break
        aligned.append((role_of[m.get(t["role_tag"])], _text(m.get(t["content_tag"]))))
        raw.append((t["content_tag"], m.get(t["content_tag"])))
    broken = broken or (len(aligned) % 2 == 0) == src.ranking
    bad = _not_text([(c["system"] or "system", system)], empty_ok=True) or _not_text(raw, empty_ok=False)
    conv = Conv([], [], _text(system), _text(_col(row, c["tools"])), bad)
    tag, chosen, rejected = _col(row, c["kto_tag"]), _col(row, c["chosen"]), _col(row, c["rejected"])
    if broken:
        return conv
    if isinstance(tag, bool):
        empty = ("assistant", "")
        conv.prompt, conv.response = aligned[:-1], aligned[-1:] + [empty] if tag else [empty] + aligned[-1:]
    elif src.ranking and isinstance(chosen, dict) and isinstance(rejected, dict):
        conv.prompt = aligned
        conv.response = [(role_of.get(m.get(t["role_tag"]), "assistant"), _text(m.get(t["content_tag"])))
                         for m in (chosen, rejected)]
        conv.bad = conv.bad or _not_text([(t["content_tag"], m.get(t["content_tag"])) for m in (chosen, rejected)],
                                         empty_ok=False)
    else:
        conv.prompt, conv.response = aligned[:-1], aligned[-1:]
    return conv


def convert(row: dict, src: Source) -> Conv:
    return _alpaca(row, src) if src.formatting == "alpaca" else _sharegpt(row, src)


def valid(conv: Conv, stage: str) -> bool:
    """Whether LF's processor for ``stage`` keeps the sample (it drops the others)."""
    if stage == "pt":
        return bool(conv.prompt)
    if stage in ("rm", "dpo", "kto"):
        return len(conv.prompt) % 2 == 1 and len(conv.response) >= 2
    return len(conv.prompt) % 2 == 1 and len(conv.response) == 1

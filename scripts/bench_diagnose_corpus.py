#!/usr/bin/env python3
"""How well does ``dsplan diagnose`` read real failure logs that nobody here wrote?

Runs the log classifier over ``tests/logs/public/``: excerpts that people pasted
into public GitHub issues (transformers, accelerate, peft, trl, axolotl,
unsloth, ms-swift, vLLM, ipex-llm / Intel XPU, Ascend NPU, ROCm / HIP and a
Hygon DCU, DeepSpeed, LLaMA-Factory and others), each labelled by hand in its
header.  The self-written "format" examples in ``tests/logs/*.log`` are unit
tests of single rules and are deliberately not read here.

Each file starts with ``#@ key: value`` header lines (source, label, backend,
framework, note, ``known-miss`` with the reason when the classifier is known to
get it wrong, and ``set: holdout`` on the logs collected after the rules were
last changed); the rest is the log, fed to the classifier as ``dsplan
diagnose`` would (no exit code).  Printed, for all logs and for the held-out
ones alone:

* the number of logs, of distinct source threads and repositories, and the
  count per label, backend and framework;
* recall on the OOM logs: called an OOM at all, called the right kind (GPU or
  host), and for GPU OOMs, named the right backend;
* the false-OOM rate on every log labelled ``not_oom``, ``unknown`` or
  ``success`` (traps included: NCCL timeouts, disk full, segfaults, dataset
  errors, OOM words in normal lines, recovered OOMs);
* for the OOM logs, how many ``feed`` would have reported while streaming
  (the launcher kills at once), the rest being decided only from the exit code;
* the same recall and false-OOM rate when the exit code is known to be 1, as
  the launcher sees a failed attempt;
* every miss and every false OOM, by file.

    python scripts/bench_diagnose_corpus.py [--json] [--write-manifest]

``--write-manifest`` rewrites ``tests/logs/public/SOURCES.md`` from the
headers.  Standard library only, like the classifier.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsplan.logs.classifier import Classifier  # noqa: E402
from dsplan.logs.diagnose import diagnose_text  # noqa: E402

PUBLIC = REPO / "tests" / "logs" / "public"
OOM_LABELS = ("gpu_oom", "host_oom")
LABELS = ("gpu_oom", "host_oom", "not_oom", "unknown", "success")


@dataclass
class Case:
    """One public log: where it comes from, its hand label and its text."""

    path: Path
    source: str
    label: str
    backend: str | None
    framework: str
    note: str
    text: str
    subset: str = "dev"
    known_miss: str = ""  # why the classifier gets this one wrong, when it is a known miss

    @property
    def repo(self) -> str:
        parts = self.source.split("/")
        return "/".join(parts[3:5]) if len(parts) > 4 else self.source


def read_case(path: Path) -> Case:
    """Split a corpus file into its ``#@`` header and the log text."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    head: dict[str, str] = {}
    lines = raw.split("\n")
    i = 0
    while i < len(lines) and lines[i].startswith("#@ "):
        key, _, value = lines[i][3:].partition(":")
        head[key.strip()] = value.strip()
        i += 1
    label = head.get("label", "")
    if label not in LABELS or not head.get("source", "").startswith("https://"):
        raise SystemExit(f"{path.name}: header needs a source URL and a label in {LABELS}")
    backend = head.get("backend") or None
    return Case(path, head["source"], label, None if backend == "none" else backend,
                head.get("framework", "?"), head.get("note", ""), "\n".join(lines[i:]), head.get("set", "dev"),
                head.get("known-miss", ""))


def load(folder: Path = PUBLIC) -> list[Case]:
    return [read_case(p) for p in sorted(folder.glob("*.log"))]


def judge(case: Case) -> dict[str, object]:
    """What diagnose says about one case, and whether that is right."""
    d = diagnose_text(case.text)
    said_oom = d.verdict in OOM_LABELS
    row: dict[str, object] = {"file": case.path.name, "label": case.label, "backend": case.backend,
                              "verdict": d.verdict, "got_backend": d.backend, "rule": d.rule,
                              "evidence": d.evidence[0][:160] if d.evidence else ""}
    failed = diagnose_text(case.text, exit_code=1).verdict  # what the launcher concludes after a failed exit
    if case.label in OOM_LABELS:
        row["streamed"] = _streamed(case.text)
        row["kind_exit1"] = failed == case.label
        row["oom"] = said_oom
        row["kind"] = d.verdict == case.label
        row["backend_ok"] = row["kind"] and (case.label == "host_oom" or d.backend == case.backend)
    else:
        row["false_oom"] = said_oom
        row["false_oom_exit1"] = case.label == "not_oom" and failed in OOM_LABELS
        row["verdict_ok"] = d.verdict == case.label
    return row


def _streamed(text: str) -> bool:
    """Would ``feed`` have reported an OOM while the log streamed (a live run killed at once)?"""
    clf = Classifier(clock=None)
    found = False
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        found = clf.feed(line) is not None or found
    return found


def _pct(num: int, den: int) -> str:
    return f"{num}/{den} = {100.0 * num / den:.1f}%" if den else "n/a"


def summarise(cases: list[Case], rows: list[dict[str, object]]) -> dict[str, object]:
    ooms = [r for r in rows if r["label"] in OOM_LABELS]
    others = [r for r in rows if r["label"] not in OOM_LABELS]
    return {
        "logs": len(cases),
        "source_threads": len({c.source for c in cases}),
        "source_repos": len({c.repo for c in cases}),
        "labels": dict(Counter(c.label for c in cases)),
        "gpu_backends": dict(Counter(c.backend for c in cases if c.label == "gpu_oom")),
        "frameworks": dict(Counter(c.framework for c in cases).most_common()),
        "holdout": sum(c.subset == "holdout" for c in cases),
        "streamed": [sum(bool(r["streamed"]) for r in ooms), len(ooms)],
        "recall_oom": [sum(bool(r["oom"]) for r in ooms), len(ooms)],
        "recall_kind": [sum(bool(r["kind"]) for r in ooms), len(ooms)],
        "recall_backend": [sum(bool(r["backend_ok"]) for r in ooms), len(ooms)],
        "false_oom": [sum(bool(r["false_oom"]) for r in others), len(others)],
        "recall_kind_exit1": [sum(bool(r["kind_exit1"]) for r in ooms), len(ooms)],
        "false_oom_exit1": [sum(bool(r["false_oom_exit1"]) for r in others),
                            sum(r["label"] == "not_oom" for r in others)],
        "non_oom_verdict_ok": [sum(bool(r["verdict_ok"]) for r in others), len(others)],
        "misses": [r for r in ooms if not r["backend_ok"]],
        "false_ooms": [r for r in others if r["false_oom"]],
        "non_oom_other_verdict": [r for r in others if not r["false_oom"] and not r["verdict_ok"]],
    }


def print_figures(s: dict[str, object], title: str) -> None:
    print(f"{title}: {s['logs']} logs")
    print(f"  recall, OOM logs called an OOM:          {_pct(*s['recall_oom'])}")
    print(f"  recall, right kind (gpu vs host):        {_pct(*s['recall_kind'])}")
    print(f"  recall, right kind and GPU backend:      {_pct(*s['recall_backend'])}")
    print(f"  false-OOM rate on not-OOM logs:          {_pct(*s['false_oom'])}")
    print(f"  not-OOM logs given exactly their label:  {_pct(*s['non_oom_verdict_ok'])}")
    print(f"  OOM logs reported while streaming:       {_pct(*s['streamed'])}")
    print(f"  with exit code 1 (the launcher's view): right kind {_pct(*s['recall_kind_exit1'])}, "
          f"false OOM on not_oom logs {_pct(*s['false_oom_exit1'])}")


def print_report(s: dict[str, object]) -> None:
    print(f"public corpus: {s['logs']} logs from {s['source_threads']} issue threads in "
          f"{s['source_repos']} repositories ({s['holdout']} of them held out)")
    print("  labels:     " + ", ".join(f"{k} {v}" for k, v in sorted(s["labels"].items())))
    print("  gpu_oom by backend: " + ", ".join(f"{k} {v}" for k, v in sorted(s["gpu_backends"].items())))
    print("  frameworks: " + ", ".join(f"{k} {v}" for k, v in s["frameworks"].items()))
    print_figures(s, "all logs")
    if s.get("holdout_summary"):
        print_figures(s["holdout_summary"], "held-out logs (collected after the last rule change)")
    for title, key in (("misses", "misses"), ("false OOMs", "false_ooms"),
                       ("not-OOM logs with another verdict (no OOM claimed)", "non_oom_other_verdict")):
        rows = s[key]
        print(f"{title}: {len(rows)}")
        for r in rows:
            want = f"{r['label']}/{r['backend']}" if r["backend"] else r["label"]
            got = f"{r['verdict']}/{r['got_backend']}" if r["got_backend"] else r["verdict"]
            print(f"  {r['file']}: want {want}, got {got} ({r['rule']}) {r['evidence']!r}")


def write_manifest(cases: list[Case], folder: Path = PUBLIC) -> Path:
    """Rewrite SOURCES.md from the file headers (the headers are the master copy)."""
    out = [
        "# Public failure logs: sources and hand labels",
        "",
        "Each file is an excerpt of a log that someone pasted into a public GitHub issue.",
        "The log lines are copied as they were pasted (including wrapping, prefixes and cuts).",
        "The `#@` header at the top of each file gives the source and the hand label; this table",
        "is generated from those headers by `python scripts/bench_diagnose_corpus.py --write-manifest`.",
        "`unknown` means the excerpt shows no decisive failure (a run still going, or warnings only).",
        "Set `holdout` marks the logs collected after the rules were last changed: their figures are",
        "reported apart, as a check that the rules were not only fitted to the rest.",
        "",
        "| file | label | backend | framework | set | source | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cases:
        note = c.note.replace("|", "\\|")
        out.append(f"| `{c.path.name}` | {c.label} | {c.backend or ''} | {c.framework} | {c.subset} | {c.source} "
                   f"| {note} |")
    target = folder / "SOURCES.md"
    target.write_text("\n".join(out) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--write-manifest", action="store_true", help="rewrite tests/logs/public/SOURCES.md")
    a = ap.parse_args(argv)
    cases = load()
    if a.write_manifest:
        print(f"wrote {write_manifest(cases)}")
    rows = [judge(c) for c in cases]
    summary = summarise(cases, rows)
    held = [i for i, c in enumerate(cases) if c.subset == "holdout"]
    if held:
        summary["holdout_summary"] = summarise([cases[i] for i in held], [rows[i] for i in held])
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print_report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

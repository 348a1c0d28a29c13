"""The login-node length estimate against LLaMA-Factory's own data pipeline, on LF's demo datasets.

Runs LF 0.9.5 (get_train_args, load_tokenizer, get_template_and_fix_tokenizer, get_dataset) in
dsplan's length worker, under the interpreter that has it, with a tokenizer trained here on the
demo data.  The estimate must land within 5 % of LF's longest sample; the table is printed
(``pytest -s`` shows it).
"""

from __future__ import annotations

import pytest

from dsplan.inputs.data import DataSpec, measure, measure_many, read_samples
from dsplan.inputs.data.templates import BOS, EOS, TEMPLATES
from tests.test_dataset import DEMO, build_tokenizer

pytestmark = pytest.mark.real

#: (dataset, stage, template): the three demo sets the issue names, under two template
#: families, and the pairwise demo set.
CASES = [(name, "sft", tpl) for name in ("alpaca_en_demo", "identity", "glaive_toolcall_en_demo")
         for tpl in ("qwen", "llama3")] + [("dpo_en_demo", "dpo", "qwen")]
#: Above every demo sample, so the max compares untruncated lengths.
CUTOFF = 16384
MICRO_BATCH = 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "model")


def _spec(name, stage, tpl, tok_dir, cutoff=CUTOFF) -> DataSpec:
    return DataSpec(dataset=name, dataset_dir=str(DEMO), template=tpl, stage=stage, cutoff_len=cutoff,
                    model_name_or_path=str(tok_dir))


def test_templates_match_lfs_own_definitions():
    """dsplan's copy of each template equals LF's registered one, slot by slot."""
    from llamafactory.data.template import TEMPLATES as LF

    def slots(formatter):
        out = []
        for slot in formatter.slots:
            if isinstance(slot, set):
                out.append(BOS if "bos_token" in slot else EOS)
            elif isinstance(slot, dict):
                out.append(("token", slot["token"]))
            else:
                out.append(slot)
        return tuple(out)

    kinds = {"Template": "plain", "Llama2Template": "llama2", "ReasoningTemplate": "reasoning"}
    for name, mine in TEMPLATES.items():
        lf = LF[name]
        theirs = dict(user=slots(lf.format_user), assistant=slots(lf.format_assistant),
                      system=slots(lf.format_system), function=slots(lf.format_function),
                      function_format=lf.format_function.tool_format, observation=slots(lf.format_observation),
                      tool_format=lf.format_tools.tool_format, prefix=slots(lf.format_prefix),
                      default_system=lf.default_system, stop_words=tuple(lf.stop_words),
                      efficient_eos=lf.efficient_eos, replace_eos=lf.replace_eos, kind=kinds[type(lf).__name__],
                      thought_words=tuple(lf.thought_words), tool_call_words=tuple(lf.tool_call_words))
        assert mine.__dict__ == theirs, name


def test_estimate_is_within_5_percent_of_lfs_pipeline(tok_dir, train_python):
    specs = [_spec(*case, tok_dir) for case in CASES]
    exact = measure_many(specs, python=train_python, engine="lf", use_cache=False)
    estimate = measure_many(specs, engine="tokenizer", use_cache=False)
    rough = measure_many(specs, engine="chars", use_cache=False)
    rows = []
    for (name, stage, tpl), lf, est, chars in zip(CASES, exact, estimate, rough):
        assert lf.method == "lf", lf.notes
        assert est.method == "tokenizer" and chars.method == "chars"
        a, b, c = lf.stats(), est.stats(), chars.stats()
        assert a.count == b.count and est.dropped == lf.dropped == 0
        assert abs(b.max - a.max) <= 0.05 * a.max, (name, tpl, a.max, b.max)
        wb = est.worst_batch(MICRO_BATCH)
        rows.append(f"{name:24} {stage:4} {tpl:7} {a.count:5} | {a.max:6} {a.p99:6} {a.median:6} | "
                    f"{b.max:6} {b.p99:6} {b.median:6} | {100 * (b.max - a.max) / a.max:+6.2f}% | "
                    f"{c.max:6} {c.p99:6} {c.median:6} | {wb.tokens:7} vs {wb.cutoff_tokens:7}")
    print("\ndataset                  stage tpl     count |  LF max    p99 median | est max    p99 median |"
          "  max Δ  | chars max  p99 median | worst batch vs cutoff x mb (mb 4, cutoff 16384)")
    print("\n".join(rows))


def test_truncation_matches_lf_sample_by_sample(tok_dir, train_python):
    cases = [("glaive_toolcall_en_demo", "sft", "qwen", 512), ("dpo_en_demo", "dpo", "llama3", 300),
             ("alpaca_en_demo", "sft", "glm4", 128)]
    specs = [_spec(n, st, t, tok_dir, cutoff=c) for n, st, t, c in cases]
    for lf, est in zip(measure_many(specs, python=train_python, engine="lf", use_cache=False),
                       measure_many(specs, engine="tokenizer", use_cache=False)):
        assert lf.method == "lf", lf.notes
        assert est.lengths == lf.lengths and est.rejected == lf.rejected
        # LF's lengths cannot tell a cut sample from one exactly cutoff_len long: it counts both
        assert 0 < est.truncated <= lf.truncated == sum(n >= lf.spec.sample_cutoff for n in lf.row_lengths())


def test_auto_uses_lf_and_caches_its_lengths(tok_dir, train_python, tmp_path):
    spec = _spec("identity", "sft", "qwen", tok_dir, cutoff=2048)
    first = measure(spec, python=train_python, cache_dir=tmp_path)
    second = measure(spec, python=train_python, cache_dir=tmp_path)
    assert first.method == second.method == "lf" and first.exact
    assert not first.cached and second.cached and second.lengths == first.lengths
    assert first.longest(1) and read_samples(spec, first.longest(1))[0]["instruction"]


#: LF's own converter on rows whose column set decides it: (rows, dataset_info entry, error LF raises or None).
_COLUMN_CASES = [
    ([{"instruction": "a", "output": "b"}], {}, "KeyError: 'input'"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "", "output": "d"}], {}, None),
    ([{"q": "a", "a": "b"}], {"columns": {"prompt": "q", "response": "a"}}, None),
    ([{"messages": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}], {"formatting": "sharegpt"},
     "KeyError: 'conversations'"),
]
_ALIGN = """
import json, sys
from datasets import load_dataset
from llamafactory.data.converter import align_dataset
from llamafactory.data.parser import get_dataset_list
from llamafactory.hparams import DataArguments, TrainingArguments
folder = sys.argv[1]
for name in json.load(open(folder + "/dataset_info.json")):
    ds = load_dataset("json", data_files=f"{folder}/{name}.json", split="train")
    try:
        align_dataset(ds, get_dataset_list([name], folder)[0], DataArguments(dataset=name, dataset_dir=folder),
                      TrainingArguments(output_dir=folder + "/o"))
        print(name, "ok")
    except Exception as e:
        print(name, f"{type(e).__name__}: {e}")
"""


def test_a_column_lfs_converter_reads_from_every_row_is_refused_exactly_where_lf_raises(tmp_path, train_python):
    """LF's converter indexes its named columns on every row: a dataset without one stops LF with a
    KeyError, and dsplan refuses that dataset (and only that one) in one line, before any GPU time."""
    import json
    import subprocess

    from tests.test_dataset import spec, write_dataset

    folder = tmp_path / "data"
    for i, (rows, entry, _) in enumerate(_COLUMN_CASES):
        write_dataset(folder, f"d{i}", rows, entry)
    out = subprocess.run([train_python, "-c", _ALIGN, str(folder)], capture_output=True, text=True, timeout=300)
    lf = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith("d"))
    assert len(lf) == len(_COLUMN_CASES), out.stderr[-2000:]
    for i, (_, _, raised) in enumerate(_COLUMN_CASES):
        assert lf[f"d{i}"] == (raised or "ok"), (i, lf[f"d{i}"])
        p = measure(spec(folder, f"d{i}", None), engine="chars", cache_dir=tmp_path / "c")
        if raised:
            column = json.loads(raised.split(": ", 1)[1].replace("'", '"'))
            assert p.refused and f"has no column {column!r}" in p.refused, p.refused
        else:
            assert p.refused is None, p.refused

"""More of the schema's LF checks, through the CLI as a user runs it.

- LF's numeric training keys (learning_rate, num_train_epochs, warmup_ratio, save_steps,
  preprocessing_num_workers) are typed rows: NaN, infinities and absurd values are one line,
  valid values render exactly as written (``1e-4`` included: LF reads it as a float).
- ``template`` must be one LF 0.9.5 registers (``TEMPLATE_NAMES``, shipped as data).
- Keys that change memory in ways the estimate does not model warn in ``plan --json``,
  only when set to something other than LF's default.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_dsplan

BASE = "model_name_or_path: Llama-3-8B\ndo_train: true\n"


def _yaml(tmp_path, extra: str):
    path = tmp_path / "lf.yaml"
    path.write_text(BASE + extra, encoding="utf-8")
    return path


def _one_line_exit_2(r, needle: str, out=None) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    if out is not None:
        assert not out.exists()


# ---------------------------------------------------------------- numbers: non-finite and absurd
@pytest.mark.parametrize("line, needle", [
    ("learning_rate: .nan", "learning_rate: must be a finite number, got nan"),
    ("learning_rate: .inf", "learning_rate: must be a finite number, got inf"),
    ("learning_rate: 1e400", "learning_rate: must be a finite number, got inf"),  # LF reads 1e400 as inf
    ("learning_rate: -1.0e-4", "learning_rate: must be at least 0"),
    ("learning_rate: 1e4", "learning_rate: must be at most 10"),
    ("learning_rate: nan", "learning_rate: expected number, got 'nan'"),
    ("learning_rate: true", "learning_rate: expected a number, got True"),
    ("num_train_epochs: .inf", "num_train_epochs: must be a finite number, got inf"),
    ("num_train_epochs: -.inf", "num_train_epochs: must be a finite number, got -inf"),
    ("num_train_epochs: .NaN", "num_train_epochs: must be a finite number, got nan"),
    ("num_train_epochs: 1.0e+12", "num_train_epochs: must be at most 1000000"),
    ("warmup_ratio: .nan", "warmup_ratio: must be a finite number, got nan"),
    ("warmup_ratio: 1.5", "warmup_ratio: must be at most 1"),
    ("warmup_ratio: -0.1", "warmup_ratio: must be at least 0"),
    ("save_steps: .nan", "save_steps: must be a finite number, got nan"),
    ("save_steps: -5", "save_steps: must be at least 0"),
    ("save_steps: '500'", "save_steps: expected number, got '500'"),
    ("preprocessing_num_workers: 0", "preprocessing_num_workers: must be at least 1"),
    ("preprocessing_num_workers: 4.0", "preprocessing_num_workers: expected int, got 4.0"),
    ("video_fps: .inf", "video_fps: must be a finite number, got inf"),
    ("video_max_pixels: 0", "video_max_pixels: must be at least 1"),
])
def test_non_finite_or_absurd_numbers_are_one_line(tmp_path, line, needle):
    out = tmp_path / "out"
    r = run_dsplan("render", str(_yaml(tmp_path, line + "\n")), "--gpus", "1x80G", "-o", str(out))
    _one_line_exit_2(r, needle, out)


def test_plan_refuses_nan_learning_rate_too(tmp_path):
    r = run_dsplan("plan", str(_yaml(tmp_path, "learning_rate: .nan\n")), "--gpus", "1x80G", "--json")
    _one_line_exit_2(r, "learning_rate: must be a finite number")
    assert r.stdout == ""


# ---------------------------------------------------------------- numbers: valid values render as written
@pytest.mark.parametrize("extra, want", [
    ("learning_rate: 1e-4\nnum_train_epochs: 3.0\nsave_steps: 500\nwarmup_ratio: 0.1\n",
     ["learning_rate: 1e-4", "num_train_epochs: 3.0", "save_steps: 500", "warmup_ratio: 0.1"]),
    ("learning_rate: 2.0e-5\nnum_train_epochs: 2\nsave_steps: 0.25\nwarmup_ratio: 0\n",
     ["learning_rate: 2.0e-05", "num_train_epochs: 2", "save_steps: 0.25", "warmup_ratio: 0"]),
    ("learning_rate: 5.0e-6\nnum_train_epochs: 0.5\npreprocessing_num_workers: 16\n",
     ["learning_rate: 5.0e-06", "num_train_epochs: 0.5", "preprocessing_num_workers: 16"]),
])
def test_valid_numbers_render_exactly_as_before(tmp_path, extra, want):
    out = tmp_path / "out"
    r = run_dsplan("render", str(_yaml(tmp_path, extra)), "--gpus", "1x80G", "--tier", "zero2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = (out / "lf_zero2.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    for line in want:
        assert line in lines, (line, text)
    rendered = yaml.safe_load(text)
    written = yaml.safe_load(BASE + extra)
    assert {k: rendered[k] for k in written} == written
    assert not [k for k in written if f"{k}: " in r.stdout], r.stdout  # no change reported for the user's values


def test_defaults_still_render(tmp_path):
    out = tmp_path / "out"
    r = run_dsplan("render", str(_yaml(tmp_path, "")), "--gpus", "1x80G", "--tier", "zero2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    lines = (out / "lf_zero2.yaml").read_text(encoding="utf-8").splitlines()
    for line in ("learning_rate: 0.0001", "num_train_epochs: 3.0", "save_steps: 500", "warmup_ratio: 0.1"):
        assert line in lines, line


# ---------------------------------------------------------------- template
@pytest.mark.parametrize("args, needle", [
    (["--template", "nonexist"], "LLaMA-Factory 0.9.5 has no template 'nonexist'"),
    (["--template", "qwen22"], "LLaMA-Factory 0.9.5 has no template 'qwen22' (did you mean qwen?)"),
    (["--template", "llama-3"], "(did you mean llama3?)"),
])
def test_unknown_template_flag_is_one_line(args, needle):
    r = run_dsplan("plan", "--gpus", "1x24G", "--model", "Qwen1.5-7B", *args)
    _one_line_exit_2(r, needle)
    assert r.stdout == ""


def test_unknown_template_in_the_yaml_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = run_dsplan("render", str(_yaml(tmp_path, "template: qwen22\n")), "--gpus", "1x80G", "-o", str(out))
    _one_line_exit_2(r, "LLaMA-Factory 0.9.5 has no template 'qwen22' (did you mean qwen?)", out)


@pytest.mark.parametrize("extra, want", [
    ("template: qwen3_nothink\n", "template: qwen3_nothink"),
    ("template: null\n", "template: llama3"),  # unset: the model's own
    ("", "template: llama3"),
])
def test_known_or_unset_template_plans(tmp_path, extra, want):
    out = tmp_path / "out"
    r = run_dsplan("render", str(_yaml(tmp_path, extra)), "--gpus", "1x80G", "--tier", "zero2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert want in (out / "lf_zero2.yaml").read_text(encoding="utf-8").splitlines()


def test_template_names_are_shipped_as_data():
    from dsplan.schema.lf_names import TEMPLATE_NAMES
    from tests.test_catalog import LF_095_TEMPLATES

    assert list(TEMPLATE_NAMES) == sorted(set(TEMPLATE_NAMES))
    assert LF_095_TEMPLATES <= set(TEMPLATE_NAMES)
    assert {"default", "empty", "qwen", "llama3", "qwen3_nothink"} <= set(TEMPLATE_NAMES)


@pytest.mark.real
def test_template_names_equal_the_installed_lf_templates():
    from llamafactory.data.template import TEMPLATES

    from dsplan.schema.lf_names import TEMPLATE_NAMES

    assert set(TEMPLATE_NAMES) == set(TEMPLATES)


# ---------------------------------------------------------------- keys the estimate does not model
NEW_UNMODELLED = {  # key: (a value other than LF's default, LF's default)
    "video_max_pixels": (16384, 256 * 256),
    "video_fps": (1.0, 2.0),
    "video_maxlen": (256, 128),
    "audio_sampling_rate": (8000, 16000),
    "use_reentrant_gc": (False, True),
    "upcast_layernorm": (True, False),
    "use_audio_in_video": (True, False),
    "image_do_pan_and_scan": (True, False),
    "crop_to_patches": (True, False),
    "use_asft_loss": (True, False),
}


def _warnings(tmp_path, user: dict) -> list[str]:
    path = tmp_path / "lf.yaml"
    path.write_text(BASE + (yaml.safe_dump(user) if user else ""), encoding="utf-8")
    r = run_dsplan("plan", str(path), "--gpus", "1x80G", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["warnings"]


def _unmodelled(warnings: list[str]) -> set[str]:
    return {w.split(":")[0] for w in warnings if w.endswith(": not modelled by dsplan's estimate")}


def test_non_default_unmodelled_keys_warn(tmp_path):
    user = {k: changed for k, (changed, _default) in NEW_UNMODELLED.items()}
    assert _unmodelled(_warnings(tmp_path, user)) == set(NEW_UNMODELLED)


def test_unmodelled_keys_at_lf_s_default_do_not_warn(tmp_path):
    user = {k: default for k, (_changed, default) in NEW_UNMODELLED.items()}
    user["video_fps"] = 2  # LF's 2.0, written as an integer
    assert _warnings(tmp_path, user) == []
    assert _warnings(tmp_path, {}) == []


@pytest.mark.parametrize("key", ["use_reentrant_gc", "video_max_pixels", "upcast_layernorm"])
def test_each_named_key_warns_alone(tmp_path, key):
    assert _unmodelled(_warnings(tmp_path, {key: NEW_UNMODELLED[key][0]})) == {key}


def test_the_older_unmodelled_keys_still_warn(tmp_path):
    assert _unmodelled(_warnings(tmp_path, {"shift_attn": True, "upcast_lmhead_output": True})) == {
        "shift_attn", "upcast_lmhead_output"}

"""User errors: one line on stderr, exit code 2, nothing written."""

import json
import sys

import pytest
import yaml

from tests.conftest import run_dsplan


def assert_user_error(r, out, needle):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("gpus", ["8x", "eightx64G", "8x64", "0x80G", "8x64Q", "2x2x2x2G"])
def test_bad_gpus(tmp_path, model_dir, gpus):
    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", gpus, "--model", str(model_dir), "-o", str(out))
    assert_user_error(r, out, "--gpus")


def test_unknown_tier(tmp_path, model_dir):
    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", "8x64G", "--model", str(model_dir), "--tier", "zero4", "-o", str(out))
    assert_user_error(r, out, "unknown tier")


def test_missing_model_folder(tmp_path):
    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", "8x64G", "--model", str(tmp_path / "no-such-model"), "-o", str(out))
    assert_user_error(r, out, "does not exist")


@pytest.mark.parametrize("text,needle", [
    ("model_name_or_path: [unclosed\n", "malformed YAML"),
    ("key: value\n  bad indent: x\n", "malformed YAML"),
    ("- just\n- a list\n", "malformed YAML"),
    ("finetuning_type: lorra\n", "finetuning_type"),
    ("per_device_train_batch_size: two\n", "per_device_train_batch_size"),
])
def test_malformed_yaml(tmp_path, model_dir, text, needle):
    user = tmp_path / "u.yaml"
    user.write_text(text)
    out = tmp_path / "out"
    r = run_dsplan("render", str(user), "--gpus", "8x64G", "--model", str(model_dir), "-o", str(out))
    assert_user_error(r, out, needle)


def test_missing_gpus_and_model(tmp_path, model_dir):
    out = tmp_path / "out"
    assert_user_error(run_dsplan("render", "--model", str(model_dir), "-o", str(out)), out, "--gpus")
    assert_user_error(run_dsplan("render", "--gpus", "1x24G", "-o", str(out)), out, "--model")


def test_click_usage_errors_are_one_line(tmp_path):
    out = tmp_path / "out"
    assert_user_error(run_dsplan("render", "--gpus", "8x64G", "--bogus", "-o", str(out)), out, "--bogus")
    assert_user_error(run_dsplan("render", "--gpus", "8x64G", "--backend", "metal", "-o", str(out)), out,
                      "--backend")
    assert_user_error(run_dsplan("render", "--gpus", "8x64G", "--micro-batch", "0", "-o", str(out)), out,
                      "--micro-batch")


def test_unwritable_output_folders_are_one_line(tmp_path, model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub"
    r = run_dsplan("render", "--gpus", "8x64G", "--model", str(model_dir), "-o", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_dsplan("run", "--gpus", "8x64G", "--model", str(model_dir), "--run-dir", str(out),
                   "--lf-cli", sys.executable)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_broken_config_and_manifest_are_one_line(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 0, "intermediate_size": 8,
                                               "num_hidden_layers": 2, "vocab_size": 10}))
    out = tmp_path / "out"
    assert_user_error(run_dsplan("render", "--gpus", "1x24G", "--model", str(m), "-o", str(out)), out, "zero")
    assert_user_error(run_dsplan("render", "--gpus", "1x24G", "--model", str(m / "config.json.bak"), "-o",
                                 str(out)), out, "does not exist")
    d = tmp_path / "rendered"
    d.mkdir()
    (d / "dsplan.json").write_text("[1, 2]")
    r = run_dsplan("validate", str(d))
    assert r.returncode == 2 and "not a dsplan manifest" in r.stderr and "Traceback" not in r.stderr


def test_full_method_drops_quantization_from_the_users_yaml(tmp_path, model_dir):
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"finetuning_type": "full", "quantization_bit": 4, "dataset": "d"}))
    out = tmp_path / "out"
    r = run_dsplan("render", str(user), "--gpus", "8x80G", "--model", str(model_dir), "--tier", "zero3", "-o",
                   str(out))
    assert r.returncode == 0, r.stderr
    lf = yaml.safe_load((out / "lf_zero3.yaml").read_text())
    assert lf["finetuning_type"] == "full" and "quantization_bit" not in lf
    assert "quantization_bit: 4 -> removed" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--headroom", "nan"], "finite"),
    (["--headroom", "0.5"], "--headroom"),
    (["--cutoff-len", "99999999999999999999"], "1<=x<=10000000"),
    (["--lora-rank", "1e19"], "1<=x<=65536"),
    (["--micro-batch", "1000000000"], "1<=x<=1000000"),
    (["--micro-batch", "9" * 5000], "--micro-batch"),
])
def test_numbers_are_range_checked_in_one_short_line(args, needle):
    r = run_dsplan("plan", "--gpus", "8x64G", "--model", "Qwen2.5-0.5B", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and len(r.stderr) < 300


def test_dry_run_with_absurd_gpu_count_is_one_line():
    r = run_dsplan("run", "--dry-run", "--gpus", "100000000x80G", "--model", "Qwen2.5-0.5B", timeout=60)
    assert r.returncode == 2 and "at most 64 GPUs per node" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("text,needle", [
    ('"a\\nb": 1\n', "not a plain identifier"),
    ("? " + "k" * 1100 + "\n: 1\n", "not a plain identifier"),
    ("a: &x [1]\nb: *x\n", "anchors"),
    ("x: " + "[" * 3000 + "]" * 3000 + "\n", "nest"),
    ("x:\n" + "".join("  " * i + "- \n" for i in range(80)), "nested deeper than 64"),
    ("cutoff_len: " + "9" * 5000 + "\n", "an integer of 5000 characters"),
    ("freeze_trainable_layers: 100000\n", "at most 10000"),
    ("learning_rate: 1\nlogging_steps: .nan\n", "finite"),
])
def test_hostile_yaml_is_one_line(tmp_path, text, needle):
    user = tmp_path / "u.yaml"
    user.write_text(text)
    out = tmp_path / "out"
    r = run_dsplan("render", str(user), "--gpus", "8x64G", "--model", "Qwen2.5-0.5B", "-o", str(out))
    assert_user_error(r, out, needle)


def test_unicode_line_breaks_in_values_round_trip(tmp_path):
    user = tmp_path / "u.yaml"
    values = {"dataset": "a\x85b", "run_name": "x\u2028y\u2029z", "dataset_dir": "caf\u00e9\x0b"}
    user.write_text(yaml.safe_dump(values, allow_unicode=False))
    out = tmp_path / "out"
    r = run_dsplan("render", str(user), "--gpus", "8x64G", "--model", "Qwen2.5-0.5B", "--tier", "zero2",
                   "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = (out / "lf_zero2.yaml").read_text(encoding="utf-8")
    lf = yaml.safe_load(text)
    assert {k: lf[k] for k in values} == values
    assert all(ch not in text for ch in "\x85\u2028\u2029\x0b")


def test_model_folder_with_a_control_character_writes_nothing(tmp_path):
    model = tmp_path / "Qwen\x01small"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                   "intermediate_size": 8, "num_hidden_layers": 2,
                                                   "vocab_size": 10}))
    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", "1x24G", "--model", str(model), "-o", str(out))
    assert_user_error(r, out, "contains the character")
    assert not out.exists()


def test_a_failed_write_leaves_no_partial_output(tmp_path):
    from dsplan.errors import UserError
    from dsplan.fsutil import write_new_files

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    files = {tmp_path / "out" / "a.json": "{}", blocker / "b.yaml": "x: 1\n"}
    with pytest.raises(UserError):
        write_new_files(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
    with pytest.raises(UserError, match="UTF-8"):
        write_new_files({tmp_path / "out" / "a.json": "{}", tmp_path / "out" / "b.yaml": "\udcff"})
    assert not (tmp_path / "out").exists()
    written = write_new_files({tmp_path / "out" / "sub" / "a.json": "{}", tmp_path / "out" / "b.yaml": "x\n"})
    assert len(written) == 2 and not [p for p in (tmp_path / "out").rglob(".*.tmp")]

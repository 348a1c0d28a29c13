"""User errors: one line on stderr, exit code 2, nothing written."""

import pytest

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

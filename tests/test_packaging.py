"""`pip install .` (not editable) finds the templates and presets: they ship inside the wheel."""

import os
import subprocess
import sys
import zipfile

from tests.conftest import REPO


def test_wheel_ships_templates_and_presets_and_renders(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("dsplan-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dsplan/templates/deepspeed.json.j2" in names and "dsplan/templates/llamafactory.yaml.j2" in names
    assert "dsplan/presets/hygon-k100-8x64g.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", "import dsplan, sys; print(dsplan.__file__); from dsplan.cli import main; "
                        "sys.argv = ['dsplan', 'render', '--preset', 'hygon-k100-8x64g', '--model', "
                        f"'Qwen2.5-7B', '-o', {str(out)!r}]; main()"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith(str(site))  # the installed copy, not the checkout
    assert (out / "ds_zero3_offload.json").is_file() and (out / "lf_zero2.yaml").is_file()

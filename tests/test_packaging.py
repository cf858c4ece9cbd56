"""The wheel is what a user without the checkout gets: it must hold every shipped file (the demo's
model and tasks, the example RunConfigs, the DeepSpeed templates, the planner's architectures), and
the demo config and the templates must resolve from an installed copy run in another folder.

The expected file list comes from git (what the checkout tracks), not from setup.py's package_data.
"""

import json
import subprocess
import sys
import zipfile

from distributed import REPO

SHIPPED = ("mtpeft/configs", "mtpeft/ds_configs", "mtpeft/assets", "mtpeft/profile/archs")


def _tracked(folder: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _build_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mtpeft-*.whl")
    return wheel


def test_wheel_holds_every_shipped_file_and_works_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in SHIPPED:
        tracked = _tracked(folder)
        assert tracked, folder
        assert tracked <= names, f"missing from the wheel: {sorted(tracked - names)[:5]}"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = (
        "import json, mtpeft\n"
        "from mtpeft.config import load_config\n"
        "from mtpeft.trainer.ds_config import build_ds_config, template_path\n"
        "cfg = load_config('demo', ['deepspeed.config=zero3'])\n"
        "print(json.dumps({'package': mtpeft.__file__, 'model': cfg.model.name_or_path,\n"
        "                  'train': cfg.tasks[0].train, 'template': str(template_path('zero3_offload_cpu')),\n"
        "                  'stage': build_ds_config(cfg, 2)['zero_optimization']['stage']}))\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("package", "model", "train", "template"):
        assert got[key].startswith(str(site)), (key, got[key])
    assert got["stage"] == 3
    assert (site / "mtpeft/assets/demo/base_model/model.safetensors").is_file()

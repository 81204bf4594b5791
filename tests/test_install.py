"""A non-editable install is whole: shipped configs, schemas and the demo install as package data,
and the commands work from any folder (a wheel built from this checkout, installed into a folder
of its own; the venv's packages serve its dependencies)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(command, **options) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **options)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("install")
    skip = {".venv", ".git", "build", "runs", "data", "hemcap.egg-info"}  # a clean tree: no stale build/ files
    shutil.copytree(REPO, root / "src", ignore=lambda folder, names: skip & set(names) if folder == str(REPO) else [])
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", root / "wheel",
         root / "src"])
    (wheel,) = (root / "wheel").glob("hemcap-*.whl")
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", root / "site", wheel])
    env = {**os.environ, "PYTHONPATH": str(root / "site"), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    (root / "elsewhere").mkdir()
    return root, env


@pytest.mark.slow
def test_every_package_and_data_file_is_installed(installed):
    root, env = installed
    packages = ["hemcap." + p.name for p in (REPO / "hemcap").iterdir() if (p / "__init__.py").is_file()]
    code = ("import importlib, hemcap, hemcap.config as c, hemcap.schema as s\n"
            f"[importlib.import_module(p) for p in {packages!r}]\n"
            "print(hemcap.__file__); print(sorted(c.shipped_configs())); print(s.available_schemas())\n"
            "from hemcap.demo import app; print(len(app.EXAMPLES), all((app.EXAMPLES_DIR / n).is_file() "
            "for n, _ in app.EXAMPLES))")
    lines = run([sys.executable, "-c", code], env=env, cwd=root / "elsewhere").splitlines()
    assert lines[0].startswith(str(root / "site")), "imported the installed copy, not the checkout"
    assert eval(lines[1]) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert eval(lines[2]) == sorted(p.stem for p in (REPO / "data_recipes").glob("*.yaml"))
    assert lines[3].split()[1] == "True", "the demo's example images are installed"


@pytest.mark.slow
def test_commands_work_from_any_folder(installed):
    root, env = installed
    hemcap = [sys.executable, "-m", "hemcap.cli"]
    assert "--data-dir" in run([*hemcap, "quickstart", "--help"], env=env, cwd=root / "elsewhere")
    assert "--host" in run([*hemcap, "demo", "--help"], env=env, cwd=root / "elsewhere")
    assert "--config" in run([root / "site" / "bin" / "hemcap", "train", "--help"], env=env, cwd=root / "elsewhere")
    out = run([*hemcap, "train", "--config", "blip_tiny", "--set", "train.max_steps=2", "--set", "train.eval_every=null"],
              env=env, cwd=root / "elsewhere")
    assert "model written to runs/blip_tiny/model" in out
    assert (root / "elsewhere" / "runs" / "blip_tiny" / "model" / "hemcap_model.json").is_file()

"""The built wheel carries its config tree: installed outside the checkout, it composes the demo experiment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_an_installed_wheel_composes_its_own_configs_from_another_folder(tmp_path: Path) -> None:
    project = tmp_path / "project"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(project)]
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("dgnetpp_pl-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)

    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "DGNETPP_DATA")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    where = "import dgnetpp_pl.config as c; print(c.__file__); print(c.CONF_DIR)"
    probe = subprocess.run([sys.executable, "-c", where], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    module_file, conf_dir = (Path(line) for line in probe.stdout.split())
    assert module_file.is_relative_to(site) and conf_dir.is_relative_to(site)
    assert (conf_dir / "experiment" / "demo.yaml").is_file()

    cmd = [sys.executable, "-m", "dgnetpp_pl", "--cfg", "job", "experiment=demo"]
    job = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "task_name: demo" in job.stdout and "name: dgnetpp_small" in job.stdout
    assert not list(elsewhere.iterdir()), "composing the config writes nothing"

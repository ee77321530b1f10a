"""`pip install .` users: the wheel carries what the CLI needs, and `vclr demo` runs from any directory."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import REPO_ROOT


def _run(argv, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, argv))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_offline_and_runs_the_demo_outside_the_repo(tmp_path):
    # build from a copy of the sources: a build in the checkout would leave build/ and *.egg-info there
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "vclr", source / "vclr", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(wheels), str(source)])
    wheel = next(wheels.glob("vclr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"vclr/configs/demo.yaml", "vclr/model/configs/vclr-tiny-rn.json", "vclr/cli/main.py",
            "vclr/serve/static/index.html", "vclr/serve/static/page.js", "vclr/serve/static/page.css"} <= names

    # a fresh venv that reuses the dependencies installed here (offline), and gets vclr from the wheel only
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])  # no packages of its own, not even pip
    python = venv / "bin" / "python"
    site_packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    reused = tmp_path / "reused"  # this environment's packages, as links, less its own (editable) vclr
    reused.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("vclr", "__editable__")):
            (reused / entry.name).symlink_to(entry)
    with open(os.path.join(site_packages.strip(), "reuse_installed.pth"), "w") as f:
        f.write(f"{reused}\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--find-links",
          str(wheels), "vclr"])  # resolves every dependency against the reused packages: nothing is fetched

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([str(python), "-c", "import vclr; print(vclr.__file__)"], cwd=elsewhere, env=env).stdout
    assert where.startswith(str(venv)), where
    demo = _run([str(venv / "bin" / "vclr"), "-q", "demo", "--out", "demo", "--train-images", "200",
                 "--test-images", "40", "optim.max_steps=3", "optim.warmup_steps=1", "train.checkpoint_every=3",
                 "loss.triplet_warmup_steps=1", "data.batch_size=32"], cwd=elsewhere, env=env)
    assert "demo finished" in demo.stdout
    assert (elsewhere / "demo" / "eval.json").is_file() and (elsewhere / "demo" / "run" / "model.safetensors").is_file()

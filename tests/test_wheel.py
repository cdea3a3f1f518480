"""A built wheel is the whole program: installed into a folder of its own (not this editable
checkout), `python -m tinyreason.train debug=fast` runs from an empty directory, configs
included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_repo(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools writes build/ next to what it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("tinyreason", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation",
        "-q", "-w", wheels, cwd=tmp_path)  # fmt: skip
    [wheel] = wheels.glob("tinyreason-*.whl")
    # The wheel alone in a folder of its own, first on the path of this interpreter: its
    # dependencies are this venv's (the ones `make test` just resolved from the same
    # pyproject.toml), the code and configs the wheel's. A fresh venv resolving every dependency
    # again took ~3 of the suite's minutes and tested pip, not the wheel.
    env_dir = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
        "--target", env_dir, wheel, cwd=tmp_path)  # fmt: skip
    python = sys.executable
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TINYREASON_CACHE")}
    env = {**clean, "WANDB_MODE": "offline", "PYTHONPATH": str(env_dir)}
    where = run(
        python, "-c", "import tinyreason.compose as c; print(c.CONF_DIR)", cwd=empty, env=env
    )
    conf_dir = Path(where.strip().splitlines()[-1])
    assert conf_dir.is_relative_to(env_dir), conf_dir  # the installed copy, not the checkout
    assert (conf_dir / "train.yaml").is_file() and (conf_dir / "debug" / "data").is_dir()
    out = run(python, "-m", "tinyreason.train", "debug=fast", "logger=csv", cwd=empty, env=env)
    assert "done: 10 steps" in out, out[-3000:]
    assert list((empty / "outputs").rglob("last.ckpt")), "no checkpoint written"
    assert list((empty / "outputs").rglob("hf/config.json")), "no HF export written"

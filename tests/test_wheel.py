"""The package works outside the repository: the built wheel, installed into a fresh virtual environment, answers
--help and trains a tiny stage from a directory outside the checkout, with the configs it ships.

Offline and quick: the wheel is built from a copy of the sources without build isolation (setuptools of this
environment, a dev dependency), installed with ``--no-deps --no-index`` into a new venv, and the dependencies
(torch, transformers, ...) come from this environment's site-packages through a ``.pth`` file: the venv sees them,
but not the checkout (no editable finder, no repository on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _outside_env() -> dict[str, str]:
    """The environment of a user outside the repository: no PYTHONPATH to the checkout, W&B off, one thread."""
    return {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def _run(
    cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 600
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the wheel (the dependencies reached through a .pth file); returns its bin folder."""
    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without the `wheel` package
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # 1. the wheel, built from a copy of the sources: the checkout gets no build/ or egg-info
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "configs", src / "configs", ignore=ignore)
    shutil.copytree(REPO / "videollama3_train", src / "videollama3_train", symlinks=True, ignore=ignore)
    dist = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(dist), str(src)],
        cwd=tmp,
        env=env,
    )
    (wheel,) = dist.glob("videollama3_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (
        "train.yaml",
        "pipeline.yaml",
        "report.yaml",
        "model/tiny.yaml",
        "data/file.yaml",
        "deepspeed/zero3.json",
    ):
        assert f"videollama3_train/configs/{f}" in names, f
    # 2. a fresh venv with the wheel alone; torch & co. from this environment's site-packages
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    purelib = _run(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=tmp,
        env=env,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_base_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(bin_dir / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
        ]
        + [str(wheel)],
        cwd=tmp,
        env=env,
    )
    return bin_dir


def test_installed_package_finds_its_own_configs(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import json, videollama3_train, videollama3_train.paths as p;"
        "print(json.dumps([videollama3_train.__file__, str(p.CONFIG_DIR), str(p.DEEPSPEED_CONFIG_DIR)]))"
    )
    out = _run([str(installed / "python"), "-c", code], cwd=tmp_path, env=env).stdout
    module, config_dir, deepspeed = (Path(x) for x in json.loads(out))
    venv = installed.parent
    assert venv in module.parents and REPO not in module.parents
    assert config_dir == module.parent / "configs" and (config_dir / "train.yaml").is_file()
    assert sorted(p.name for p in deepspeed.glob("zero*.json")) == ["zero1.json", "zero2.json", "zero3.json"]
    # the default of trainer.deepspeed_config_dir is the installed copy (checked before anything is built)
    code = (
        "from videollama3_train.config import compose; from videollama3_train.rundir import check_weights;"
        "from videollama3_train.trainer.deepspeed import config_path;"
        "cfg = compose('train', ['output_dir=o', 'trainer.backend=zero2']); check_weights(cfg);"
        "print(config_path(cfg.trainer).parent)"
    )
    out = _run([str(installed / "python"), "-c", code], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1]
    assert Path(out) == deepspeed
    for command in ("train", "pipeline", "doctor", "prepare", "export", "report"):
        proc = _run([str(installed / f"vl3-{command}"), "--help"], cwd=tmp_path, env=env, timeout=120)
        assert proc.stdout.startswith(f"usage: vl3-{command}"), proc.stdout


def test_installed_train_runs_outside_the_repo(installed: Path, tmp_path: Path) -> None:
    from test_sample_data import gen

    data = tmp_path / "my_data"
    gen.generate(data, seed=5, n_train=16, n_heldout=4)
    work = tmp_path / "work"
    work.mkdir()
    env = _outside_env()
    proc = _run(
        [
            str(installed / "vl3-train"),
            "stage=alignment",
            "model=tiny",
            "data=file",
            "data.path=../my_data/train.jsonl",  # relative paths resolve against the working directory
            "data.root=../my_data",
            "trainer.max_steps=2",
            "logger=disabled",
            "output_dir=out",
        ],
        cwd=work,
        env=env,
        timeout=800,
    )
    assert "[alignment] done at step 2" in proc.stdout, proc.stdout[-3000:]
    out = work / "out"
    assert (out / "export" / "config.json").is_file() and (out / "run.json").is_file()
    assert (out / "train.log").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # nothing else written to the working directory


def test_installed_sweep_on_a_user_mixture(installed: Path, tmp_path: Path) -> None:
    """Hydra as its users know it, from the installed package: ``-m`` over a comma list gives one complete run
    directory per job under the sweep's folder, each training a mixture kept in the user's own config folder
    (``--config-dir``) with a recipe derived from a shipped stage."""
    from test_hydra import write_user_configs
    from test_sample_data import gen

    for name, seed in (("a", 5), ("b", 6)):
        gen.generate(tmp_path / name, seed=seed, n_train=8, n_heldout=2)
    myconf = write_user_configs(tmp_path / "myconf", tmp_path / "a", tmp_path / "b")
    work = tmp_path / "work"
    work.mkdir()
    env = _outside_env()
    proc = _run(
        [
            str(installed / "vl3-train"),
            "-m",
            "--config-dir",
            str(myconf),
            "data=mine",
            "stage=short_align",
            "model=tiny",
            "trainer.max_steps=1,2",
            "logger=disabled",
            "output_dir=sweep",
        ],
        cwd=work,
        env=env,
        timeout=800,
    )
    sweep = work / "sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_trainer.max_steps=1", "1_trainer.max_steps=2"], proc.stdout[-3000:]
    for job, steps in zip(jobs, (1, 2), strict=True):
        run = sweep / job
        for f in ("run.json", "results.json", "train.log", "metrics.jsonl", "export/config.json"):
            assert (run / f).is_file(), (job, f)
        assert json.loads((run / "results.json").read_text())["final"]["step"] == steps
        assert f"[alignment] done at step {steps}: export {run}/export" in proc.stdout
        resolved = json.loads((run / "resolved_config.json").read_text())
        assert set(resolved["data"]["datasets"]) == {"first", "second"}
    assert (sweep / "multirun.yaml").is_file()
    assert sorted(p.name for p in work.iterdir()) == [
        "sweep"
    ]  # nothing else written to the working directory

"""Hydra as its users know it, without training: a user's config folder (--config-dir, hydra.searchpath) composes
with the shipped configs, -m expands sweeps as Hydra does, --cfg job|hydra|all and --resolve print, and every
mistake stays one line. The installed wheel runs a real 2-job sweep on a user mixture (tests/test_wheel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_first_day import _short, cli

import videollama3_train.train as train_command
from videollama3_train.cli import parse_args, plan_sweep

TRAIN = train_command.COMMAND  # the command module itself: tests may import a command, not its names


def write_user_configs(folder: Path, first: Path, second: Path) -> Path:
    """A user's config folder: a mixture of two sample folders and a recipe derived from a shipped stage."""
    (folder / "data").mkdir(parents=True)
    (folder / "stage").mkdir()
    (folder / "data" / "mine.yaml").write_text(
        "name: mine\n"
        "datasets:\n"
        f"  first: {{path: {first / 'train.jsonl'}, root: {first}, weight: 0.5}}\n"
        f"  second: {{path: {second / 'train.jsonl'}, root: {second}, weight: 0.5}}\n"
    )
    (folder / "stage" / "short_align.yaml").write_text(
        "# @package _global_\ndefaults:\n  - alignment\n  - _self_\ntrainer:\n  max_steps: 3\n"
    )
    return folder


@pytest.fixture
def user_configs(tmp_path: Path) -> Path:
    return write_user_configs(tmp_path / "myconf", tmp_path / "a", tmp_path / "b")


def test_user_config_folder_composes_with_the_shipped_configs(capsys, user_configs: Path, tmp_path: Path):
    out = f"output_dir={tmp_path / 'o'}"
    for how in (["--config-dir", str(user_configs)], [f"hydra.searchpath=[file://{user_configs}]"]):
        code, text, err = cli(capsys, "train", *how, "--cfg", "data=mine", "stage=short_align", out)
        assert code == 0, err
        # the user's mixture, and the shipped alignment recipe under the user's change
        assert "first:" in text and "second:" in text and "weight: 0.5" in text
        assert "stage: alignment" in text and "max_steps: 3" in text
    # without the folder the option is unknown, as before: one line naming the choices
    code, _, err = cli(capsys, "train", "data=mine", out)
    assert code == 1 and "data=mine: no such data config" in _short(err)[0]
    code, _, err = cli(capsys, "train", "--config-dir", str(tmp_path / "nope"), out)
    assert code == 1 and "no such folder" in _short(err)[0]


def test_pipeline_stages_see_the_user_folder(user_configs: Path, tmp_path: Path):
    """The folder travels with the overrides: the pipeline composes each stage with it."""
    from videollama3_train.config import compose_stage

    args = parse_args(TRAIN, ["--config-dir", str(user_configs), "data=mine", f"output_dir={tmp_path}"])
    cfg = compose_stage("video_finetune", args.overrides, tmp_path / "4_video_finetune")
    assert set(cfg.data.datasets) == {"first", "second"}


def test_sweep_expands_as_hydra(tmp_path: Path):
    args = parse_args(
        TRAIN, ["-m", "trainer.lr_llm=1e-5,2e-5", "trainer.seed=range(2)", f"output_dir={tmp_path}"]
    )
    folder, jobs, fixed = plan_sweep(TRAIN, args.overrides)
    assert args.multirun and folder == str(tmp_path) and fixed == ["output_dir"]
    assert [j[:2] for j in jobs] == [
        ["trainer.lr_llm=1e-05", "trainer.seed=0"],
        ["trainer.lr_llm=1e-05", "trainer.seed=1"],
        ["trainer.lr_llm=2e-05", "trainer.seed=0"],
        ["trainer.lr_llm=2e-05", "trainer.seed=1"],
    ]


def test_sweep_cfg_prints_every_job(capsys, tmp_path: Path):
    code, out, err = cli(
        capsys, "train", "-m", "--cfg", "job", "trainer.max_steps=1,2", f"output_dir={tmp_path}"
    )
    assert code == 0, err
    assert out.count("# job ") == 2 and "max_steps: 1" in out and "max_steps: 2" in out
    assert not any(tmp_path.iterdir())  # nothing ran


def test_cfg_kinds(capsys, tmp_path: Path):
    out_dir = f"output_dir={tmp_path}"
    code, out, _ = cli(capsys, "train", "--cfg", "hydra", out_dir)
    assert code == 0 and out.startswith("hydra:") and "trainer:" not in out
    code, out, _ = cli(capsys, "train", "--cfg", "all", "--resolve", out_dir)
    assert code == 0 and "hydra:" in out and "trainer:" in out
    code, out, _ = cli(capsys, "train", "--cfg=job", out_dir)
    assert code == 0 and "hydra:" not in out and "trainer:" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-m", "trainer.max_steps=1,2"], "a sweep needs output_dir=DIR"),
        (["-m", "trainer.max_steps=1", "output_dir=/tmp/x"], "nothing to sweep"),
        (["-m", "output_dir=/tmp/a,/tmp/b", "trainer.max_steps=1,2"], "output_dir cannot be swept"),
        (["-m", "trainer.max_steps=1,abc", "output_dir=/tmp/x"], "sweep job 1 (trainer.max_steps=abc)"),
        (["hydra/launcher=basic", "output_dir=/tmp/x"], "configures a sweep: add -m"),
        (["--cfg", "jobs", "output_dir=/tmp/x"], "--cfg jobs: choose job, hydra or all"),
        (["hydra.job.chdir=true", "output_dir=/tmp/x"], "hydra.* settings are not used"),
    ],
)
def test_sweep_mistakes_are_one_line(capsys, args: list[str], expected: str):
    code, _, err = cli(capsys, "train", *args)
    assert code == 1 and expected in _short(err)[0], err

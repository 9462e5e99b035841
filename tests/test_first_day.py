"""A user's first day: every mistake fails at start, in a line or two naming it; run directories are never
clobbered; every command answers --help.

Most mistakes go through the commands' own entry point in this process (``<command>.main(argv)``: what the
console scripts and ``python -m`` call), which is fast; one goes through a fresh ``python -m`` process, one
through ``torchrun --nproc_per_node 2``. In every mistake test building the model raises (``model_build_raises``
here, ``tests/no_model.py`` in a fresh process): a mistake must be reported before the model (minutes to load at
full size) is built.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "pipeline", "doctor", "prepare", "export", "report")
NO_MODEL = str(REPO / "tests" / "no_model.py")


@pytest.fixture(autouse=True)
def model_build_raises(request, monkeypatch) -> None:
    """Building a model raises in every test here but those marked ``builds_model`` (a real run)."""
    if request.node.get_closest_marker("builds_model"):
        return
    from no_model import refuse
    from transformers import VideoLlama3ForConditionalGeneration

    monkeypatch.setattr(VideoLlama3ForConditionalGeneration, "__init__", refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from test_sample_data import gen

    out = tmp_path_factory.mktemp("data")
    gen.generate(out, seed=3, n_train=16, n_heldout=4)
    return out


def _data_args(data: Path) -> list[str]:
    return ["data=file", f"data.path={data / 'train.jsonl'}", f"data.root={data}", "logger=disabled"]


def cli(capsys, command: str, *args: str) -> tuple[int, str, str]:
    """``vl3-<command> <args>`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = importlib.import_module(f"videollama3_train.{command}").main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _short(err: str) -> list[str]:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, err
    assert "Traceback" not in err, err
    return lines


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------------------------
# 1. Nothing wrong succeeds
# ----------------------------------------------------------------------------------------------------------------


def test_data_file_without_path_fails(capsys, tmp_path: Path) -> None:
    """data=file's `path: ???` is not filled in by a schema default (it once trained on the bundled sample)."""
    code, _, err = cli(
        capsys, "train", "stage=alignment", "model=tiny", "data=file", f"output_dir={tmp_path / 'o'}"
    )
    assert code == 1
    (line,) = _short(err)
    assert "data.path is required" in line and "data.path=ANNOTATIONS" in line
    assert not (tmp_path / "o").exists()


def test_a_mixture_has_no_path_and_needs_none(data: Path, tmp_path: Path) -> None:
    from videollama3_train.config import compose

    cfg = compose(
        "train",
        [
            f"output_dir={tmp_path}",
            "data=file",
            f"+data.datasets={{extra:{{path:{data / 'train.jsonl'}}}}}",
            "data.path=null",
        ],
    )
    assert cfg.data.path is None and cfg.data.datasets["extra"].path == str(data / "train.jsonl")
    cfg = compose("train", [f"output_dir={tmp_path}", "data=mixture_example"])
    assert cfg.data.path is None and set(cfg.data.datasets) == {"images", "videos", "text"}


@pytest.mark.parametrize("command", ["train", "pipeline", "doctor", "prepare"])
def test_weights_without_model_choice_fail(capsys, tmp_path: Path, data: Path, command: str) -> None:
    """init_from without model= would train a real checkpoint with the tiny preset's lr x300 and 10 epochs."""
    stage = (
        [] if command == "pipeline" else ["stage=finetune" if command == "train" else "stage=video_finetune"]
    )
    extra = [f"encode.frame_cache_dir={tmp_path / 'cache'}"] if command == "prepare" else []
    code, _, err = cli(
        capsys,
        command,
        *stage,
        "init_from=/ckpt/X",
        *_data_args(data),
        *extra,
        f"output_dir={tmp_path / 'o'}",
    )
    assert code == 1
    lines = _short(err)
    assert "init_from=/ckpt/X needs model=" in lines[0] and "lr_scale=300" in lines[0]
    assert "model=videollama3_2b" in lines[1]


def test_finetune_stage_alone_needs_model(capsys, tmp_path: Path, data: Path) -> None:
    code, _, err = cli(capsys, "train", "stage=finetune", *_data_args(data), f"output_dir={tmp_path}")
    assert code == 1 and "stage=finetune needs model=" in err


def test_tiny_preset_never_reaches_a_real_checkpoint(capsys, tmp_path: Path, data: Path) -> None:
    """Even with model=tiny named: the checkpoint's shape is read and a full-size one is refused."""
    ckpt = tmp_path / "VideoLLaMA3-2B-HF"
    ckpt.mkdir()
    text = {"hidden_size": 1536, "num_hidden_layers": 28}
    (ckpt / "config.json").write_text(json.dumps({"model_type": "video_llama_3", "text_config": text}))
    (ckpt / "model.safetensors").write_bytes(b"")
    code, _, err = cli(
        capsys,
        "train",
        "stage=finetune",
        "model=tiny",
        f"init_from={ckpt}",
        *_data_args(data),
        f"output_dir={tmp_path / 'o'}",
    )
    assert code == 1
    lines = _short(err)
    assert "1536-wide, 28-layer LLM but model=tiny" in lines[0] and "lr_scale=300" in lines[0]
    assert "model=videollama3_2b" in lines[1]
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_whose_chat_template_differs_fails(capsys, tmp_path: Path, data: Path) -> None:
    """A checkpoint's tokenizer with a default system prompt in its chat template: inference would prompt the
    model otherwise than training; the run stops naming both renderings, before the model is built."""
    from videollama3_train.model.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer

    ckpt = tmp_path / "ckpt"
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{%- if messages[0]['role'] != 'system' -%}"
        "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
        + CHAT_TEMPLATE
    )
    tok.save_pretrained(ckpt)
    text = {"hidden_size": 128, "num_hidden_layers": 2}
    (ckpt / "config.json").write_text(json.dumps({"model_type": "video_llama_3", "text_config": text}))
    (ckpt / "model.safetensors").write_bytes(b"")
    args = [
        "stage=alignment",
        "model=tiny",
        f"init_from={ckpt}",
        *_data_args(data),
        f"output_dir={tmp_path / 'o'}",
    ]
    code, _, err = cli(capsys, "train", *args)
    assert code == 1 and "Traceback" not in err
    first, training, template = err[err.index("vl3-train: error:") :].strip().splitlines()
    assert "chat template renders the conversation of the probe 'text only' unlike training" in first
    assert (
        training
        == "training: '<|im_start|>user\\nWhat color is a banana?<|im_end|>\\n<|im_start|>assistant\\nBananas are yellow.<|im_end|>\\n'"
    )
    assert template.startswith(
        "template: '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user"
    )


def test_finetune_without_init_from_fails(capsys, tmp_path: Path, data: Path) -> None:
    code, _, err = cli(
        capsys, "train", "stage=finetune", "model=videollama3_2b", *_data_args(data), f"output_dir={tmp_path}"
    )
    assert code == 1 and "stage=finetune fine-tunes a released checkpoint: add init_from=DIR" in err


def _finished_run(out: Path, data: Path, *, stage: str = "alignment", max_steps: int = 2) -> None:
    """What a finished tiny run leaves (run.json, results, export, a checkpoint), without training one."""
    from videollama3_train.config import compose
    from videollama3_train.rundir import data_fingerprint, model_record

    cfg = compose(
        "train",
        [
            f"stage={stage}",
            "model=tiny",
            *_data_args(data),
            f"trainer.max_steps={max_steps}",
            f"output_dir={out}",
        ],
    )
    (out / "export").mkdir(parents=True)
    (out / "export" / "config.json").write_text("{}")
    (out / "checkpoints" / f"step-{max_steps:08d}").mkdir(parents=True)
    (out / "checkpoints" / f"step-{max_steps:08d}" / "COMPLETE").write_text(f"{max_steps}\n")
    (out / "results.json").write_text(json.dumps({"stage": stage, "final": {"step": max_steps}}))
    schedule = {"max_steps": max_steps, "epochs": cfg.trainer.epochs, "total_steps": max_steps}
    record = {
        "stage": stage,
        "model": model_record(cfg),
        "data": data_fingerprint(cfg.data),
        "schedule": schedule,
        "status": "complete",
        "step": max_steps,
    }
    (out / "run.json").write_text(json.dumps(record))


def test_other_stage_in_a_finished_run_dir_fails(capsys, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out, data)
    before = _snapshot(out)
    code, _, err = cli(
        capsys, "train", "stage=multitask_sft", "model=tiny", *_data_args(data), f"output_dir={out}"
    )
    assert code == 1
    lines = _short(err)
    assert "holds a run of stage 'alignment'; this is stage 'multitask_sft'" in lines[0]
    assert _snapshot(out) == before


def test_other_data_in_a_run_dir_fails(capsys, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out, data)
    other = tmp_path / "other.jsonl"
    other.write_text("".join((data / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    before = _snapshot(out)
    code, _, err = cli(
        capsys,
        "train",
        "stage=alignment",
        "model=tiny",
        "data=file",
        f"data.path={other}",
        f"data.root={data}",
        "trainer.max_steps=2",
        f"output_dir={out}",
    )
    assert code == 1
    lines = _short(err)
    assert "holds a run on other data" in lines[0]
    assert str(data / "train.jsonl") in lines[0] and str(other) in lines[0]
    assert _snapshot(out) == before


def test_other_starting_weights_in_a_run_dir_fail(capsys, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out, data)  # from random weights
    ckpt = tmp_path / "tiny_ckpt"
    ckpt.mkdir()
    text = {"hidden_size": 128, "num_hidden_layers": 2}
    (ckpt / "config.json").write_text(json.dumps({"model_type": "video_llama_3", "text_config": text}))
    (ckpt / "model.safetensors").write_bytes(b"")
    code, _, err = cli(
        capsys,
        "train",
        "stage=alignment",
        "model=tiny",
        f"init_from={ckpt}",
        *_data_args(data),
        f"output_dir={out}",
    )
    assert code == 1
    assert f"holds a run with init_from=None; this one has init_from={ckpt}" in _short(err)[0]


def test_finished_run_rerun_says_complete_and_changes_nothing(capsys, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out, data)
    before = _snapshot(out)
    args = ["stage=alignment", "model=tiny", *_data_args(data), "trainer.max_steps=2", f"output_dir={out}"]
    code, stdout, _ = cli(capsys, "train", *args)
    assert code == 0
    assert "complete at step 2: nothing to do" in stdout and "reschedule=true" in stdout
    assert _snapshot(out) == before


def test_changed_schedule_length_needs_reschedule(capsys, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out, data)
    before = _snapshot(out)
    code, _, err = cli(
        capsys,
        "train",
        "stage=alignment",
        "model=tiny",
        *_data_args(data),
        "trainer.max_steps=5",
        f"output_dir={out}",
    )
    assert code == 1
    lines = _short(err)
    assert "trainer.max_steps 2 -> 5" in lines[0] and "reschedule=true" in lines[1]
    assert _snapshot(out) == before


def test_restart_over_checkpoints_fails(capsys, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out, data)
    (out / "results.json").unlink()  # unfinished
    code, _, err = cli(
        capsys,
        "train",
        "stage=alignment",
        "model=tiny",
        *_data_args(data),
        "trainer.max_steps=2",
        "trainer.resume=false",
        f"output_dir={out}",
    )
    assert code == 1 and "trainer.resume=false would start over" in err


def test_resume_with_another_global_batch_fails(capsys, tmp_path: Path, data: Path) -> None:
    """A 2-process run of the tiny preset (no global batch set: 2 packed rows per step) resumed on 1 process
    (1 row per step) cannot resume exactly: one line naming the checkpoint and both batches, before the model."""
    import torch

    out = tmp_path / "run"
    _finished_run(out, data, max_steps=4)
    (out / "results.json").unlink()  # unfinished: a checkpoint of step 4 to resume from
    ckpt = out / "checkpoints" / "step-00000004"
    torch.save({"world_size": 2}, ckpt / "trainer_state.pt")
    for r in range(2):
        torch.save({"rows_per_step": 2, "world_size": 2, "rank": r, "step": 4}, ckpt / f"loader_rank{r}.pt")
    args = ["stage=alignment", "model=tiny", *_data_args(data), "trainer.max_steps=4", f"output_dir={out}"]
    code, _, err = cli(capsys, "train", *args)
    assert code == 1
    (line,) = _short(err[err.index("vl3-train: error:") :])  # after the data's progress bars
    assert f"{ckpt} holds 2 packed rows per optimizer step (2 processes), this run 1 (1 processes)" in line
    assert "global batch changed" in line and "trainer.global_batch_samples" in line


def test_run_dir_of_an_older_version_is_checked_too(capsys, tmp_path: Path, data: Path) -> None:
    """A run directory without run.json (written before it existed): its resolved_config.json names the stage."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "resolved_config.json").write_text(json.dumps({"stage": "alignment", "model": {"preset": "tiny"}}))
    code, _, err = cli(
        capsys, "train", "stage=video_finetune", "model=tiny", *_data_args(data), f"output_dir={out}"
    )
    assert code == 1 and "holds a run of stage 'alignment'" in err


@pytest.mark.parametrize("command", ["train", "pipeline", "doctor"])
def test_plus_key_the_schema_lacks_fails_like_a_typo(
    capsys, tmp_path: Path, data: Path, command: str
) -> None:
    """Hydra's own hint for a typo (`+key=`) used to add the key, unread, and exit 0."""
    code, _, err = cli(
        capsys, command, "model=tiny", *_data_args(data), "+trainer.lr_lmm=1e-5", f"output_dir={tmp_path}"
    )
    assert code == 1
    (line,) = _short(err)
    assert "+trainer.lr_lmm: no such key" in line and "did you mean trainer.lr_llm" in line


def test_plus_key_is_fine_where_the_schema_is_open() -> None:
    from videollama3_train.config import check_overrides

    check_overrides("train", ["+data.datasets={b:{path:B.json,root:/media}}"])
    check_overrides("pipeline", ["+model=tiny"])  # a config group, not a key


# ----------------------------------------------------------------------------------------------------------------
# 2. Errors that fit on a screen
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("train", ["model=tiny"], "output_dir is required: add output_dir=DIR"),
        (
            "pipeline",
            ["trainer.lr_vison=1", "output_dir=/tmp/x"],
            "unknown key trainer.lr_vison: did you mean trainer.lr_vision?",
        ),
        ("pipeline", ["stage=alignment", "output_dir=/tmp/x"], "use stages=[...]"),
        (
            "train",
            ["model=tinyy", "output_dir=/tmp/x"],
            "model=tinyy: no such model config; choose one of tiny",
        ),
        ("train", ["trainer.epochs=abc", "output_dir=/tmp/x"], "trainer.epochs: Value 'abc'"),
        ("train", ["trainer.backend=zero9", "output_dir=/tmp/x"], "backend must be one of"),
        ("train", ["--local_ranks", "output_dir=/tmp/x"], "unknown option --local_ranks"),
        (
            "report",
            ["root=/tmp", "outputs/2b"],
            "'outputs/2b' is not an override: write key=value (e.g. root=outputs/2b)",
        ),
        ("export", ["output=/tmp/hf"], "checkpoint is required"),
        (
            "export",
            ["checkpoint=/nowhere/run", "output=/tmp/hf"],
            "checkpoint=/nowhere/run: no such directory",
        ),
        ("report", ["root=/nowhere/runs"], "root=/nowhere/runs: no such directory"),
        ("train", ["hydra.run.dir=x", "output_dir=/tmp/x"], "hydra.* settings are not used"),
    ],
)
def test_config_mistakes_are_one_line(capsys, command: str, args: list[str], expected: str) -> None:
    code, _, err = cli(capsys, command, *args)
    assert code == 1
    assert expected in _short(err)[0], err


def test_path_and_data_mistakes_are_one_or_two_lines(capsys, tmp_path: Path, data: Path) -> None:
    out = f"output_dir={tmp_path / 'o'}"
    code, _, err = cli(capsys, "train", "model=tiny", "data=file", "data.path=missing/train.jsonl", out)
    assert code == 1
    assert (
        "annotation file of dataset 'main' not found: missing/train.jsonl (relative to the working directory"
        in err
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("this is not JSON\n")
    code, _, err = cli(
        capsys, "train", "model=tiny", "data=file", f"data.path={bad}", f"data.root={data}", out
    )
    assert code == 1
    lines = _short(err)
    assert "bad data: [bad_schema]" in lines[0] and "line 1 is not valid JSON" in lines[0]
    code, _, err = cli(capsys, "train", "model=tiny", "init_from=/nowhere/ckpt", *_data_args(data), out)
    assert code == 1 and "init_from=/nowhere/ckpt: no such directory" in _short(err)[0]
    code, _, err = cli(capsys, "export", f"checkpoint={tmp_path}", f"output={tmp_path / 'hf'}")
    assert code == 1 and "is neither a complete checkpoint" in _short(err)[0]
    assert not (tmp_path / "o").exists()


def test_traceback_on_request(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VL3_TRACEBACK", "1")
    code, _, err = cli(capsys, "train", "model=tiny", "data=file", f"output_dir={tmp_path}")
    assert code == 1 and "Traceback" in err and "data.path is required" in err


def test_a_fresh_process_fails_within_seconds(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [
        sys.executable,
        NO_MODEL,
        "videollama3_train.train",
        "stage=finetune",
        "init_from=/ckpt/X",
        "data=file",
    ]
    proc = subprocess.run(
        [*cmd, f"output_dir={tmp_path / 'o'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("vl3-train: error: init_from=/ckpt/X needs model="), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_under_torchrun_one_rank_reports(tmp_path: Path) -> None:
    """Two ranks hit the same mistake: rank 0 prints it, rank 1 exits quietly; torchrun's error file has it."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        NO_MODEL,
        "videollama3_train.train",
        "stage=alignment",
        "model=tiny",
        "data=file",
        f"output_dir={tmp_path / 'o'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=360)
    assert proc.returncode != 0
    assert proc.stderr.count("vl3-train: error: data.path is required") == 1, proc.stderr
    assert "traceback : data.path is required" in proc.stderr  # torchrun's summary, from the error file
    assert "videollama3_train/" not in proc.stderr  # no frame of ours: no Python traceback from the ranks
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------
# 3. One way in
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_useful_help(capsys, command: str) -> None:
    code, out, err = cli(capsys, command, "--help")
    assert code == 0 and not err
    assert out.startswith(f"usage: vl3-{command} [KEY=VALUE ...]")
    assert f"python -m videollama3_train.{command}" in out
    assert "main keys:" in out and "examples:" in out
    examples = out.split("examples:")[1].split("\n\n")[0].strip().splitlines()
    assert len(examples) == 2 and all(e.strip().startswith(f"vl3-{command} ") for e in examples)
    assert "VL3_TRACEBACK=1" in out


def test_console_scripts_cover_every_command() -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {f"vl3-{c}": f"videollama3_train.{c}:main" for c in COMMANDS}


def test_help_needs_no_output_dir_in_a_fresh_process(tmp_path: Path) -> None:
    for command in ("doctor", "pipeline"):
        proc = subprocess.run(
            [sys.executable, "-m", f"videollama3_train.{command}", "--help"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == 0 and f"usage: vl3-{command}" in proc.stdout, proc.stderr
        assert not list(tmp_path.iterdir())  # nothing written to the working directory


def test_cfg_prints_the_composed_config(capsys, tmp_path: Path) -> None:
    code, out, _ = cli(
        capsys, "train", "--cfg", "model=tiny", "trainer.max_steps=7", f"output_dir={tmp_path}"
    )
    assert code == 0 and "max_steps: 7" in out and "lr_scale: 300.0" in out
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# A real run: the console's story, a rerun, a reschedule, an export (one tiny stage, two steps)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.builds_model
@pytest.mark.timeout(900)
def test_run_story_rerun_reschedule_and_export(capsys, tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    args = [
        "stage=alignment",
        "model=tiny",
        *_data_args(data),
        f"data.heldout_path={data / 'heldout.jsonl'}",
        "eval.max_new_tokens=2",
        "trainer.max_steps=2",
        f"output_dir={out}",
    ]
    code, stdout, _ = cli(capsys, "train", *args)
    assert code == 0
    for said in (
        "[alignment] model tiny (random weights) -> output_dir",
        "1 process on cpu (single process), backend ddp, precision fp32",
        "[alignment] data: 16 records (main 16), 0 unusable",
        "[alignment] global batch: 1 packed rows per optimizer step",
        "= 1 rank(s) x grad_accum 1",
        "[alignment] schedule: 2 optimizer steps",
        f"[alignment] done at step 2: export {out / 'export'} (float32 weights",
        f"results {out / 'results.json'}",
        f"log {out / 'train.log'}",
    ):
        assert said in stdout, said
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "alignment" and record["status"] == "complete" and record["step"] == 2
    assert record["schedule"] == {"max_steps": 2, "epochs": 10, "total_steps": 2}
    assert "global batch" in (out / "train.log").read_text()

    before = _snapshot(out)
    code, stdout, _ = cli(capsys, "train", *args)
    assert code == 0 and "complete at step 2: nothing to do" in stdout and _snapshot(out) == before

    code, stdout, _ = cli(
        capsys, "train", *args[:-2], "trainer.max_steps=3", "reschedule=true", f"output_dir={out}"
    )
    assert code == 0
    assert "reschedule=true: trainer.max_steps 2 -> 3" in stdout and "resumed from" in stdout
    assert "done at step 3" in stdout
    assert json.loads((out / "run.json").read_text())["schedule"]["max_steps"] == 3

    # the export command: float32 like the stage's own export, its log in the run directory, not the cwd
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    os.chdir(cwd)
    try:
        code, stdout, _ = cli(capsys, "export", f"checkpoint={out}", f"output={tmp_path / 'hf'}")
    finally:
        os.chdir(REPO)
    assert code == 0 and (out / "export.log").is_file() and not any(cwd.iterdir())
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"

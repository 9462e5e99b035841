"""Stage recipes: each stage's config, composed exactly as the train / pipeline commands compose it, against the
official recipe (REFERENCE §2). The 2B / 7B presets must match the table; the tiny preset scales learning rates and
shrinks budgets on purpose, and is tested for exactly those documented differences.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from videollama3_train.config import STAGES, compose, compose_stage

REPO = Path(__file__).resolve().parents[1]

# REFERENCE §2, per stage: learning rate per group (None = frozen), merge sizes, token compression.
TABLE = {
    "encoder_adaptation": dict(
        lrs={"vision": 1e-5, "projector": 1e-3, "llm": None}, image_merge=1, video_merge=2, compression=False
    ),
    "alignment": dict(
        lrs={"vision": 2e-6, "projector": 1e-5, "llm": 1e-5}, image_merge=1, video_merge=2, compression=False
    ),
    "multitask_sft": dict(
        lrs={"vision": 2e-6, "projector": 1e-5, "llm": 1e-5}, image_merge=1, video_merge=2, compression=True
    ),
    "video_finetune": dict(
        lrs={"vision": 2e-6, "projector": 1e-5, "llm": 1e-5}, image_merge=2, video_merge=2, compression=True
    ),
}

# The keys the tiny preset (configs/model/tiny.yaml) may change relative to the 2B preset, and why: random weights
# need far larger (capped) learning rates and several epochs to learn the sample data on CPU in minutes, with small
# visual and packing budgets, one CPU process and no worker processes. docs/stages.md lists them; any other
# difference (what trains, merge sizes, pruning, optimizer, schedule shape) would be a recipe change.
TINY_KEYS = {
    "trainer.lr_scale",
    "trainer.lr_max",
    "model.preset",
    "model.tokenizer",
    "model.dtype",
    "trainer.epochs",
    "trainer.global_batch_samples",
    "trainer.warmup_ratio",
    "trainer.save_every",
    "trainer.log_every",
    "trainer.backend",
    "trainer.gradient_checkpointing",
    "encode.max_visual_tokens",
    "encode.max_length",
    "encode.max_frames",
    "encode.min_frames",
    "encode.fps",
    "data.max_tokens",
    "data.max_patches",
    "data.num_workers",
    "data.cost_workers",
}
TINY_YAML = REPO / "configs" / "model" / "tiny.yaml"


def _flat(obj, prefix: str = "") -> dict[str, object]:
    """A config dataclass as ``{dotted.key: value}`` (leaves only)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _compose(stage: str, *overrides: str, tmp: Path = Path("/tmp/recipes")):
    return compose_stage(stage, list(overrides), tmp / stage, None)


def _assert_shared(cfg) -> None:
    """Values shared by every stage of the official recipe, independent of the model size."""
    t, e = cfg.trainer, cfg.encode
    assert t.adam_betas == (0.9, 0.999) and t.adam_eps == 1e-8
    assert t.weight_decay == 0.0
    assert t.lr_schedule == "cosine"
    assert e.patch_size == 14
    assert e.compression_threshold == 0.1


def test_table_covers_every_stage() -> None:
    assert tuple(TABLE) == STAGES


@pytest.mark.parametrize("model", ["videollama3_2b", "videollama3_7b"])
@pytest.mark.parametrize("stage", STAGES)
def test_full_size_recipe_matches_reference(stage: str, model: str) -> None:
    cfg = _compose(stage, f"model={model}")
    row = TABLE[stage]
    assert cfg.stage == stage
    assert cfg.trainer.lr_scale == 1.0 and cfg.trainer.lr_max is None
    assert cfg.trainer.lrs == cfg.trainer.base_lrs == row["lrs"]
    assert (cfg.encode.image_merge_size, cfg.encode.video_merge_size) == (
        row["image_merge"],
        row["video_merge"],
    )
    assert cfg.encode.use_token_compression is row["compression"]
    _assert_shared(cfg)
    t, e = cfg.trainer, cfg.encode
    assert t.warmup_ratio == 0.03
    assert t.epochs == 1 and t.max_steps == -1
    assert e.max_length == 16384 and cfg.data.max_tokens == 16384
    assert e.max_visual_tokens == 10240
    assert e.fps == 1.0 and e.max_frames == 180
    assert t.backend == "zero1"
    assert t.gradient_checkpointing == "both"  # activation checkpointing on both towers
    assert t.precision in ("auto", "bf16")  # bf16 on GPUs
    assert cfg.model.preset == model and cfg.model.tokenizer == "qwen"


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_recipe_differs_only_as_documented(stage: str) -> None:
    from omegaconf import OmegaConf

    tiny = _compose(stage, "model=tiny")
    full = _compose(stage, "model=videollama3_2b")
    row = TABLE[stage]
    # What trains, the vision knobs, the optimizer and the schedule shape are the recipe's.
    assert tiny.trainer.base_lrs == row["lrs"]
    assert (tiny.encode.image_merge_size, tiny.encode.video_merge_size) == (
        row["image_merge"],
        row["video_merge"],
    )
    assert tiny.encode.use_token_compression is row["compression"]
    _assert_shared(tiny)
    # Only the documented keys differ from the 2B preset ...
    a, b = _flat(tiny), _flat(full)
    differing = {k for k in a if a[k] != b[k]} - {"output_dir"}
    assert differing <= TINY_KEYS, sorted(differing - TINY_KEYS)
    # ... and they hold what configs/model/tiny.yaml says.
    for key, value in _flat_yaml(OmegaConf.to_container(OmegaConf.load(TINY_YAML))).items():
        assert a[key] == value, key
    assert tiny.trainer.lr_scale > 1
    # The effective learning rates: the recipe's, scaled, capped by lr_max; frozen stays frozen.
    for g, lr in row["lrs"].items():
        if lr is None:
            assert tiny.trainer.lrs[g] is None
        else:
            expected = lr * tiny.trainer.lr_scale
            if tiny.trainer.lr_max is not None:
                expected = min(expected, tiny.trainer.lr_max)
            assert tiny.trainer.lrs[g] == pytest.approx(expected)


def _flat_yaml(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_yaml(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_finetune_recipe_is_stage4_as_custom_stage() -> None:
    """configs/stage/finetune.yaml: a released checkpoint on one's own data, with the stage-4 values."""
    cfg = _compose("finetune", "model=videollama3_2b", "init_from=/ckpt/released")
    s4 = _compose("video_finetune", "model=videollama3_2b")
    assert cfg.stage == "finetune"
    assert cfg.trainer.lrs == s4.trainer.lrs == TABLE["video_finetune"]["lrs"]
    assert cfg.encode == s4.encode
    assert cfg.trainer == s4.trainer
    assert cfg.init_from == "/ckpt/released"
    assert cfg.lora.enabled is False  # full fine-tuning unless lora.enabled=true
    lora = _compose("finetune", "lora.enabled=true", "lora.vision=true", "lora.r=8")
    assert lora.lora.enabled and lora.lora.vision and lora.lora.r == 8


def test_freezing_a_group_from_the_command_line() -> None:
    cfg = _compose("multitask_sft", "model=videollama3_2b", "trainer.lr_vision=null")
    assert cfg.trainer.lrs == {"vision": None, "projector": 1e-5, "llm": 1e-5}
    # The schema's cross-field check runs when the config becomes dataclasses, before anything is built.
    with pytest.raises(ValueError, match="nothing would train"):
        _compose("alignment", "trainer.lr_vision=null", "trainer.lr_projector=null", "trainer.lr_llm=null")


def _chain(exc: BaseException) -> str:
    """The message of an exception and all its causes (Hydra wraps the schema's error)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


@pytest.mark.parametrize(
    ("override", "key"),
    [("trainer.lr_vison=1", "lr_vison"), ("trainer.epochs=abc", "trainer.epochs"), ("model=tinyy", "tinyy")],
)
def test_bad_override_fails_at_compose_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_stage("alignment", [override], Path("/tmp/recipes/bad"), None)
    assert key in _chain(err.value)


def test_unknown_stage_fails_at_compose() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_stage("stage5", [], Path("/tmp/recipes/bad"), None)
    assert "stage5" in _chain(err.value)


def test_pipeline_rejects_bad_override_before_training(tmp_path: Path) -> None:
    """The pipeline's config is the train config plus ``stages``: a typo fails when it is composed. And
    run_pipeline composes every stage before the first one trains: a value that only a later stage rejects fails
    at once too, before any stage directory exists."""
    from videollama3_train.run import run_pipeline

    with pytest.raises(ConfigCompositionException) as err:
        compose("pipeline", ["model=tiny", f"output_dir={tmp_path}", "trainer.lr_vison=1"])
    assert "lr_vison" in _chain(err.value)
    with pytest.raises(ValueError, match=r"use stages=\[\.\.\.\]"):
        compose("pipeline", ["model=tiny", f"output_dir={tmp_path}", "stage=alignment"])
    # stage 2 trains its LLM; stage 1 has it frozen, so freezing the other two leaves stage 1 nothing to train
    overrides = [
        "model=tiny",
        f"output_dir={tmp_path}",
        "stages=[alignment,encoder_adaptation]",
        "trainer.lr_vision=null",
        "trainer.lr_projector=null",
    ]
    cfg = compose("pipeline", overrides)
    assert cfg.stages == ["alignment", "encoder_adaptation"]
    with pytest.raises(ValueError, match="nothing would train"):
        run_pipeline(cfg, overrides)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown stages"):
        compose("pipeline", ["model=tiny", f"output_dir={tmp_path}", "stages=[alignment,stage5]"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("override", "key"), [("trainer.lr_vison=1", "lr_vison"), ("trainer.epochs=abc", "epochs")]
)
def test_train_command_rejects_bad_override(tmp_path: Path, override: str, key: str) -> None:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "videollama3_train.train",
            "stage=alignment",
            "model=tiny",
            "logger=disabled",
            f"output_dir={tmp_path / 'run'}",
            override,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

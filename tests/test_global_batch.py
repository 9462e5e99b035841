"""``trainer.global_batch_samples``: the recipe's global batch in samples becomes G packed rows per optimizer step,
the same on every world size; each rank runs ``ceil(G / world)`` micro-batches per step (``data.build``).

The steps themselves (which rows, dealt how, padding, resume across world sizes) are tested in tests/test_loader.py
and, through fit, tests/test_world_size.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sample_data import gen

from videollama3_train.data.build import build_train_data, global_rows_per_step
from videollama3_train.data.config import DataConfig, EncodeConfig
from videollama3_train.trainer import TrainConfig
from videollama3_train.trainer.optim import resolve_grad_accum


def test_rows_per_step_from_samples_or_grad_accum():
    assert global_rows_per_step(128, grad_accum=4, world_size=8, samples_per_row=4.3) == 30  # 128 / 4.3
    assert global_rows_per_step(1, grad_accum=4, world_size=8, samples_per_row=4.3) == 1  # at least one row
    assert (
        global_rows_per_step(None, grad_accum=4, world_size=8, samples_per_row=4.3) == 32
    )  # grad_accum x world
    with pytest.raises(ValueError, match="global_batch_samples"):
        global_rows_per_step(0, grad_accum=1, world_size=1, samples_per_row=4.0)


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    gen.generate(out, seed=3, n_train=60, n_heldout=0)
    return out


def test_the_global_batch_is_the_same_rows_on_every_world_size(sample_data: Path, tiny_processor) -> None:
    data = DataConfig(
        path=str(sample_data / "train.jsonl"), root=str(sample_data), max_tokens=512, max_patches=4096,
        num_workers=0, cost_workers=0,
    )  # fmt: skip
    enc = EncodeConfig(max_visual_tokens=64, max_length=512, max_frames=4, min_frames=2)
    bundles = {
        world: [
            build_train_data(
                data,
                enc,
                tiny_processor,
                grad_accum=1,
                rank=r,
                world_size=world,
                is_main=r == 0,
                global_batch_samples=12,
            )  # fmt: skip
            for r in range(world)
        ]
        for world in (1, 2, 3)
    }
    one = bundles[1][0]
    rows = one.rows_per_step
    assert rows == round(12 / one.plan_stats["samples_per_row"]) and rows > 1
    plan = one.loader.plan(0)
    for world, ranks in bundles.items():
        for b in ranks:
            assert b.rows_per_step == rows  # the same global batch on every world size
            assert b.grad_accum == b.loader.grad_accum == -(-rows // world)
            assert b.loader.plan(0).micro_batches == plan.micro_batches  # the same steps
            assert b.plan_stats["optimizer_steps"] == plan.steps
            assert b.loader.micro_batches_per_epoch(0) == plan.steps * b.grad_accum
            assert b.plan_stats["padding_rows_per_step"] == b.grad_accum * world - rows
            # fit takes the loader's micro-batches per step, whatever trainer.grad_accum says
            assert resolve_grad_accum(TrainConfig(grad_accum=1), b.loader).grad_accum == b.grad_accum
    packed = sorted(i for slot in plan.micro_batches for mb in slot for i in mb)
    assert (
        len(packed) == len(set(packed)) == one.plan_stats["samples_packed"]
    )  # no sample left out or repeated

    plain = build_train_data(data, enc, tiny_processor, grad_accum=2, rank=0, world_size=3, is_main=True)
    assert (plain.rows_per_step, plain.grad_accum) == (6, 2)  # without it: grad_accum rows per rank


@pytest.mark.slow  # one training step of the tiny preset and one doctor scan, ~20 s
def test_the_doctor_reports_the_steps_training_runs(sample_data: Path, tmp_path: Path) -> None:
    """The doctor and training plan by one rule (``data.build.plan_training``): with a recipe's global batch in
    samples, the doctor's steps per epoch, rows per step and micro-batches per rank are those of a real run's
    ``effective.json`` and plan, on 1 and on 3 data-parallel ranks."""
    import json

    from videollama3_train.config import compose, compose_stage
    from videollama3_train.offline import run_doctor
    from videollama3_train.run import run_stage

    overrides = [
        "model=tiny", "data=file", f"data.path={sample_data / 'train.jsonl'}", f"data.root={sample_data}",
        "trainer.global_batch_samples=12", "data.max_tokens=512", "encode.max_length=512",
        "encode.max_visual_tokens=64", "data.num_workers=0", "data.cost_workers=0",
    ]  # fmt: skip
    run = tmp_path / "run"
    results = run_stage(compose_stage("alignment", [*overrides, "trainer.max_steps=1"], run, None))
    effective = json.loads((run / "effective.json").read_text())
    plan = results["plan"]
    for ranks in (1, 3):
        argv = [*overrides, f"output_dir={tmp_path / f'doctor{ranks}'}", "doctor.stages=[alignment]",
                "doctor.workers=0", f"doctor.num_ranks={ranks}"]  # fmt: skip
        assert run_doctor(compose("doctor", argv), argv, progress=False) == 0
        stage = json.loads((tmp_path / f"doctor{ranks}" / "report.json").read_text())["stages"]["alignment"]
        assert (
            stage["optimizer_steps_per_epoch"]
            == effective["optimizer_steps_per_epoch"]
            == plan["optimizer_steps"]
        )
        assert (
            stage["rows_per_step"] == plan["rows_per_step"]
            and stage["samples_packed"] == plan["samples_packed"]
        )
        assert stage["grad_accum"] == -(-plan["rows_per_step"] // ranks)
    assert effective["grad_accum"] == plan["rows_per_step"]  # one rank runs every row of a step

"""The run's parallel layout and the backend strategies' facts: decided once, in one place each.

* :class:`~videollama3_train.contract.ParallelDims` against an independent enumeration of the world's ranks;
* every backend's facts on its strategy (shards parameters, reshards), its config check
  reading the config without writing it, and no backend named outside ``trainer/``;
* the evaluator's cadence, and every evaluation inside the backend's ``whole_model``;
* the checkpoint's reader beside its writer (the export's key rule).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from videollama3_train.contract import ParallelDims

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "videollama3_train"


@pytest.mark.parametrize("world,sp", [(1, 1), (4, 1), (4, 2), (6, 3), (8, 8)])
def test_parallel_dims_match_an_enumeration_of_the_world(world: int, sp: int) -> None:
    # oracle: walk the ranks in order, opening a new group every sp ranks
    groups: list[list[int]] = []
    for r in range(world):
        if r % sp == 0:
            groups.append([])
        groups[-1].append(r)
    for rank in range(world):
        d = ParallelDims(world, rank, sp)
        mine = next(i for i, g in enumerate(groups) if rank in g)
        assert (d.dp_rank, d.dp_size, d.sp_rank) == (mine, len(groups), groups[mine].index(rank))
        assert d.sp_groups() == groups and d.sp_enabled == (sp > 1)


def test_parallel_dims_refuse_a_group_that_does_not_divide_the_world() -> None:
    with pytest.raises(
        ValueError, match=r"trainer.sequence_parallel=3 must divide the number of processes \(4\)"
    ):
        ParallelDims(4, 0, 3)
    with pytest.raises(ValueError, match="rank 4"):
        ParallelDims(4, 4, 1)


def test_every_backend_fact_is_on_its_strategy() -> None:
    from videollama3_train.trainer.backend import backend_class
    from videollama3_train.trainer.config import BACKENDS

    shards = {"ddp": False, "zero1": False, "zero2": False, "zero3": True, "fsdp2": True}
    reshards = {"ddp": True, "zero1": True, "zero2": True, "zero3": False, "fsdp2": True}
    assert set(shards) == set(BACKENDS)
    for name in BACKENDS:
        cls = backend_class(name)
        assert (cls.shards_parameters, cls.reshards) == (shards[name], reshards[name]), name
    with pytest.raises(ValueError, match="trainer.backend must be one of"):
        backend_class("zero9")


def test_backend_config_check_reads_the_config_and_writes_nothing(tmp_path: Path) -> None:
    from videollama3_train.config import compose
    from videollama3_train.console import UserError
    from videollama3_train.rundir import check_backend
    from videollama3_train.trainer.deepspeed import config_path

    cfg = compose("train", ["output_dir=o", "trainer.backend=zero2"])
    check_backend(cfg)  # the package's own zero2.json
    assert cfg.trainer.deepspeed_config_dir is None
    assert config_path(cfg.trainer).is_file()
    cfg = compose(
        "train", ["output_dir=o", "trainer.backend=zero3", f"trainer.deepspeed_config_dir={tmp_path}"]
    )
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "zero3.json"))):
        check_backend(cfg)
    assert cfg.trainer.deepspeed_config_dir == str(tmp_path)


def test_no_backend_is_named_outside_the_trainer() -> None:
    """Which backend does what is the strategies' business: nothing outside trainer/ branches on a name."""
    names = re.compile(r"""["'](ddp|zero[123]|fsdp2)["']""")
    found = [
        f"{p.relative_to(REPO)}:{i}"
        for p in PACKAGE.rglob("*.py")
        if "trainer" not in p.relative_to(PACKAGE).parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if names.search(line.split("#")[0])
    ]
    assert not found, found


class _Backend:
    def __init__(self):
        self.accelerator = SimpleNamespace(device="cpu", is_main_process=True)
        self.entered = 0

    @contextmanager
    def whole_model(self, model):
        self.entered += 1
        yield model


def test_the_evaluator_owns_its_cadence_and_runs_inside_whole_model() -> None:
    """Every evaluation, mid-run too, runs inside ``backend.whole_model`` (a sharding backend gathers the weights
    there: rank 0 then needs nothing from the other ranks); tests/test_sharded_eval.py runs it on 2 processes."""
    from videollama3_train.config import compose
    from videollama3_train.evaluator import Evaluator

    cfg = compose("train", ["output_dir=o", "eval.every=3"])
    kwargs = {"bad_records": 0, "baseline_answers": None, "tokenizer": None, "writer": None}
    backend = _Backend()
    ev = Evaluator(cfg, [], backend=backend, **kwargs)
    assert [s for s in range(1, 10) if ev.should_run(s)] == [3, 6, 9]
    assert ev.during(model=None, step=3) == {}  # no held-out set: nothing to evaluate
    assert backend.entered == 1


def test_the_export_reads_the_layout_its_writer_wrote() -> None:
    from videollama3_train.trainer.checkpoint import native_state_dict

    saved = {"model.model.language_model.x": 1, "model.lm_head.weight": 2, "other": 3}
    assert native_state_dict(saved) == {"model.language_model.x": 1, "lm_head.weight": 2, "other": 3}


def test_every_backend_names_the_model_states_it_shards() -> None:
    """The default activation bound subtracts one rank's model states: every backend names which of the cost
    model's states it divides among the ranks (a new backend without an entry fails here, not in a run)."""
    from videollama3_train.data.cost_model import MODEL_STATES
    from videollama3_train.trainer.backend import sharded_states
    from videollama3_train.trainer.config import BACKENDS

    for name in BACKENDS:
        assert set(sharded_states(name)) <= set(MODEL_STATES), name
    assert sharded_states("ddp") == ()
    assert set(sharded_states("fsdp2")) == set(sharded_states("zero3")) == set(MODEL_STATES)

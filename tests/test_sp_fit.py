"""Sequence parallelism inside ``fit``, against a run without it.

Oracle: ``fit`` in one process without sequence parallelism on the same rows (the 4 micro-batches of the ``grads``
plan: text, images, a video; 2 steps of grad_accum 2, ``lr = eps = 1e4`` so that the updates follow the
gradients). The 2-process runs (tests/numerics_worker.py, one launch shared with tests/test_recipe_numerics.py) put
both ranks in one sequence-parallel group: each row is split between them (the tower's frames and the LLM's
tokens), and the update, the logged loss, grad norm and counts must equal the one-process run's, on DDP, ZeRO-2,
ZeRO-3 (every parameter partitioned) and FSDP2, and on DDP with activation checkpointing of both towers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_worker import ListLoader, grad_check_batches, tiny_setup
from numerics_worker import launch_once
from test_fit import _cfg

from videollama3_train.trainer import fit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SP_CASES = ["sp_ddp", "sp_zero2", "sp_zero3", "sp_fsdp2", "sp_ddp_ckpt"]


def _rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    return launch_once(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[int, dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(logged rows, initial state, final state) of ``fit`` in this process on the same 4 rows."""
    out = tmp_path_factory.mktemp("sp_reference")
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(lr_vision=1e4, lr_projector=1e4, lr_llm=1e4, adam_eps=1e4, max_grad_norm=0.0, grad_accum=2,
               max_steps=2)  # fmt: skip
    fit(model, ListLoader(grad_check_batches(tok)), cfg, out_dir=out)
    return _rows(out), before, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", SP_CASES)
def test_sequence_parallel_fit_equals_one_process_without_it(cases: Path, reference, case: str) -> None:
    out = cases / case
    ref_rows, before, ref_after = reference
    rows = _rows(out)
    assert sorted(rows) == sorted(ref_rows) == [1, 2]
    for s, ref in ref_rows.items():
        # each row counted once although both ranks hold it (the group shares its counts)
        for key in ("label_tokens", "tokens", "visual_tokens"):
            assert rows[s][key] == ref[key], (case, s, key)
        assert rows[s]["loss"] == pytest.approx(ref["loss"], rel=1e-5), (case, s)
        assert rows[s]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (case, s)
    after = torch.load(out / "params_after.pt", weights_only=True)
    moved = 0
    for k, v in ref_after.items():
        torch.testing.assert_close(after[k], v, atol=1e-5, rtol=1e-4, msg=f"{case}: {k}")
        moved += not torch.equal(v, before[k])
    assert moved
    # the rows really were split: each rank's tower encoded part of the patches, together all of them
    work = [json.loads((out / f"sp_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(w["class"].endswith("SequenceParallelLoss") for w in work), work  # FSDP2 subclasses it
    total = sum(
        int(b[k].shape[0]) for b in grad_check_batches(tiny_setup()[1]) for k in ("pixel_values", "pixel_values_videos")
        if k in b
    )  # fmt: skip
    assert sum(w["patches"] for w in work) == total and all(0 < w["patches"] < total for w in work), work
    if case == "sp_zero3":
        log = (cases / "log.txt").read_text()
        assert all(f"PARTITIONED sp_zero3 {r} " in log for r in (0, 1)), log[-3000:]

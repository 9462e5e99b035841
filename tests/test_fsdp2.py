"""FSDP2 (``trainer.backend=fsdp2``) on CPU: two gloo processes through ``torch.distributed.run``.

The oracle is the one-process reference of tests/test_fit.py: the update AdamW makes from the gradient of the whole
global batch, normalised once (``lr = eps = 1e4`` makes the first update nearly linear in the gradient, so a wrong
normalisation or a missing reduction shows). Every parameter is sharded (the worker asserts it).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from dist_worker import RUN_SEPARATOR, grad_check_batches, launch_logs, run_logs, textonly_batches, tiny_setup
from helpers import forkrun
from test_fit import _adam_first_update, _reference_grads

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _clipped(grads: dict[str, torch.Tensor], max_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
    coef = min(1.0, max_norm / (norm + 1e-6))
    return {k: g * coef for k, g in grads.items()}, norm


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_update(out: Path, before, update, what: str) -> None:
    after = torch.load(out / "params_after.pt", weights_only=True)
    assert update
    for k, u in update.items():
        torch.testing.assert_close(after[k] - before[k], u, atol=1e-5, rtol=1e-4, msg=f"{what}: {k}")


SHARD_SIZES = (0, 1)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The 2-process runs of this file one after the other in one launch (a launch costs more than these runs of
    the tiny model): name -> its part of the log; each run writes into ``root / name``."""
    root = tmp_path_factory.mktemp("fsdp2")
    runs = {
        **{
            f"grads_{n}": [
                "--plan",
                "grads",
                "--grad-accum",
                "2",
                "--max-grad-norm",
                "0.5",
                "--shard-size",
                str(n),
            ]
            for n in SHARD_SIZES
        },
        "textonly": ["--plan", "textonly", "--grad-accum", "2"],
        "frozen": ["--plan", "grads", "--grad-accum", "2", "--frozen-llm", "--lr", "1e-3", "--eps", "1e-8"],
        "export": ["--plan", "repeat", "--steps", "2", "--lr", "1e-3", "--eps", "1e-8", "--export"],
    }
    argv: list[str] = []
    for name, args in runs.items():
        argv += [RUN_SEPARATOR] if argv else []
        argv += ["--out", str(root / name), *args]
    log = forkrun([(2, argv)], worker="fsdp2_worker", timeout=800)  # the imports paid once (tests/forkrun.py)
    parts = run_logs(log)
    assert len(parts) == len(runs), log[-6000:]
    for name, part in zip(runs, parts):
        assert "WORKER DONE" in part, (name, log[-6000:])
    return root, dict(zip(runs, parts))


@pytest.mark.parametrize("shard_size", SHARD_SIZES)
def test_gradients_equal_the_one_process_reference_with_accumulation_and_clipping(
    launched, shard_size: int
) -> None:
    """2 processes x grad_accum 2, clipping at a norm small enough to bite: the update equals the clipped
    one-process update, and the logged grad norm equals the reference's norm before clipping. ``shard_size`` 0
    shards over both ranks (FSDP); 1 is HSDP's other extreme (groups of one rank, replicated across groups)."""
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads, norm = _clipped(_reference_grads(copy.deepcopy(model), grad_check_batches(tok)), max_norm=0.5)
    assert norm > 0.5 * 2  # clipping bites
    out = launched[0] / f"grads_{shard_size}"
    _assert_update(out, before, {k: _adam_first_update(g, 1e4, 1e4) for k, g in grads.items()}, "fsdp2")
    row = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_a_text_only_rank_finishes_and_matches_the_reference(launched) -> None:
    """Rank 1 sees only text: the vision tower still runs on it every micro-batch, so the all-gathers of the
    sharded tower match rank 0's (bounded by the subprocess timeout) and the update equals the reference."""
    model, tok = tiny_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = textonly_batches(tok, 0, 2) + textonly_batches(tok, 1, 2)
    grads = _reference_grads(copy.deepcopy(model), batches)
    root, logs = launched
    assert "SHARDED" in logs["textonly"]
    update = {k: _adam_first_update(g, 1e4, 1e4) for k, g in grads.items()}
    assert any(k.startswith("model.vision_model.") for k in update)
    _assert_update(root / "textonly", before, update, "fsdp2 text-only rank")


def test_frozen_llm_stays_frozen(launched) -> None:
    model, _ = tiny_setup()
    after = torch.load(launched[0] / "frozen" / "params_after.pt", weights_only=True)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, after[k])}
    assert any(k.startswith("model.vision_model.") for k in changed)
    assert not any(k.startswith("model.language_model.") for k in changed), sorted(changed)[:5]


# SIGKILL resume and 2 -> 1 ranks: tests/test_fsdp2_faults.py (dropout, kills inside a save and a backward, bit
# for bit; sample ids over an epoch boundary)
@pytest.mark.parametrize(("first", "second"), [(1, 2)])
def test_resume_at_another_world_size_reshards(tmp_path: Path, first: int, second: int) -> None:
    """DCP reshards the model and the optimizer, the loader's global cursor the data: 2 steps on ``first`` ranks
    then 2 on ``second`` equal 4 steps on one rank (the ``ranked`` plan: the same 2 packed rows per step, dealt over
    whatever ranks there are)."""
    common = ["--plan", "ranked", "--save-every", "2", "--lr", "1e-3", "--eps", "1e-8"]
    ref, run = ["--out", str(tmp_path / "ref"), *common], ["--out", str(tmp_path / "run"), *common]
    # three launches forked by one launcher (tests/forkrun.py), each with torchrun's environment
    log = forkrun([(1, [*ref, "--steps", "4"]), (first, [*run, "--steps", "2"]), (second, [*run, "--steps", "4"])],
                  worker="fsdp2_worker", timeout=600)  # fmt: skip
    parts = launch_logs(log)
    assert len(parts) == 3 and all("WORKER DONE" in part for part in parts), log[-6000:]
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got, ref)
    a = torch.load(tmp_path / "ref" / "params_after.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "params_after.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_export_loads_with_auto_classes_and_gives_the_trained_logits(launched) -> None:
    from fsdp2_worker import probe_input
    from transformers import AutoModelForImageTextToText

    tmp_path = launched[0] / "export"
    trained_logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    with torch.no_grad():
        logits = loaded(**probe_input(), use_cache=False).logits
    torch.testing.assert_close(logits, trained_logits, atol=1e-5, rtol=1e-5)
    model, _ = tiny_setup()
    assert not torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # it trained

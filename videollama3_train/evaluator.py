"""A stage's held-out evaluation, owning its cadence: before training, every ``eval.every`` steps, after.

:class:`Evaluator` is what the stage runner (``run.py``) and the loop (``trainer.fit``, through its
``MidRunEvaluator`` interface: ``should_run(step)`` / ``during(model, step)``) ask; it decides for itself when
it runs and on which rank, as the checkpointer does (``should_save``):

* ``before(model)`` -- once, before the first step of a new run (``eval.before``), when there is a held-out set;
* ``should_run(step)`` -- every ``eval.every`` steps;
* ``after(model)`` -- once, on the whole model at the end (inside ``backend.whole_model``).

Rank 0 evaluates alone while the other ranks wait outside any collective (``trainer.liveness.main_only``), so the
model it runs must need nothing from them: under a sharding backend (ZeRO-3, FSDP2) every evaluation runs inside
``backend.whole_model``, entered by every rank (the weights are gathered collectively first; ZeRO-3's hooks, which
would all-gather from inside rank 0's forward, are off), mid-run too.

``eval.benchmarks`` (``benchmark.BenchmarkSuite``) run at the same three moments, on rank 0.

Every evaluation goes through :meth:`Evaluator.run` ``(tag, model, step) -> results``: rank 0 scores the held-out
set (``evaluate.evaluate_heldout``: accuracy against each task's most frequent training answer, loss, a few
generations), prints it (``reports.heldout_story``) and returns the results; every other rank gets None. Another
kind of evaluation (a benchmark, a table of predictions for the metrics writer) hooks in there: ``run`` is the one
place that sees the model, the step and the results.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .trainer.liveness import main_only

log = logging.getLogger("videollama3_train")


class Evaluator:
    """Held-out evaluation of one stage (module docstring). ``heldout``: ``(encoded sample, raw record)`` pairs
    (empty on ranks other than 0: only rank 0 evaluates); ``bad_records``: held-out records that failed to encode;
    ``baseline_answers``: each task's most frequent training answer; ``backend``: the trainer's strategy (its
    device, its rank, whether it allows evaluation mid-run); ``writer``: the metrics writer whose run summary
    keeps the before / after results."""

    def __init__(
        self,
        cfg,
        heldout: list,
        *,
        bad_records: int,
        baseline_answers: Mapping[str, str] | None,
        tokenizer,
        backend,
        writer,
        benchmarks=None,
    ):
        self.cfg, self.heldout, self.bad_records = cfg, heldout, bad_records
        self.benchmarks = (
            benchmarks  # eval.benchmarks (benchmark.BenchmarkSuite), on rank 0; None without any
        )
        self.out_dir = Path(cfg.output_dir)
        self.baseline_answers, self.tokenizer, self.writer = baseline_answers, tokenizer, writer
        self.device = backend.accelerator.device
        self.is_main = backend.accelerator.is_main_process
        self.whole_model = backend.whole_model  # collective: the weights whole where rank 0 runs them alone
        self.every = cfg.eval.every

    def run(self, tag: str, model, step: int | None = None) -> dict[str, Any] | None:  # noqa: ARG002
        """Evaluate ``model`` now, on this rank alone (``tag``: ``before``, ``step N``, ``after``; ``step``: the
        optimizer steps done) and print the story; returns ``evaluate.evaluate_heldout``'s results on rank 0, None
        elsewhere or when there is no held-out set. The cadence methods call it on rank 0 inside
        ``trainer.liveness.main_only`` (a lost rank 0 is then reported, not waited for)."""
        from .dashboard import log_heldout
        from .evaluate import evaluate_heldout
        from .reports import heldout_story

        if not self.is_main or not self.heldout:
            return None
        model.to(self.device)
        res = evaluate_heldout(
            model,
            self.heldout,
            tokenizer=self.tokenizer,
            device=self.device,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            num_generations=self.cfg.eval.log_generations,
            baseline_answers=self.baseline_answers,
            bad_records=self.bad_records,
        )
        print(heldout_story(self.cfg.stage, tag, res), flush=True)
        log_heldout(self.writer, res, self.cfg.data, step or 0)
        if res["unfinished"]:
            log.warning(
                "%d held-out generations did not end their turn within eval.max_new_tokens", res["unfinished"]
            )
        return res

    def before(self, model, results: dict[str, Any], *, resuming: bool, whole=None) -> None:
        """The evaluations before training (held-out: ``eval.before``, not when resuming; the benchmarks' start)
        into ``results``; every rank calls it, rank 0 works (the others wait outside any collective). ``whole``:
        builds rank 0 a whole model when ``model``'s weights are not materialised yet (sharded initialisation)."""
        with main_only("held-out evaluation before training") as main:
            held_out = main and self.cfg.eval.before and bool(self.heldout) and not resuming
            benchmarks = main and self.benchmarks is not None
            # a sharded build is still on meta: rank 0 evaluates a whole copy of its own, freed after this block
            first = whole() if whole is not None and (held_out or benchmarks) else model
            if held_out:
                res = self.run("before", first, 0)
                results["heldout_before"] = res
                self.writer.summary({**heldout_summary(res, "before"), "baseline_accuracy": res["baseline"]})
            if benchmarks:
                self.benchmarks.at_start(first.to(self.device), self.writer, results, self.out_dir, resuming)
            del first

    def should_run(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (every ``eval.every`` steps)."""
        return self.every > 0 and step % self.every == 0

    def during(self, model, step: int) -> dict[str, float]:
        """The mid-run evaluation the loop logs as ``eval/<name>``: every rank calls it (the whole model is gathered
        collectively), rank 0 works (the others wait outside any collective); empty off rank 0."""
        r = None
        with self.whole_model(model) as whole, main_only(f"held-out evaluation at step {step}") as main:
            if main:
                r = self.run(f"step {step}", whole, step)
                if self.benchmarks is not None:
                    self.benchmarks.at_step(whole, self.writer, step)
        if r is None:
            return {}
        return {
            "heldout_loss": r["loss"],
            "heldout_accuracy": r["accuracy"],
            "heldout_baseline": r["baseline"],
            **{f"heldout_accuracy/{k}": v for k, v in r["accuracy_per_modality"].items()},
        }

    def after(self, model, results: dict[str, Any], step: int) -> None:
        """The evaluations of the final (whole) model into ``results`` (held-out, the benchmarks' end); every rank
        calls it (inside ``backend.whole_model``), rank 0 works."""
        with main_only("held-out evaluation after training") as main:
            res = self.run("after", model, step) if main else None
            if res is not None:
                results["heldout_after"] = res
                self.writer.summary(heldout_summary(res, "after"))
            if main and self.benchmarks is not None:
                self.benchmarks.at_end(model, self.writer, results, step)


def build_evaluator(cfg, data, processor, *, tokenizer, backend, writer) -> Evaluator:
    """The :class:`Evaluator` of a stage: its held-out set read and encoded on rank 0 (``data.heldout_path``), and
    the majority-answer baseline counted over ``data``'s training records (one pass, only when there is a held-out
    set)."""
    from .data.annotations import record_at
    from .data.build import load_heldout
    from .evaluate import majority_answers

    is_main = backend.accelerator.is_main_process
    heldout, bad = load_heldout(cfg.data, cfg.encode, processor) if is_main else ([], 0)
    benchmarks = _benchmarks(cfg, processor) if is_main else None  # read and encoded once
    baseline = None
    if heldout:
        baseline = majority_answers(record_at(ds, i) for ds in data.records for i in range(len(ds)))
    return Evaluator(
        cfg,
        heldout,
        bad_records=bad,
        baseline_answers=baseline,
        tokenizer=tokenizer,
        backend=backend,
        writer=writer,
        benchmarks=benchmarks,
    )


def _benchmarks(cfg, processor):
    """eval.benchmarks read and encoded with the stage's settings (None without any); a bad file is a user error."""
    from .benchmark import BenchmarkError, BenchmarkSuite
    from .console import UserError

    try:
        return BenchmarkSuite.build(cfg.eval, processor, cfg.encode)
    except BenchmarkError as e:
        raise UserError(f"eval.benchmarks: {e}") from e


def heldout_summary(res: Mapping[str, Any], tag: str) -> dict[str, float]:
    """What W&B's run summary keeps of one held-out evaluation: accuracy, loss, per modality and per task."""
    out = {f"accuracy_{tag}": res["accuracy"], f"heldout_loss_{tag}": res["loss"]}
    out.update({f"accuracy_{tag}/modality/{k}": v for k, v in res["accuracy_per_modality"].items()})
    out.update({f"accuracy_{tag}/task/{k}": v for k, v in res["accuracy_per_task"].items()})
    return out


__all__ = ["Evaluator", "build_evaluator", "heldout_summary"]

"""Multiple-choice video / image benchmarks: read, prompt, score by the generated option letter, compare with the
stage's starting checkpoint.

A benchmark file (``eval.benchmarks.<name>.path``, JSON list or JSONL) holds one question per record; media paths
are relative to ``eval.benchmarks.<name>.root`` (default: the file's folder). Read as they are:

* the common video-QA form: ``video`` (or ``image``) path, optional ``start`` / ``end`` (seconds: the clip),
  ``question``, ``options`` (a list of texts, or ``{"A": text, ...}``), ``answer`` (the letter), optional ``task``;
* MVBench's task JSONs: ``video``, ``question``, ``candidates`` (texts), ``answer`` (the correct text; its position
  gives the letter), optional ``start`` / ``end``;
* Video-MME's records: ``videoID`` (the file ``<videoID>.mp4`` under the root; ``video_path`` if given),
  ``question``, ``options`` written ``"A. text"`` (the letter prefix is dropped), ``answer`` letter, ``task_type``
  (the task);
* image sets in MMBench's columns: ``image``, ``question``, options as top-level ``A``, ``B``, ``C``, ``D`` keys.

A record that matches none (no question, fewer than two options, an answer that is not an option) is a
``bad_schema`` error naming the file and the record.

The prompt is lmms-eval's for these sets: the question, one ``"<letter>. <option>"`` line per option, then
``"Answer with the option's letter from the given choices directly."``, after the ``<video>`` / ``<image>``
placeholder, in the model's chat template; the model generates greedily (``eval.max_new_tokens``).

Letter-parse rule (:func:`parse_letter`, lmms-eval's Video-MME extraction made strict about words): strip the
answer, drop a leading phrase such as "The best answer is" / "The correct answer is" / "Answer:" / "Option"; an
answer of more than 10 words with no standalone letter is no answer; otherwise the first option letter that stands
alone (``B``, ``(B)``, ``B.``, ``B) red``, ``B: red``) is the answer. A capital inside a word (the "A" of "Apple")
is not a letter; lmms-eval's regex would take it. No letter: wrong, counted in ``unparsed``. Accuracy is the share
of questions whose parsed letter is the answer's; ``chance`` is the mean of ``1 / options``.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
POST_PROMPT = "Answer with the option's letter from the given choices directly."
_PREFIXES = (
    "the best answer is",
    "the correct answer is",
    "the answer is",
    "the answer",
    "the best option is",
    "the correct option is",
    "best answer:",
    "best option:",
    "answer:",
    "option",
)
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s+")


@dataclass
class Question:
    """One multiple-choice question, in the common form whatever the file's layout."""

    index: int  # record number in the file
    media: str | None  # video or image path, relative to the benchmark's root
    kind: str  # "video" | "image" | "text"
    question: str
    options: list[str]
    answer: str  # the correct letter
    task: str
    start: float | None = None
    end: float | None = None

    def prompt(self) -> str:
        lines = [
            self.question.strip(),
            *(f"{LETTERS[i]}. {o}" for i, o in enumerate(self.options)),
            POST_PROMPT,
        ]
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """The question as an official-schema record (the training reader's form), answered by its letter."""
        placeholder = {"video": "<video>\n", "image": "<image>\n", "text": ""}[self.kind]
        rec: dict[str, Any] = {
            "conversations": [
                {"from": "human", "value": placeholder + self.prompt()},
                {"from": "gpt", "value": self.answer},
            ],
            "task": self.task,
        }
        if self.kind != "text":
            rec[self.kind] = self.media
        if self.start is not None:
            rec["start"] = self.start
        if self.end is not None:
            rec["end"] = self.end
        return rec


class BenchmarkError(ValueError):
    """A benchmark file or record that cannot be read: names the file and the record."""


def _options(raw: dict[str, Any]) -> list[str] | None:
    opts = raw.get("options", raw.get("candidates"))
    if isinstance(opts, dict):
        opts = [opts[k] for k in sorted(opts)]
    if opts is None and all(k in raw for k in "AB"):  # MMBench's columns
        opts = [raw[k] for k in LETTERS if k in raw and raw[k] not in (None, "")]
    if not isinstance(opts, list) or not all(isinstance(o, str | int | float) for o in opts):
        return None
    out = [str(o) for o in opts]
    # Video-MME writes "A. text": drop the prefix when every option carries its own letter in order
    prefixed = [_LETTER_PREFIX.match(o) for o in out]
    if all(m is not None and m.group(1) == LETTERS[i] for i, m in enumerate(prefixed)):
        out = [o[m.end() :] for o, m in zip(out, prefixed, strict=True)]
    return out


def parse_record(raw: Any, index: int, source: str) -> Question:
    """One record of any layout the module docstring lists, as a :class:`Question`."""

    def bad(why: str) -> BenchmarkError:
        return BenchmarkError(f"{source}: record {index}: {why}")

    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad("no 'question'")
    options = _options(raw)
    if options is None or len(options) < 2:
        raise bad("needs 'options' (or MVBench's 'candidates', or A/B/... keys) with two or more choices")
    if len(options) > len(LETTERS):
        raise bad(f"{len(options)} options: at most {len(LETTERS)}")
    answer = raw.get("answer")
    letter = None
    if (
        isinstance(answer, str)
        and len(answer.strip()) == 1
        and answer.strip().upper() in LETTERS[: len(options)]
    ):
        letter = answer.strip().upper()
    elif isinstance(answer, str | int | float) and str(answer) in options:  # MVBench: the option's text
        letter = LETTERS[options.index(str(answer))]
    if letter is None:
        raise bad(
            f"'answer' {answer!r} is neither an option letter (A-{LETTERS[len(options) - 1]}) nor an option"
        )
    media, kind = None, "text"
    if raw.get("video") or raw.get("video_path") or raw.get("videoID"):
        kind = "video"
        media = raw.get("video") or raw.get("video_path")
        if not media:
            vid = str(raw["videoID"])
            media = vid if Path(vid).suffix else f"{vid}.mp4"
    elif raw.get("image"):
        kind, media = "image", raw["image"]
    if media is not None and not isinstance(media, str):
        raise bad("'video' / 'image' must be one path")
    task = raw.get("task") or raw.get("task_type") or raw.get("category") or "all"
    start, end = raw.get("start"), raw.get("end")
    return Question(
        index,
        media,
        kind,
        question,
        options,
        letter,
        str(task),
        float(start) if start is not None else None,
        float(end) if end is not None else None,
    )


def load_benchmark(path: str | Path, max_samples: int | None = None) -> list[Question]:
    """The questions of a benchmark file (JSON list or JSONL), the first ``max_samples`` when given."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else None
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e})") from None
    if records is None:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{path}: line {n} is not valid JSON ({e})") from None
    if max_samples is not None:
        records = records[:max_samples]
    return [parse_record(r, i, str(path)) for i, r in enumerate(records)]


def parse_letter(text: str | None, n_options: int) -> str | None:
    """The option letter a generated answer names, by the rule in the module docstring; None when it names none."""
    if not text:
        return None
    s = text.strip()
    lowered = s.lower()
    for prefix in _PREFIXES:
        if lowered.startswith(prefix):
            s = s[len(prefix) :].strip()
            break
    letters = LETTERS[:n_options]
    found = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", s)
    if len(s.split()) > 10 and found is None:
        return None
    return found.group(1) if found else None


# ----------------------------------------------------------------------------------------------------------------
# Encoding and scoring
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Benchmark:
    """A benchmark ready to score: its encoded questions, and the ones that could not be encoded."""

    name: str
    samples: list[tuple[dict[str, Any], Question]]
    bad_records: int
    chance: float


def prepare_benchmark(
    name: str, path: str, root: str | None, processor, config, max_samples=None
) -> Benchmark:
    """Read and encode a benchmark with the stage's encode settings; an unencodable question is logged and
    counted (a missing video is a data problem of that question, not of the run)."""
    from .data.encode import encode_record
    from .data.errors import DataError

    questions = load_benchmark(path, max_samples)
    media_root = root if root is not None else str(Path(path).parent)
    samples, bad = [], 0
    for q in questions:
        try:
            sample = encode_record(
                q.record(),
                data_root=media_root,
                processor=processor,
                config=config,
                dataset=name,
                index=q.index,
            )
        except DataError as e:
            bad += 1
            log.warning("benchmark %s: question skipped: %s", name, e)
            continue
        samples.append((sample, q))
    chance = sum(1 / len(q.options) for _, q in samples) / max(len(samples), 1)
    return Benchmark(name, samples, bad, chance)


def score_benchmark(
    model, bench: Benchmark, *, tokenizer, max_new_tokens: int = 8, device=None
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``bench`` by the parsed option letter.

    Returns ``accuracy``, ``chance``, ``n``, ``bad_records``, ``unparsed`` (answers naming no letter),
    ``accuracy_per_task`` and ``predictions`` (one row per question: task, media, prompt, reference letter,
    generated text, parsed letter, correct)."""
    from .evaluate import greedy_answer, stop_ids

    if hasattr(model, "get_base_model"):  # PEFT: adapters live inside the base model
        model = model.get_base_model()
    device = device or next(model.parameters()).device
    stops = stop_ids(tokenizer, model)
    was_training = model.training
    model.eval()
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    predictions, unparsed = [], 0
    try:
        for sample, q in bench.samples:
            gen = greedy_answer(model, sample, tokenizer, device, max_new_tokens, stops)
            text = gen["text"] if gen else ""
            letter = parse_letter(text, len(q.options))
            unparsed += int(letter is None)
            correct = letter == q.answer
            per_task[q.task][0] += int(correct)
            per_task[q.task][1] += 1
            predictions.append(
                {
                    "task": q.task,
                    "media": q.media,
                    "kind": q.kind,
                    "start": q.start,
                    "end": q.end,
                    "prompt": q.prompt(),
                    "reference": q.answer,
                    "generated": text,
                    "letter": letter,
                    "correct": correct,
                }
            )
    finally:
        model.train(was_training)
    n = len(bench.samples)
    return {
        "accuracy": sum(h for h, _ in per_task.values()) / n if n else None,
        "chance": bench.chance,
        "n": n,
        "bad_records": bench.bad_records,
        "unparsed": unparsed,
        "accuracy_per_task": {t: h / c for t, (h, c) in sorted(per_task.items())},
        "predictions": predictions,
    }


def regressions(start: dict[str, dict], now: dict[str, dict], max_regression: float) -> list[dict[str, Any]]:
    """The benchmarks whose accuracy fell more than ``max_regression`` (absolute, 0-1) below ``start``:
    ``[{"benchmark", "start", "now", "drop"}]``; a benchmark missing on either side is not compared."""
    out = []
    for name, res in now.items():
        before = (start.get(name) or {}).get("accuracy")
        after = res.get("accuracy")
        if before is None or after is None:
            continue
        drop = before - after
        if drop > max_regression + 1e-12:
            out.append({"benchmark": name, "start": before, "now": after, "drop": drop})
    return out


def regression_message(found: list[dict[str, Any]], max_regression: float, when: str) -> str:
    """One line per regressed benchmark, for the console."""
    return "\n".join(
        f"REGRESSION: benchmark {r['benchmark']} fell from {r['start']:.3f} at the stage's start to {r['now']:.3f} "
        f"{when} ({r['drop']:.3f} > eval.max_regression={max_regression})"
        for r in found
    )


class BenchmarkSuite:
    """A stage's benchmarks (``eval.benchmarks``): read and encoded once (on the rank that evaluates), scored at
    each evaluation; the first scores taken (the starting checkpoint, or those recorded by an interrupted run) are
    what :meth:`check` compares with."""

    def __init__(self, benchmarks: dict[str, Benchmark], roots: dict[str, str], eval_cfg, tokenizer) -> None:
        self.benchmarks = benchmarks
        self.roots = roots  # name -> media root (thumbnails)
        self.cfg = eval_cfg
        self.tokenizer = tokenizer
        self.start: dict[str, dict[str, Any]] | None = None
        self.last_regressions: list[dict[str, Any]] = []

    @classmethod
    def build(cls, eval_cfg, processor, encode_cfg) -> BenchmarkSuite | None:
        """None without ``eval.benchmarks``; a file that cannot be read raises :class:`BenchmarkError`."""
        if not eval_cfg.benchmarks:
            return None
        benches, roots = {}, {}
        for name, b in eval_cfg.benchmarks.items():
            roots[name] = b.root if b.root is not None else str(Path(b.path).parent)
            benches[name] = prepare_benchmark(name, b.path, b.root, processor, encode_cfg, b.max_samples)
            log.info(
                "benchmark %s: %d questions (%d skipped), chance %.3f",
                name,
                len(benches[name].samples),
                benches[name].bad_records,
                benches[name].chance,
            )
        return cls(benches, roots, eval_cfg, processor.tokenizer)

    def score(self, model, when: str) -> dict[str, dict[str, Any]]:
        """Every benchmark scored on ``model``; one console line each (``when``: "before", "step 500", ...). The
        first call's scores become :attr:`start` unless a start was set."""
        out = {}
        for name, bench in self.benchmarks.items():
            res = score_benchmark(
                model, bench, tokenizer=self.tokenizer, max_new_tokens=self.cfg.max_new_tokens
            )
            out[name] = res
            start = (self.start or {}).get(name, {}).get("accuracy")
            log.info(
                "benchmark %s %s: accuracy %s (%sunparsed %d of %d, chance %.3f)",
                name,
                when,
                _fmt(res["accuracy"]),
                f"start {_fmt(start)}, " if start is not None else "",
                res["unparsed"],
                res["n"],
                res["chance"],
            )
        if self.start is None:
            self.start = out
        return out

    def check(self, results: dict[str, dict[str, Any]], when: str) -> list[dict[str, Any]]:
        """The regressions of ``results`` against the start, each named in a warning."""
        if self.start is None:
            return []
        found = regressions(self.start, results, self.cfg.max_regression)
        if found:
            log.warning("%s", regression_message(found, self.cfg.max_regression, when))
        return found

    # --- a stage's three moments: its start, every eval.every steps, its end -----------------------------------

    def at_start(self, model, writer, results: dict[str, Any], out_dir: Path, resuming: bool) -> None:
        """Score the starting checkpoint (``results["benchmarks_before"]``, kept in ``benchmarks_start.json`` so
        a resumed run compares with the real start); a resumed run reads it back instead."""
        path = Path(out_dir) / "benchmarks_start.json"
        if resuming and path.is_file():
            self.start = json.loads(path.read_text())
            results["benchmarks_before"] = self.start
            return
        if resuming:
            log.warning(
                "eval.benchmarks: the interrupted run recorded no start; the resumed checkpoint is the start"
            )
        results["benchmarks_before"] = summarised(self.at_step(model, writer, 0, "before"))
        path.write_text(json.dumps(results["benchmarks_before"], indent=2) + "\n")

    def at_step(self, model, writer, step: int, when: str | None = None) -> dict[str, dict[str, Any]]:
        """Score, log (metrics, W&B tables), warn about regressions against the start."""
        from .dashboard import log_benchmarks

        when = when or f"at step {step}"
        res = self.score(model, when)
        log_benchmarks(writer, res, self.roots, step)
        self.last_regressions = self.check(res, when)
        return res

    def at_end(self, model, writer, results: dict[str, Any], step: int) -> None:
        """The stage's verdict: ``benchmarks_after``, ``benchmark_regressions`` (what eval.fail_on_regression
        acts on), the W&B summary."""
        results["benchmarks_after"] = summarised(self.at_step(model, writer, step, "after the stage"))
        results["benchmark_regressions"] = self.last_regressions
        writer.summary(
            {
                f"bench/{n}/accuracy_{t}": r["accuracy"]
                for t in ("before", "after")
                for n, r in results.get(f"benchmarks_{t}", {}).items()
            }
        )


def summarised(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``results`` without the per-question predictions: what ``results.json`` keeps."""
    return {name: {k: v for k, v in r.items() if k != "predictions"} for name, r in results.items()}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = [
    "POST_PROMPT",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkSuite",
    "Question",
    "load_benchmark",
    "parse_letter",
    "parse_record",
    "prepare_benchmark",
    "regression_message",
    "regressions",
    "score_benchmark",
    "summarised",
]

"""Multiple-choice benchmarks: the public layouts are read as they are, the option letter is parsed by the
documented rule, a trained tiny model beats chance on a generated set, and a degraded one trips the alarm."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_sample_data import gen

from videollama3_train.benchmark import (
    POST_PROMPT,
    BenchmarkError,
    load_benchmark,
    parse_letter,
    parse_record,
    regression_message,
    regressions,
)


@pytest.mark.parametrize(
    ("text", "n", "letter"),
    [
        ("B", 4, "B"),
        ("(C)", 4, "C"),
        ("B. Takes a cup.", 4, "B"),
        ("D) red", 4, "D"),
        ("The best answer is A", 4, "A"),
        ("The correct answer is (D).", 4, "D"),
        ("Answer: C", 4, "C"),  # lmms-eval's regex would take the A of "Answer"
        ("Apple", 4, None),  # a capital inside a word is no letter
        ("E", 4, None),  # not an option
        ("E", 5, "E"),
        ("red", 4, None),
        ("", 4, None),
        ("the person in the video opens the door and then walks to the table and sits", 4, None),
        ("I think it is B because the person sits down after opening the door slowly", 4, "B"),
    ],
)
def test_parse_letter(text, n, letter):
    assert parse_letter(text, n) == letter


def test_public_layouts_read_as_they_are(tmp_path: Path):
    common = {
        "video": "v.mp4",
        "start": 1,
        "end": 4.5,
        "question": "Q?",
        "options": ["a", "b", "c"],
        "answer": "c",
    }
    q = parse_record(common, 0, "f.json")
    assert (q.kind, q.media, q.answer, q.start, q.end, q.task) == ("video", "v.mp4", "C", 1.0, 4.5, "all")
    assert q.prompt() == f"Q?\nA. a\nB. b\nC. c\n{POST_PROMPT}"
    mvbench = {"video": "x.mp4", "question": "Q?", "candidates": ["sit", "stand", "run"], "answer": "stand"}
    assert parse_record(mvbench, 0, "f").answer == "B"
    videomme = {
        "videoID": "fFjv93ACGo8",
        "question": "Q?",
        "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. Three."],
        "answer": "C",
        "task_type": "Counting Problem",
    }
    q = parse_record(videomme, 3, "f")
    assert (q.media, q.options[0], q.answer, q.task) == (
        "fFjv93ACGo8.mp4",
        "Apples.",
        "C",
        "Counting Problem",
    )
    mmbench = {"image": "i.jpg", "question": "Q?", "A": "x", "B": "y", "C": "z", "D": None, "answer": "A"}
    q = parse_record(mmbench, 0, "f")
    assert (q.kind, q.options, q.answer) == ("image", ["x", "y", "z"], "A")
    assert parse_record(
        {"question": "Q?", "options": {"B": "y", "A": "x"}, "answer": "b"}, 0, "f"
    ).options == [
        "x",
        "y",
    ]
    # the training reader's record: the placeholder, the prompt, the letter as the answer
    rec = parse_record(common, 0, "f").record()
    assert rec["video"] == "v.mp4" and rec["conversations"][0]["value"].startswith("<video>\nQ?")
    assert rec["conversations"][1]["value"] == "C" and (rec["start"], rec["end"]) == (1.0, 4.5)


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({"options": ["a", "b"], "answer": "A"}, "no 'question'"),
        ({"question": "Q", "options": ["a"], "answer": "A"}, "two or more choices"),
        ({"question": "Q", "options": ["a", "b"], "answer": "C"}, r"neither an option letter \(A-B\)"),
        ({"question": "Q", "options": ["a", "b"], "answer": "A", "video": ["a.mp4"]}, "one path"),
    ],
)
def test_bad_records_name_file_and_record(tmp_path: Path, record, why):
    path = tmp_path / "b.jsonl"
    good = {"question": "Q", "options": ["a", "b"], "answer": "A"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(BenchmarkError, match=rf"b.jsonl: record 1: .*{why}"):
        load_benchmark(path)


def test_regressions():
    start = {"a": {"accuracy": 0.66}, "b": {"accuracy": 0.5}, "c": {"accuracy": None}}
    now = {"a": {"accuracy": 0.48}, "b": {"accuracy": 0.46}, "c": {"accuracy": 0.1}, "d": {"accuracy": 0.0}}
    found = regressions(start, now, 0.05)
    assert [r["benchmark"] for r in found] == ["a"] and found[0]["drop"] == pytest.approx(0.18)
    assert regressions(start, now, 0.2) == []
    assert "benchmark a fell from 0.660" in regression_message(found, 0.05, "after the stage")


# ----------------------------------------------------------------------------------------------------------------
# Through the train command: a trained model beats chance, a degrading stage trips the alarm
# ----------------------------------------------------------------------------------------------------------------


def _rotated(questions: list[dict], position: int) -> list[dict]:
    """The questions with the correct option moved to ``position`` (its letter the new answer)."""
    out = []
    for q in questions:
        correct = q["options"][ord(q["answer"]) - ord("A")]
        others = [o for o in q["options"] if o != correct]
        options = others[:position] + [correct] + others[position:]
        out.append({**q, "options": options, "answer": "ABCDEFGH"[position]})
    return out


def _training_records(questions: list[dict], path: Path) -> Path:
    """Benchmark questions as training records (the benchmark's own prompt, answered by the letter)."""
    lines = [json.dumps(parse_record(q, i, "gen").record()) for i, q in enumerate(questions)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow  # two tiny stages through the train command
def test_a_trained_model_beats_chance_and_a_degrading_stage_trips_the_alarm(tmp_path: Path, capsys, caplog):
    """Stage 1 learns to answer text questions whose correct option is listed first: on a held-out benchmark of
    such questions (other phrasings) it beats chance. Stage 2, from stage 1's export, is trained on questions
    whose answer is the second option: the benchmark falls below its start, the warning names it and, with
    eval.fail_on_regression=true, the command ends with exit status 3 after writing its export."""
    from videollama3_train.train import main

    gen.generate_benchmark(tmp_path, seed=4, n_train=48, n_test=16, tasks=("opposite",))
    train_q = json.loads((tmp_path / "mc_train.json").read_text())
    test_q = json.loads((tmp_path / "mc_test.json").read_text())
    (tmp_path / "bench.json").write_text(json.dumps(_rotated(test_q, 0)))
    first = _training_records(_rotated(train_q, 0), tmp_path / "first.jsonl")
    second = _training_records(_rotated(train_q, 1), tmp_path / "second.jsonl")
    common = [
        "model=tiny",
        "data=file",
        "logger=disabled",
        "+eval.benchmarks={mc:{path:" + str(tmp_path / "bench.json") + "}}",
        "eval.max_new_tokens=4",
        "data.num_workers=0",
        "data.cost_workers=0",
    ]
    assert (
        main(
            [
                *common,
                "stage=multitask_sft",
                f"data.path={first}",
                "trainer.max_steps=12",
                f"output_dir={tmp_path / 's1'}",
            ]
        )
        == 0
    )
    r1 = json.loads((tmp_path / "s1" / "results.json").read_text())
    before, after = r1["benchmarks_before"]["mc"], r1["benchmarks_after"]["mc"]
    assert after["accuracy"] > after["chance"] + 0.25, (before, after)  # chance 1/8
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="videollama3_train.benchmark"):
        code = main(
            [
                *common,
                "stage=multitask_sft",
                f"data.path={second}",
                "trainer.max_steps=12",
                f"init_from={tmp_path / 's1' / 'export'}",
                "eval.fail_on_regression=true",
                f"output_dir={tmp_path / 's2'}",
            ]
        )
    assert code == 3
    r2 = json.loads((tmp_path / "s2" / "results.json").read_text())
    assert r2["benchmarks_before"]["mc"]["accuracy"] == pytest.approx(after["accuracy"])
    (reg,) = r2["benchmark_regressions"]
    assert reg["benchmark"] == "mc" and reg["drop"] > 0.05
    assert any("REGRESSION: benchmark mc fell" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "s2" / "export" / "config.json").is_file()  # exported before the non-zero exit

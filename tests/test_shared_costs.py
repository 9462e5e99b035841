"""One cost pass for doctor, prepare and train: each reads and writes training's shared cost table
(``data.cost_cache_dir``), so whichever runs first costs the records and the others read them."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
from mediagen import make_image, make_video

from videollama3_train.config import compose
from videollama3_train.data import build as build_mod
from videollama3_train.data import encode as encode_mod
from videollama3_train.data.annotations import load_annotations
from videollama3_train.data.costs import COST_COLUMNS, compute_costs, cost_cache, load_cost_table
from videollama3_train.offline import run_doctor
from videollama3_train.run import build_stage_processor, build_tokenizer_for

STAGE = "multitask_sft"


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Images, a video, text and bad records (missing file, too long for the budget)."""
    root = tmp_path_factory.mktemp("shared")
    (root / "m").mkdir()
    conv = lambda tag, q: [{"from": "human", "value": tag + q}, {"from": "gpt", "value": "an answer"}]  # noqa: E731
    make_image(root / "m" / "a.jpg", (120, 90))
    make_image(root / "m" / "b.png", (40, 300))
    make_video(root / "m" / "v.mp4", seconds=2.0, fps=10.0)
    recs = [
        {"image": "m/a.jpg", "conversations": conv("<image>\n", "What is it?")},
        {"image": "m/b.png", "conversations": conv("<image>\n", "And this?")},
        {"video": ["m/v.mp4"], "conversations": conv("<video>\n", "Describe.")},
        {"conversations": conv("", "a question with no media")},
        {"image": "m/missing.jpg", "conversations": conv("<image>\n", "Gone?")},
        {"conversations": conv("", "long " * 3000)},
    ]
    ann = root / "train.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root, ann, len(recs)


def _overrides(root, ann, cache_dir):
    return [
        "data=file",
        f"data.path={ann}",
        f"data.root={root}",
        f"data.cost_cache_dir={cache_dir}",
        "data.cost_workers=0",
        "data.max_bad_fraction=0.5",
        "encode.max_length=1024",
        "encode.length_policy=drop",
        "logger=disabled",
        f"stage={STAGE}",
    ]


def _training_table(cfg, processor):
    """The oracle: training's own cost pass, no cache (every record costed here)."""
    ((name, spec),) = cfg.data.resolved_datasets().items()
    fn = partial(
        build_mod._cost_of,
        root=spec.root,
        processor=processor,
        config=spec.encode_config(cfg.encode),
        dataset=name,
    )
    return compute_costs(load_annotations(spec.path), fn, progress=False, columns=COST_COLUMNS)


def _forbid_costing(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a record was costed again")

    monkeypatch.setattr(build_mod, "_cost_of", refuse)
    monkeypatch.setattr(encode_mod, "estimate_cost_row", refuse)


def test_doctor_then_train_costs_once(small_set, tmp_path, monkeypatch):
    root, ann, n = small_set
    overrides = _overrides(root, ann, tmp_path / "costs")
    argv = [*overrides, f"output_dir={tmp_path / 'doctor'}", "doctor.workers=0", f"doctor.stages=[{STAGE}]"]
    run_doctor(compose("doctor", argv), argv, progress=False)
    first = json.loads((tmp_path / "doctor" / "report.json").read_text())

    cfg = compose("train", [*overrides, f"output_dir={tmp_path / 'run'}"])
    processor = build_stage_processor(build_tokenizer_for(cfg), cfg.encode)
    ((name, spec),) = cfg.data.resolved_datasets().items()
    cache, key = cost_cache(
        spec.path, spec.encode_config(cfg.encode), processor.tokenizer, cache_dir=tmp_path / "costs"
    )
    written = load_cost_table(cache, key, n, COST_COLUMNS)
    oracle = _training_table(cfg, processor)
    assert written is not None, "the doctor wrote no table under training's key"
    np.testing.assert_array_equal(written.costs, oracle.costs)
    assert written.failures == oracle.failures and set(oracle.reason_counts()) == {"missing_file", "too_long"}

    _forbid_costing(monkeypatch)
    _, _, costs, failures = build_mod.load_costed(
        cfg.data, cfg.encode, processor, is_main=True
    )  # train's load
    np.testing.assert_array_equal(costs[0], oracle.costs)
    assert failures == {name: dict(oracle.reason_counts())}

    # and the doctor after it reads the table: nothing costed, the same report
    argv[-3] = f"output_dir={tmp_path / 'doctor2'}"
    run_doctor(compose("doctor", argv), argv, progress=False)
    again = json.loads((tmp_path / "doctor2" / "report.json").read_text())
    assert again["stages"] == first["stages"] and again["totals"] == first["totals"]


def test_prepare_then_train_costs_once(small_set, tmp_path, monkeypatch, capsys):
    from videollama3_train.offline import prepare_command

    root, ann, n = small_set
    overrides = _overrides(root, ann, tmp_path / "costs")
    cfg = compose(
        "prepare", [*overrides, f"encode.frame_cache_dir={tmp_path / 'frames'}", "prepare.workers=0"]
    )
    assert prepare_command(cfg) == 0
    out = capsys.readouterr().out
    # the command's last output is its JSON counts (indent=2: a line that is "{"); log lines before it may hold
    # dicts of their own when an earlier test left a console handler on stdout
    counts = json.loads(out[out.rindex("\n{\n") + 1 :] if "\n{\n" in out else out[out.index("{\n") :])
    assert (counts["cost_table_records"], counts["cost_table_failed"]) == (n, 2)
    tcfg = compose("train", [*overrides, f"output_dir={tmp_path / 'run'}"])
    processor = build_stage_processor(build_tokenizer_for(tcfg), tcfg.encode)
    oracle = _training_table(tcfg, processor)
    _forbid_costing(monkeypatch)
    _, _, costs, _ = build_mod.load_costed(tcfg.data, tcfg.encode, processor, is_main=True)
    np.testing.assert_array_equal(costs[0], oracle.costs)

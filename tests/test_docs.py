"""Docs that must not drift from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    """docs/config.md is generated from the config dataclasses; a new or changed key must be regenerated."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_doc.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_config_key_has_a_meaning():
    """Every key of every command's config says what it means (the comment above or beside its field)."""
    rows = [r for r in (ROOT / "docs" / "config.md").read_text().splitlines() if r.startswith("| `")]
    assert len(rows) > 80
    blank = [r.split("|")[1].strip() for r in rows if not r.rstrip().rstrip("|").split("|")[-1].strip()]
    assert not blank, f"keys without a meaning in docs/config.md: {blank}"
    for key in ("trainer.lr_scale", "stages", "doctor.workers", "prepare.max_pixels_per_frame", "checkpoint"):
        assert any(r.startswith(f"| `{key}` |") for r in rows), key


def test_config_doc_reads_comments_above_and_beside_a_field():
    import importlib.util
    from dataclasses import dataclass

    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "scripts" / "gen_config_doc.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)

    @dataclass
    class Example:
        # --- a banner is not a meaning ------------------------------------------
        beside: int = 1  # tokens per thing
        # a block above,
        # over two lines
        above: int = 2
        wrapped: str | None = None  # the formatter moved this comment inside the parentheses
        bare: int = 3

    assert gen.field_comments(Example) == {
        "beside": "tokens per thing",
        "above": "a block above, over two lines",
        "wrapped": "the formatter moved this comment inside the parentheses",
        "bare": "",
    }


def test_readme_commands_are_what_ci_and_quickstart_run():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for doc in ("data_format", "stages", "finetune", "config", "launch", "doctor", "architecture"):
        assert (ROOT / "docs" / f"{doc}.md").is_file(), doc


def test_docs_and_code_stand_alone():
    """Nothing points outside the repository: the facts live in docs/reference.md (cited as `docs/reference.md §N`)."""
    import re

    pattern = re.compile(r"\bREFERENCE\b|\.\./shared")
    found = []
    for top in ("docs", "README.md", "videollama3_train", "configs", "launch"):
        path = ROOT / top
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for f in files:
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:80]}")
    assert not found, "\n".join(found)
    sections = re.findall(r"^## (§\d)", (ROOT / "docs" / "reference.md").read_text(), flags=re.M)
    assert sections == [f"§{i}" for i in range(1, 7)]


def test_docs_tell_what_a_first_day_needs():
    readme = (ROOT / "README.md").read_text()
    for said in ("VL3_TRACEBACK=1", "--help", "run.json", "reschedule=true", "docs/reference.md"):
        assert said in readme, said
    launch = (ROOT / "docs" / "launch.md").read_text()
    for said in ("shared filesystem", "--cpus-per-task", "DRY_RUN=1", "resolve against the"):
        assert said in launch, said
    assert "stage: finetune" in (ROOT / "docs" / "finetune.md").read_text()
    assert "`custom`" not in (ROOT / "docs" / "finetune.md").read_text()

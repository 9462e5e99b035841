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


def test_readme_commands_are_what_ci_and_quickstart_run():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for doc in ("data_format", "stages", "finetune", "config", "launch", "doctor", "architecture"):
        assert (ROOT / "docs" / f"{doc}.md").is_file(), doc

"""Write docs/config.md from the config dataclasses: every key, its type, default and meaning.

python scripts/gen_config_doc.py          # rewrite docs/config.md
python scripts/gen_config_doc.py --check  # exit 1 if docs/config.md is stale or a key has no meaning (tests)

A field's meaning is its comment: the block of ``#`` lines directly above it, then the comment at the end of its
line(s) (a field that the formatter wrapped over several lines keeps its comment inside). Section banners
(``# --- vision ---``) are not meanings. Every dataclass reachable from a command's schema must have a section.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from videollama3_train.config import (  # noqa: E402
    SCHEMAS,
    BenchmarkConfig,
    EvalConfig,
    ExportConfig,
    LoggerConfig,
    LoraConfig,
    PipelineConfig,
    PrepareOptions,
    ReportConfig,
    RunConfig,
    ScanConfig,
)
from videollama3_train.data.config import DataConfig, DatasetConfig, EncodeConfig  # noqa: E402
from videollama3_train.model.core import ModelConfig  # noqa: E402
from videollama3_train.trainer.config import TrainConfig  # noqa: E402

# (key prefix, dataclass, title, base whose fields are documented elsewhere)
SECTIONS = [
    ("", RunConfig, "Top level (train.yaml; every command's config starts from it)", None),
    ("model", ModelConfig, "Model core (videollama3_train/model/core.py)", None),
    ("encode", EncodeConfig, "One record to one sample (videollama3_train/data/config.py)", None),
    ("data", DataConfig, "Datasets, packing and loading (videollama3_train/data/config.py)", None),
    ("data.datasets.<name>", DatasetConfig, "One dataset of a mixture", None),
    ("trainer", TrainConfig, "The training loop (videollama3_train/trainer/config.py)", None),
    ("logger", LoggerConfig, "Logging", None),
    ("eval", EvalConfig, "Held-out evaluation and benchmarks", None),
    ("eval.benchmarks.<name>", BenchmarkConfig, "One multiple-choice benchmark (docs/benchmarks.md)", None),
    ("lora", LoraConfig, "LoRA fine-tuning (videollama3_train/model/lora.py, peft)", None),
    ("", PipelineConfig, "Pipeline (pipeline.yaml): the train keys, less `stage=`, plus", RunConfig),
    (
        "doctor",
        ScanConfig,
        "Data doctor (doctor.yaml): the train keys plus (videollama3_train/data/scan.py)",
        None,
    ),
    ("prepare", PrepareOptions, "Frame-cache preparation (prepare.yaml): the train keys plus", None),
    ("", ExportConfig, "Checkpoint export (export.yaml)", None),
    ("", ReportConfig, "Report over stage runs (report.yaml)", None),
]


def _is_banner(text: str) -> bool:
    return text.startswith(("---", "===")) or text.endswith(("---", "==="))


def field_comments(cls) -> dict[str, str]:
    """name -> meaning of each field defined in ``cls``'s own body (see the module docstring)."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    skip = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in skip:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    (node,) = ast.parse(src).body
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        above: list[str] = []
        n = stmt.lineno - 1
        while n in comments and n not in code_lines and not _is_banner(comments[n]):
            above.insert(0, comments[n])
            n -= 1
        out[stmt.target.id] = " ".join(above + trailing)
    return out


def fmt_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
        if dataclasses.is_dataclass(v):
            return "(section)"
    else:
        return "required"
    return "`???` (required)" if v == "???" else f"`{v!r}`"


def _nested(cls) -> set[type]:
    """Every dataclass reachable from ``cls``'s fields (sections, dict values), ``cls`` included."""
    found = {cls}
    for t in typing.get_type_hints(cls).values():
        for arg in (t, *typing.get_args(t)):
            if dataclasses.is_dataclass(arg) and arg not in found:
                found |= _nested(arg)
    return found


def rows() -> list[tuple[str, str, str, str, str]]:
    """``(section title, key, type, default, meaning)`` of every documented key, in page order."""
    out = []
    for prefix, cls, title, base in SECTIONS:
        comments = field_comments(cls)
        hints = typing.get_type_hints(cls)
        inherited = {f.name for f in dataclasses.fields(base)} if base else set()
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t) or f.name in inherited:
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            tname = t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")
            tname = re.sub(r"\b(\w+\.)+(\w+)", r"\2", tname)  # module paths of nested types
            meaning = comments.get(f.name, "").replace("|", "/")
            out.append((title, key, tname.replace("|", "\\|"), fmt_default(f), meaning))
    return out


def render() -> str:
    missing = set().union(*(_nested(s) for s in SCHEMAS.values())) - {s[1] for s in SECTIONS}
    missing -= {c for c in missing if any(issubclass(c, s[1]) for s in SECTIONS)}  # e.g. DoctorConfig
    if missing:
        raise SystemExit(
            f"config dataclasses without a section in SECTIONS: {sorted(c.__name__ for c in missing)}"
        )
    out = [
        "# Configuration reference",
        "",
        "Generated by `python scripts/gen_config_doc.py` from the dataclasses (the single source of truth); a test",
        "fails when this page is stale or a key has no meaning. Override any key on the command line:",
        "`trainer.lr_llm=2e-5`, `encode.max_visual_tokens=4096`. A misspelt key or a wrong type stops the run at",
        "start, naming the key. Config groups: `stage=` (configs/stage), `model=` (configs/model), `data=`",
        "(configs/data), `logger=` (configs/logger). Every command composes `configs/<command>.yaml`; the doctor and",
        "prepare take the train keys too, so they see exactly the data, encode settings and budgets training will.",
        "",
    ]
    current = None
    for title, key, tname, default, meaning in rows():
        if title != current:
            if current is not None:
                out.append("")
            out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            current = title
        out.append(f"| `{key}` | {tname} | {default} | {meaning} |")
    out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    target = ROOT / "docs" / "config.md"
    text = render()
    if args.check:
        blank = [key for _, key, _, _, meaning in rows() if not meaning]
        if blank:
            print(f"config keys without a meaning (add a comment to the field): {blank}", file=sys.stderr)
            return 1
        if not target.exists() or target.read_text() != text:
            print("docs/config.md is stale: run python scripts/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

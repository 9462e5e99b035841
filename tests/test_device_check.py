"""The device check (``benchmarks/device_check.py``) cannot rot: its CPU dry run runs here, in a subprocess where the
packages the GPU box lacks (deepspeed, hydra, omegaconf, wandb, av, datasets, flash-attn, liger) cannot be imported,
and must write a JSON result with the three parts and their numbers.

The packages are made absent by a ``sitecustomize.py`` on ``PYTHONPATH`` (imported by every interpreter at start):
a ``sys.meta_path`` finder raises ImportError naming the importing line, and ``importlib.util.find_spec`` answers
None for them (how transformers / accelerate probe optional packages).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("deepspeed", "hydra", "omegaconf", "wandb", "av", "datasets", "flash_attn", "liger_kernel")

SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.util, sys, traceback

    BLOCKED = set(__BLOCKED__)

    class _Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in BLOCKED:
                return None
            stack = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            where = stack[-1] if stack else None
            line = f"{where.filename}:{where.lineno}: {where.line}" if where else "?"
            raise ImportError(f"blocked import of {name!r} (absent on the GPU box) at {line}")

    sys.meta_path.insert(0, _Absent())
    _find_spec = importlib.util.find_spec

    def _probe(name, package=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return _find_spec(name, package)

    importlib.util.find_spec = _probe
    """
).replace("__BLOCKED__", repr(BLOCKED))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _guard_dir(root: Path) -> Path:
    guard = root / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return guard


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("device_check")
    guard, out = _guard_dir(root), root / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(guard), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # two B4 settings of the six (every 2nd LLM layer checkpointed; every layer and the tower): the code paths the
    # sweep takes, at a third of its time (the rest differ only in the numbers given to the same functions)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--dry-run", "--out", str(out)]
    cmd += ["--sweep", "2:off,1:on"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    path = out / "device_check.json"
    assert path.exists(), (
        f"no result written (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return {
        "rc": proc.returncode,
        "log": proc.stdout + proc.stderr,
        "result": json.loads(path.read_text()),
        "md": (out / "device_check.md").read_text(),
    }


def test_guard_blocks_the_packages(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(_guard_dir(tmp_path))}
    code = (
        "import importlib.util\n"
        "assert importlib.util.find_spec('wandb') is None\n"
        "try:\n    import deepspeed\nexcept ImportError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "blocked import of 'deepspeed'" in proc.stdout


STEP_PATH = (
    "videollama3_train.contract",
    "videollama3_train.model.api",
    "videollama3_train.model.attention",
    "videollama3_train.model.core",
    "videollama3_train.model.presets",
    "videollama3_train.data.collate",
    "videollama3_train.data.packing",
    "videollama3_train.trainer.loss",
    "videollama3_train.trainer.metrics",
    "videollama3_train.trainer.step",
)


def test_step_path_imports_without_the_blocked_packages(tmp_path: Path) -> None:
    """The modules of the training step import with none of the blocked packages (lazy imports only)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_guard_dir(tmp_path)), str(ROOT)])}
    code = (
        "import importlib, sys\n"
        f"for m in {STEP_PATH!r}:\n    importlib.import_module(m)\n"
        f"print(sorted({{k.split('.')[0] for k in sys.modules}} & set({BLOCKED!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)  # not NaN, not inf


def test_dry_run_writes_the_three_parts_with_numbers(dry_run) -> None:
    r, log = dry_run["result"], dry_run["log"]
    assert "blocked import" not in log, log[-5000:]
    assert r["schema"] == 1 and r["mode"] == "cpu-dry-run" and r["aborted"] is None
    assert _number(r["elapsed_s"]) and r["elapsed_s"] < r["budget_s"] and not r["budget_exceeded"]
    for part in ("isolation", "b4", "b5"):
        assert r[part]["status"] in ("ok", "failed"), f"{part}: {r[part].get('error', r[part]['status'])}"

    # (a) isolation: every case measured, both towers hit the kernel, both negative controls ran
    cases = r["isolation"]["cases"]
    assert {c["shape"] for c in cases} == {"tiny", "2b-head-dims"}
    for c in cases:
        assert "error" not in c, c.get("error")
        assert c["backend"] == "flash_varlen_reference"
        for key in (
            "loss_packed",
            "loss_alone_bf16",
            "loss_alone_fp32",
            "loss_rel_diff_bf16",
            "loss_rel_diff_fp32",
        ):
            assert _number(c[key]), key
        assert {"vision", "projector", "llm", "all"} <= set(c["grad_cosine"])
        assert all(_number(v) for v in c["grad_cosine"].values())
        assert c["kernel_calls"] == c["kernel_calls_expected"] > 0
        assert {"llm", "vision"} == set(c["leak"])
        assert {"image", "video", "text"} <= set(c["samples"])

    # (b) B4: the baseline and at least the first sweep setting measured
    b4 = r["b4"]
    assert b4["shape"] == "tiny" and b4["attn"] == "flash_varlen_reference"
    base = b4["baseline"]
    assert base["status"] == "ok" and base["batch_size"] >= 1
    ours = [o for o in b4["ours"] if o["status"] == "ok"]
    assert [o["setting"] for o in b4["ours"]] == ["LLM 1/2, vision off", "LLM all, vision on"]  # --sweep
    assert ours and ours[0]["setting"] == b4["ours"][0]["setting"]
    for row in [base, *ours]:
        for key in ("tokens_per_s", "mfu", "peak_bytes", "step_s"):
            assert _number(row[key]) and row[key] > 0, key
    assert _number(b4["speedup_tokens_per_s"])

    # (c) B5: both methods, time and peak memory; the same loss
    res = r["b5"]["results"]
    by = {(x["method"], x["label_frac"]): x for x in res}
    assert {m for m, _ in by} == {"ours", "transformers"}
    for x in res:
        assert _number(x["seconds"]) and _number(x["peak_bytes"]) and x["peak_bytes"] > 0
    frac = min(f for m, f in by if m == "transformers")
    assert abs(by[("ours", frac)]["loss"] - by[("transformers", frac)]["loss"]) < 1e-4

    # (d) B11: every row has a prediction and a time, and the correlation of the two is a number
    cost = r["cost"]
    assert cost["status"] == "ok", cost.get("error")
    assert len(cost["rows"]) >= 20 and cost["shape"] == "tiny"
    assert all(x["flops"] > 0 and x["seconds"] > 0 for x in cost["rows"])
    assert _number(cost["spearman"]) and -1 <= cost["spearman"] <= 1

    md = dry_run["md"]
    assert "CPU DRY RUN" in md and "## (a)" in md and "## (b)" in md and "## (c)" in md and "## (d)" in md


def test_dry_run_isolation_passes(dry_run) -> None:
    """Packed == unpacked through the varlen plumbing, in bf16, with what reaches the kernel being what the CUDA
    kernel accepts (q, k, v in one half dtype), and negative controls that the check sees."""
    iso = dry_run["result"]["isolation"]
    failed = {
        f"{c['shape']}/{c['backend']}": [k for k, v in c["checks"].items() if not v] for c in iso["cases"]
    }
    assert iso["status"] == "ok", failed
    assert dry_run["rc"] == 0, dry_run["log"][-3000:]

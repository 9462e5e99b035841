"""Smoke tests of the training benchmarks (B4 ``bench_step.py``, B5 ``bench_loss.py``) and of the constraint they
live under: the GPU box has torch, transformers and accelerate but no hydra / omegaconf / wandb / datasets / av /
deepspeed, so the modules the benchmarks import must not import those at module level.

Each check runs in a fresh interpreter with a ``sys.meta_path`` finder that makes those packages look absent:
``import X`` raises ImportError naming the first project / benchmark line on the stack (the line to change), and
``importlib.util.find_spec("X")`` returns None, as on a machine without them (transformers probes optional
packages that way). The benchmarks' ``main()`` runs inside the same guard, so a lazy import on their path is
caught too. The three checks share one such interpreter (the import check runs first in it).
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
BENCH = ROOT / "benchmarks"

BLOCKED = ("hydra", "omegaconf", "wandb", "datasets", "av", "deepspeed")
ALLOWED_MODULES = (
    "videollama3_train.model.presets",
    "videollama3_train.model.core",
    "videollama3_train.model.attention",
    "videollama3_train.model.tokenizer",
    "videollama3_train.model.groups",
    "videollama3_train.model.export",
    "videollama3_train.data.collate",
    "videollama3_train.data.packing",
    "videollama3_train.trainer.loss",
    "videollama3_train.trainer.metrics",
)

GUARD = textwrap.dedent(
    """
    import importlib.util, sys, traceback

    BLOCKED = set(__BLOCKED__)

    class _Block:
        # a meta-path finder consulted before the real ones: importing a blocked package raises ImportError
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in BLOCKED:
                return None
            stack = [fr for fr in traceback.extract_stack()[:-1] if "importlib" not in fr.filename]
            ours = [fr for fr in stack if "videollama3_train" in fr.filename or "benchmarks" in fr.filename]
            where = ours[-1] if ours else (stack[-1] if stack else None)
            line = f"{where.filename}:{where.lineno}: {where.line}" if where else "?"
            raise ImportError(f"blocked import of {name!r} (absent on the GPU box) at {line}")

    sys.meta_path.insert(0, _Block())

    # transformers / accelerate probe optional packages with importlib.util.find_spec(): on the GPU box that
    # answers None (a finder can only pass or raise, so the probe is answered here)
    _find_spec = importlib.util.find_spec

    def _probe(name, package=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return _find_spec(name, package)

    importlib.util.find_spec = _probe
    """
).replace("__BLOCKED__", repr(BLOCKED))


def run_guarded(body: str, timeout: int = 600) -> dict:
    """Run ``body`` after the guard in a fresh interpreter; it must print one JSON line last."""
    code = GUARD + f"\nsys.path.insert(0, {str(BENCH)!r})\n" + textwrap.dedent(body)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The three checks' bodies, each ending with ``result`` (JSON-able); one guarded interpreter runs them in turn (a
# fresh interpreter with torch and transformers costs ~5 CPU-seconds): the import check first, before anything else
# ran in it, then the two benchmarks' main().
PARTS = {
    "imports": """
        import importlib, importlib.util, json
        # the guard itself: a probe answers "absent", an import raises and names the importing line
        probe_absent = importlib.util.find_spec("wandb") is None
        try:
            import deepspeed  # noqa
            guard_err = ""
        except ImportError as e:
            guard_err = str(e)
        mods = __MODULES__
        failed = {}
        for m in mods + ("common", "bench_step", "bench_loss", "bench_cost_model"):
            try:
                importlib.import_module(m)
            except ImportError as e:
                failed[m] = str(e)
        loaded = sorted({k.split(".")[0] for k in sys.modules} & BLOCKED)
        result = {"probe_absent": probe_absent, "guard_err": guard_err, "failed": failed, "loaded": loaded}
        """.replace("__MODULES__", repr(ALLOWED_MODULES)),
    "step": """
        import json, bench_step
        r = bench_step.main(["--shape", "tiny", "--device", "cpu", "--max-tokens", "256", "--warmup", "1",
                             "--steps", "1", "--baseline-batches", "2"])
        rows = {x["name"]: x for x in r["results"]}
        result = {k: {"tps": v["tokens_per_s"], "mfu": v["mfu"], "peak": v["peak_bytes"],
                      "loss": v["loss"], "tokens": v["tokens_per_step"]} for k, v in rows.items()}
        result["report"] = r["report"]
        """,
    "loss": """
        import json, bench_loss
        r = bench_loss.main(["--tokens", "96", "--vocab", "512", "--hidden", "32", "--chunk-size", "16",
                             "--device", "cpu", "--label-fracs", "0.3,1.0"])
        result = [{k: v for k, v in x.items()} for x in r["results"]]
        """,
}


@pytest.fixture(scope="module")
def guarded() -> dict:
    """name -> the result of each of :data:`PARTS` (or ``{"error": traceback}``), from one guarded interpreter."""
    script = "import json\nresults = {}\n"
    for name, body in PARTS.items():
        script += f"def _{name}():\n" + textwrap.indent(textwrap.dedent(body), "    ") + "    return result\n"
        script += f"try:\n    results[{name!r}] = _{name}()\nexcept BaseException:\n"
        script += f"    results[{name!r}] = {{'error': traceback.format_exc()}}\n"
    return run_guarded(script + "print(json.dumps(results))\n")


def _part(guarded: dict, name: str):
    out = guarded[name]
    assert not (isinstance(out, dict) and "error" in out), out
    return out


def test_benchmark_imports_need_only_torch_transformers_accelerate(guarded):
    out = _part(guarded, "imports")
    assert out["probe_absent"] is True
    assert "blocked import of 'deepspeed'" in out["guard_err"]
    assert out["failed"] == {}, "\n".join(f"{m}: {e}" for m, e in out["failed"].items())
    assert out["loaded"] == []


@pytest.mark.slow
def test_bench_step_main_tiny(guarded):
    out = _part(guarded, "step")
    assert set(out) == {"ours", "native baseline", "report"}
    for name in ("ours", "native baseline"):
        row = out[name]
        assert row["tps"] > 0 and row["mfu"] > 0 and row["peak"] > 0 and row["tokens"] > 0
        assert math.isfinite(row["loss"]), row  # not NaN, not inf
    assert out["ours"]["tokens"] <= 256
    assert "| ours |" in out["report"] and "| native baseline |" in out["report"]


@pytest.mark.slow
def test_bench_loss_main_tiny_matches_transformers(guarded):
    out = _part(guarded, "loss")
    by = {(r["method"], r["label_frac"]): r for r in out}
    ref, ours = by[("transformers", 0.3)], by[("ours", 0.3)]
    assert abs(ref["loss"] - ours["loss"]) < 1e-4
    assert ours["grad_diff"] < 1e-4
    # full logits: fp32 logits + their gradient at least; ours keeps one (chunk, V) block at a time
    full = 96 * 512 * 4
    assert ref["peak_bytes"] >= 2 * full
    assert ours["peak_bytes"] < ref["peak_bytes"]
    assert by[("ours", 1.0)]["labelled"] == 95

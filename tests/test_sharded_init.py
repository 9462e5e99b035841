"""FSDP2 and ZeRO-3 build the model without a whole copy per rank (model/weights.py, trainer/sharded_init.py), and
the weights they end up with are today's: 2 gloo processes, the tiny preset, every parameter sharded (ZeRO-3 with
persistence threshold 0); after ``prepare`` the whole weights are gathered back and compared on rank 0 with the
whole-model construction (random init) or with the checkpoint file's tensors (a native directory). The cases of a
backend run one after the other in one launch (tests/init_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import forkrun

CASES = ["fsdp2:random", "fsdp2:native", "zero3:random", "zero3:native"]


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory, tiny_tokenizer, tiny_processor) -> Path:
    from videollama3_train.model.core import ModelConfig, build_model
    from videollama3_train.model.export import export_hf

    out = tmp_path_factory.mktemp("native")
    model = build_model(ModelConfig(preset="tiny", attn_implementation="sdpa", seed=11), tiny_tokenizer)
    export_hf(model, tiny_processor, out)
    return out


@pytest.fixture(scope="module")
def case_logs(tmp_path_factory, native_dir: Path) -> dict[str, tuple[str, str]]:
    """case -> (its part of the log, the whole log): one launch per backend runs both of its cases (a ZeRO-3 run
    after an FSDP2 one in the same processes gets a world size of 1 from DeepSpeed); both launches forked by one
    launcher (helpers.forkrun: the imports paid once)."""
    logs: dict[str, tuple[str, str]] = {}
    launches = []
    for backend in ("fsdp2", "zero3"):
        args = ["--out", str(tmp_path_factory.mktemp(backend)), "--init-from", str(native_dir)]
        for case in CASES:
            args += ["--case", case] if case.startswith(backend + ":") else []
        launches.append((2, args))
    log = forkrun(launches, worker="init_worker", timeout=900)  # asserts every rank's exit 0
    last = None
    for part in log.split("CASE ")[1:]:
        head, sep, rest = part.partition(" START")
        if sep and head in CASES:
            logs[last := head] = (rest, log)
        elif last:  # "CASE " inside a case's own output
            logs[last] = (logs[last][0] + "CASE " + part, log)
    return logs


@pytest.mark.slow
@pytest.mark.timeout(1000)
@pytest.mark.parametrize("case", CASES)
def test_sharded_build_gives_todays_weights(case: str, case_logs) -> None:
    assert case in case_logs, case_logs
    log, whole = case_logs[case]
    n = 67 if case.endswith("random") else 66  # the file holds no lm_head.weight (tied to the embeddings)
    assert f"WEIGHTS EQUAL {n} tensors" in log, whole[-6000:]
    if case.startswith("zero3"):
        assert log.count("PARTITIONED 66") == 2, whole[-6000:]

"""Launching: a two-node torchrun job simulated on one machine (two agents, CPU, gloo), and the launch scripts.

The two agents run the real train command exactly as ``launch/torchrun_multinode.sh`` starts it on each node
(``--nnodes 2 --node_rank {0,1} --master_addr --master_port``), with ZeRO-2 and with FSDP2 on tiny generated data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import forkrun, free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from test_sample_data import gen

    out = tmp_path_factory.mktemp("data")
    gen.generate(out, seed=1, n_train=24, n_heldout=4)
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["zero2", "fsdp2"])
def test_two_node_torchrun(tmp_path: Path, small_data: Path, backend: str) -> None:
    port = free_port()
    out = tmp_path / "run"
    train_args = [
        "-m",
        "videollama3_train.train",
        "stage=alignment",
        "model=tiny",
        "data=file",
        f"data.path={small_data / 'train.jsonl'}",
        f"data.root={small_data}",
        f"trainer.backend={backend}",
        "trainer.max_steps=3",
        "logger=disabled",
        f"output_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    agents, logs = [], []
    for node_rank in (0, 1):
        log = (tmp_path / f"node{node_rank}.log").open("w")
        logs.append(log)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *train_args,
        ]
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    try:
        codes = [a.wait(timeout=780) for a in agents]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait(timeout=30)
        for log in logs:
            log.close()
    text = "\n".join(f"--- node {i}\n" + (tmp_path / f"node{i}.log").read_text()[-4000:] for i in (0, 1))
    assert codes == [0, 0], text
    assert (out / "export" / "config.json").is_file(), text
    assert list((out / "export").glob("*.safetensors")), text
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000003"], text
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 1 and '"step": 3' in rows[-1], text


@pytest.mark.timeout(900)
def test_zero3_two_processes_exports_whole_weights(tmp_path: Path, small_data: Path) -> None:
    """ZeRO-3 partitions every parameter over the ranks; the stage's export must still hold whole tensors."""
    import json

    from transformers import AutoModelForImageTextToText

    # The tiny model's tensors are all below DeepSpeed's persistence threshold, which would keep them whole:
    # partition every one of them, as ZeRO-3 does with the large tensors of a real model.
    ds_dir = tmp_path / "deepspeed"
    ds_dir.mkdir()
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (ds_dir / "zero3.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    args = [
        "stage=alignment",
        "model=tiny",
        "data=file",
        f"data.path={small_data / 'train.jsonl'}",
        f"data.root={small_data}",
        "trainer.backend=zero3",
        f"trainer.deepspeed_config_dir={ds_dir}",
        "trainer.max_steps=2",
        "logger=disabled",
        f"output_dir={out}",
    ]
    # the two ranks forked by tests/forkrun.py (the imports paid once; torchrun itself: the two-node test above)
    forkrun([(2, args)], worker="train", timeout=780)  # asserts both ranks exit 0
    model = AutoModelForImageTextToText.from_pretrained(out / "export", local_files_only=True)
    config = model.config
    assert model.model.language_model.embed_tokens.weight.shape == (
        config.text_config.vocab_size,
        config.text_config.hidden_size,
    )
    assert all(
        p.numel() > 0 and bool(p.abs().sum() > 0) for n, p in model.named_parameters() if "norm" not in n
    )


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.sh")) + ["slurm.sbatch"])
def test_launch_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "NPROC_PER_NODE": "8", **env}
    for k in (
        "WORLD_SIZE",
        "GRAD_ACCUM",
        "FIRST_STAGE",
        "FORCE",
        "LAUNCHER",
        "NNODES",
        "NODE_RANK",
        "INIT_FROM",
        "SLURM_CPUS_PER_TASK",
        "SLURM_NNODES",
        "MASTER_ADDR",
        "HOSTFILE",
    ):
        if k not in env:
            full.pop(k, None)
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=60, env=full, cwd=REPO
    )


def test_stages_2b_dry_run(tmp_path: Path) -> None:
    proc = _dry_run(
        "stages_2b.sh",
        "logger=online",
        OUTPUT_ROOT=str(tmp_path / "2b"),
        SIGLIP_DIR="/ckpt/siglip",
        QWEN_DIR="/ckpt/qwen",
        DATA_VIDEO_FINETUNE="video_mix",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("+")]
    train = [ln for ln in lines if "torchrun_single.sh" in ln]
    stages = ["encoder_adaptation", "alignment", "multitask_sft", "video_finetune"]
    assert len(train) == 4, proc.stdout
    for i, (line, stage) in enumerate(zip(train, stages)):
        assert f"stage={stage}" in line and "model=videollama3_2b" in line
        assert f"output_dir={tmp_path / '2b' / stage}" in line
        assert "trainer.global_batch_samples=128" in line  # the trainer derives grad_accum for the world size
        assert "trainer.backend=zero1" in line and line.endswith("logger=online")
        if i == 0:
            assert "model.init_kind=assemble" in line and "model.vision_from=/ckpt/siglip" in line
        else:
            assert f"init_from={tmp_path / '2b' / stages[i - 1] / 'export'}" in line
    assert "data=video_mix" in train[3] and "data=sample" in train[0]
    assert "videollama3_train.report" in lines[-1]
    assert not (tmp_path / "2b").exists()  # a dry run writes nothing


def test_stages_2b_dry_run_multinode_and_first_stage(tmp_path: Path) -> None:
    proc = _dry_run(
        "stages_2b.sh",
        OUTPUT_ROOT=str(tmp_path / "2b"),
        LAUNCHER="torchrun_multinode",
        NNODES="2",
        NODE_RANK="1",
        FIRST_STAGE="multitask_sft",
    )
    assert proc.returncode == 0, proc.stderr
    train = [ln for ln in proc.stdout.splitlines() if ln.startswith("+") and "torchrun_multinode.sh" in ln]
    assert [s for s in ("multitask_sft", "video_finetune") if any(f"stage={s}" in ln for ln in train)] == [
        "multitask_sft",
        "video_finetune",
    ]
    assert len(train) == 2
    assert "trainer.global_batch_samples=128" in train[0] and "trainer.grad_accum" not in train[0]
    assert "videollama3_train.report" not in proc.stdout  # node 0 writes the report


def test_run_stages_rejects_unknown_first_stage() -> None:
    proc = _dry_run("stages_2b.sh", FIRST_STAGE="stage5")
    assert proc.returncode != 0 and "FIRST_STAGE" in proc.stderr


@pytest.mark.parametrize(
    ("script", "env", "expected"),
    [
        ("torchrun_single.sh", {}, "torch.distributed.run --standalone --nnodes=1 --nproc_per_node=8"),
        (
            "torchrun_multinode.sh",
            {"MASTER_ADDR": "node0", "NNODES": "2", "NODE_RANK": "1"},
            "torch.distributed.run --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=node0",
        ),
        (
            "deepspeed_hostfile.sh",
            {"HOSTFILE": str(LAUNCH / "hostfile.example")},
            "deepspeed.launcher.runner --hostfile",
        ),
    ],
)
def test_every_launcher_honours_dry_run(
    tmp_path: Path, script: str, env: dict[str, str], expected: str
) -> None:
    """DRY_RUN=1 prints the command and starts nothing (torchrun_single.sh once trained regardless)."""
    out = tmp_path / "run"
    proc = _dry_run(script, "stage=alignment", "model=tiny", f"output_dir={out}", **env)
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("+")]
    assert expected in line and line.endswith(
        f" videollama3_train.train stage=alignment model=tiny output_dir={out}"
    )
    assert not out.exists()


def test_slurm_steps_pass_cpus_per_task(tmp_path: Path) -> None:
    """srun (Slurm >= 22.05) does not inherit --cpus-per-task from sbatch: every stage's step passes it on."""
    proc = _dry_run(
        "stages_2b.sh",
        OUTPUT_ROOT=str(tmp_path / "2b"),
        LAUNCHER="slurm",
        SLURM_NNODES="2",
        SLURM_CPUS_PER_TASK="64",
    )
    assert proc.returncode == 0, proc.stderr
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ srun")]
    assert len(steps) == 4 and all("--cpus-per-task=64" in ln for ln in steps), proc.stdout
    assert proc.stdout.splitlines()[-1].endswith(f"videollama3_train.report root={tmp_path / '2b'}")

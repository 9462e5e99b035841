"""Builds the tiny model the way a sharded backend does (FSDP2: on meta, sharded, then loaded; ZeRO-3: under
``zero.Init``, then loaded), prepares it, gathers the whole weights back and compares them on rank 0 with the
oracle: the whole-model construction of today (random init) or the checkpoint's own tensors (``--init-from``).

    python -m torch.distributed.run --nproc_per_node 2 tests/init_worker.py --out DIR --init-from NATIVE \
        --case fsdp2:random --case fsdp2:native --case zero3:random --case zero3:native

(tests/test_sharded_init.py forks its ranks with tests/forkrun.py: ``main(argv)``.)

Every case in turn in one launch (``native``: from ``--init-from``), each after ``CASE <backend>:<init> START``
(rank 0): prints ``WEIGHTS EQUAL <n> tensors`` on rank 0, or fails with the first differing name. Tensors above
16 KB stream as row blocks (``weights.Rows``), as the 2B preset's embedding does above 256 MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist
    from accelerate.state import AcceleratorState
    from test_model_weights import _whole_construction

    from videollama3_train.model.core import ModelConfig
    from videollama3_train.model.tokenizer import build_tiny_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--case", action="append", required=True, help="<fsdp2|zero3>:<random|native>, repeatable")
    p.add_argument("--init-from", default=None, help="the native directory of the native cases")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    tok = build_tiny_tokenizer()
    mcfg = ModelConfig(preset="tiny", attn_implementation="sdpa", seed=3)
    # the oracle first: once a ZeRO-3 accelerator exists, transformers would partition a plain construction too
    whole_built = _whole_construction(mcfg, tok)
    from videollama3_train.model import weights

    # large tensors by row blocks (the 2B embedding's path): the tiny embedding and the bias-free linear layers
    # come in blocks of 16 KB, scattered block by block
    weights.ROW_BLOCK_BYTES = 16 * 2**10
    for i, case in enumerate(a.case):
        backend, init = case.split(":")
        if i:
            AcceleratorState._reset_state(reset_partial_state=False)  # the next case builds its own
            dist.barrier()  # every rank's output of the previous case is out before the marker
        if int(os.environ["RANK"]) == 0:
            print(f"CASE {case} START", flush=True)
        init_from = a.init_from if init == "native" else None
        out = Path(a.out) / f"{backend}_{init}"
        run_case(backend, dataclasses.replace(mcfg, init_from=init_from), tok, whole_built, out)
    # leave the process group together (gloo may abort in its teardown at exit otherwise: "terminate called
    # without an active exception", seen under load when one rank destroyed the group while the other was still in
    # the last case's collectives)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def run_case(backend_name: str, mcfg, tok, whole_built, out: Path) -> None:
    from dist_worker import _partition_everything, assert_partitioned
    from safetensors.torch import load_file

    from videollama3_train.model.core import build_model
    from videollama3_train.trainer import TrainConfig, build_accelerator, build_backend, sharded_init
    from videollama3_train.trainer.step import LossModule

    rank = int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    # ZeRO-3 with persistence threshold 0: every parameter partitioned, however small
    ds_dir = _partition_everything(out, rank) if backend_name == "zero3" else None
    cfg = TrainConfig(backend=backend_name, precision="fp32", deepspeed_config_dir=ds_dir)
    want_buffers = {k: v.clone() for k, v in whole_built.named_buffers()}  # rotary frequencies: the config's
    if mcfg.init_from:
        want = load_file(str(Path(mcfg.init_from) / "model.safetensors"))
    else:
        want = whole_built.state_dict()
    accelerator = build_accelerator(cfg)
    backend = build_backend(cfg, accelerator)
    defer = sharded_init.wants_meta(cfg, accelerator)
    assert defer
    model = build_model(mcfg, tok, defer_weights=defer)
    sharded_init.place(model, cfg, accelerator)
    if backend_name == "fsdp2":  # many small chunks (the tiny model is 2 MB): the chunking is exercised too
        from videollama3_train.trainer import fsdp2

        fsdp2.LOAD_CHUNK_BYTES = 64 * 2**10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    module, optimizer = backend.prepare(LossModule(model, 64), optimizer)
    if backend_name == "zero3":
        print(f"PARTITIONED {assert_partitioned(model, accelerator.num_processes)}", flush=True)
    with backend.whole_model(model) as whole:
        if accelerator.is_main_process:
            got = {k: v.detach().cpu().clone() for k, v in whole.state_dict().items()}
            got_buffers = {k: v.detach().cpu().clone() for k, v in whole.named_buffers()}
    if accelerator.is_main_process:
        n = 0
        for k, v in want.items():
            if k in got or not k.startswith("lm_head."):
                assert torch.equal(got[k], v), k
                n += 1
        assert sorted(got_buffers) == sorted(want_buffers)
        # non-persistent: no weight source carries them, the build keeps them
        for k, v in want_buffers.items():
            assert torch.equal(got_buffers[k], v), k
        print(f"WEIGHTS EQUAL {n} tensors", flush=True)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main())

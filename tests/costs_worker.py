"""The cost pre-pass under a 2-process group (launched by tests/test_costing.py through torchrun, gloo):

    torchrun --nproc_per_node 2 tests/costs_worker.py ANNOTATIONS ROOT OUT

Each rank costs its share of ANNOTATIONS (media under ROOT) with the cache in OUT/cache, then again (which must
read the cache on every rank); it writes ``OUT/table_rank<r>.npy``, ``OUT/failures_rank<r>.json`` and
``OUT/hit_rank<r>`` (1 when the second call used the cache) and ``OUT/costed_rank<r>`` (records it costed).
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch.distributed as dist


def main() -> None:
    ann, root, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from videollama3_train.data import costs
    from videollama3_train.data.annotations import load_annotations
    from videollama3_train.data.build import _cost_of
    from videollama3_train.data.config import EncodeConfig
    from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer

    processor = build_processor(build_tiny_tokenizer())
    enc = EncodeConfig(max_length=2048, max_visual_tokens=1024)
    ds = load_annotations(ann, cache_dir=str(out / f"hf{rank}"))
    cache, key = costs.cost_cache(ann, enc, processor.tokenizer, cache_dir=out / "cache")
    fn = partial(_cost_of, root=root, processor=processor, config=enc, dataset="d")
    costed = []  # the records this rank costs itself

    def counted(row):
        costed.append(1)
        return fn(row)

    table = costs.compute_costs(ds, counted, cache_path=cache, cache_key=key, chunk_size=8, progress=False)
    (out / f"costed_rank{rank}").write_text(str(len(costed)))
    np.save(out / f"table_rank{rank}.npy", table.costs)
    (out / f"failures_rank{rank}.json").write_text(json.dumps({str(i): v for i, v in table.failures.items()}))

    calls = []  # a second pass must come from the cache on every rank: a cost function that is never called
    again = costs.compute_costs(ds, calls.append, cache_path=cache, cache_key=key, progress=False)
    assert np.array_equal(again.costs, table.costs) and again.failures == table.failures
    (out / f"hit_rank{rank}").write_text(str(int(not calls)))
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok, pid {os.getpid()}")


if __name__ == "__main__":
    main()

"""B10: which tokens token pruning keeps when frames come from the frame cache, per codec, against the processor.

A still textured scene with a small red square crossing it (libx264, crf 4, mbtree off, one thread, one keyframe),
encoded for a pruning stage by transformers' ``VideoLlama3Processor`` (the oracle, decoding the file itself) and
by ``encode_record`` reading a cache entry of each codec. ``--lossy-read`` reads entries as the reader did before
pruning stages refused lossy ones (any codec serves), which is how JPEG's effect is measured.

    python benchmarks/bench_cache_pruning.py --lossy-read multitask_sft 96 72 40 10
    python benchmarks/bench_cache_pruning.py --lossy-read video_finetune 320 240 100 10

Prints per codec: entry bytes (tar) and frame bytes (members), build and read+encode seconds (one run each, on a
shared machine: indicative only), tokens kept and tokens whose keep/drop decision differs from the processor's.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from mediagen import make_video  # noqa: E402
from test_parity import _still_scene_with_square, stage_config  # noqa: E402

from videollama3_train.data import encode_record  # noqa: E402
from videollama3_train.data import frame_cache as fc  # noqa: E402
from videollama3_train.data.prepare import frame_pixel_cap  # noqa: E402


def _frame_bytes(entry: Path) -> int:
    with tarfile.open(entry) as tar:
        return sum(m.size for m in tar.getmembers() if m.name != "header.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage")
    ap.add_argument("width", type=int)
    ap.add_argument("height", type=int)
    ap.add_argument("frames", type=int)
    ap.add_argument("fps", type=int)
    ap.add_argument("--crf", type=int, default=4)
    ap.add_argument("--lossy-read", action="store_true")
    args = ap.parse_args()
    if args.lossy_read:
        lookup = fc.lookup_frames
        fc.lookup_frames = lambda *a, lossless=False, **k: lookup(*a, **k)

    from transformers import AutoProcessor

    from videollama3_train.model.tokenizer import build_tiny_tokenizer
    from videollama3_train.run import build_stage_processor

    work = Path(tempfile.mkdtemp(prefix="bench_cache_pruning_"))
    seconds = args.frames / args.fps
    v = make_video(
        work / "v.mp4",
        args.width,
        args.height,
        seconds=seconds,
        fps=args.fps,
        frames=_still_scene_with_square(args.width, args.height),
        crf=args.crf,
        keyframe_interval_s=seconds,
    )
    cfg = stage_config(args.stage)
    build_stage_processor(build_tiny_tokenizer(), cfg).save_pretrained(work / "proc")
    proc = AutoProcessor.from_pretrained(work / "proc", local_files_only=True)
    content = [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "Q?"}]
    answer = {"role": "assistant", "content": "A."}
    record = {"messages": [{"role": "user", "content": content}, answer]}
    direct = encode_record(record, data_root=work, processor=proc, config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content[0]["video"] = str(v)
        ref = proc.apply_chat_template(
            [{"role": "user", "content": content}, answer],
            fps=cfg.fps,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    want = ref["video_compression_mask"]
    print(
        f"{args.stage} {args.width}x{args.height} {args.frames} frames crf {args.crf}, grid",
        direct["video_grid_thw"].tolist(),
        f"processor keeps {int(want.sum())} of {want.numel()}; direct decode",
        "equal" if torch.equal(direct["video_compression_mask"], want) else "DIFFERENT",
    )
    for codec in fc.CODECS:
        cache = work / f"cache_{codec}"
        t = time.perf_counter()
        fc.build_frame_cache(
            [(v, None, None)],
            cache,
            fps=cfg.fps,
            max_frames=cfg.max_frames,
            min_frames=cfg.min_frames,
            max_pixels_per_frame=frame_pixel_cap(cfg),
            codec=codec,
            progress=False,
        )
        built = time.perf_counter() - t
        tars = list(cache.rglob("*.tar"))
        frame_bytes = sum(_frame_bytes(p) for p in tars)
        t = time.perf_counter()
        got = encode_record(
            record,
            data_root=work,
            processor=proc,
            config=dataclasses.replace(cfg, frame_cache_dir=str(cache)),
        )
        read = time.perf_counter() - t
        mask = got["video_compression_mask"]
        print(
            f"  {codec:4s} entry {sum(p.stat().st_size for p in tars):8d} B, frames {frame_bytes:8d} B, "
            f"build {built:.3f} s, read+encode {read:.3f} s, kept {int(mask.sum())}, "
            f"flipped {int((mask != want).sum())}, input_ids equal {torch.equal(got['input_ids'], ref['input_ids'][0])}"
        )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

"""B2: data throughput of one worker: samples/s and visual tokens/s of ``encode_record``, with and without the
frame cache, for image, video and mixed (image + video) records.

One worker = this process, one thread for PyTorch (as a loader worker runs); the loader scales it by its worker
count. Media: 1280x720 JPEG images and the 1-minute 720p textured clip of ``bench_video.py`` (GOP 2 s, 64 s
long), so 64 frames sampled at 1 fps, 10240 visual tokens per sample.

``encode_record`` does not read the frame cache yet (``EncodeConfig.frame_cache_dir`` is not wired in), so the
"cache" rows wrap ``media.decode_video`` to serve frames from the cache built by ``build_frame_cache`` first --
exactly the call ``encode_record`` makes -- and fall back to decoding on a miss. The rows say so.

    nice -n 10 python benchmarks/bench_data.py --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_video import CACHE, _texture, make_clip  # noqa: E402

from videollama3_train.data import frame_cache, media  # noqa: E402
from videollama3_train.data.config import EncodeConfig  # noqa: E402
from videollama3_train.data.encode import encode_record  # noqa: E402
from videollama3_train.model.tokenizer import build_processor, build_tiny_tokenizer  # noqa: E402


def _records(video: str, image: str) -> dict[str, dict]:
    def rec(prompt: str, **media_fields) -> dict:
        return {
            **media_fields,
            "conversations": [
                {"from": "human", "value": prompt + "What happens here?"},
                {"from": "gpt", "value": "A textured background scrolls while a red square moves right."},
            ],
        }

    return {
        "image": rec("<image>\n", image=image),
        "video": rec("<video>\n", video=video),
        "mixed": rec("<image>\n<video>\n", image=image, video=video),
    }


def _cached_decode(original, cache_dir: str, config: EncodeConfig):
    """``media.decode_video`` that reads the frame cache first (what wiring it into encode_record amounts to)."""

    @functools.wraps(original)
    def decode(path, times, *, size=None, info=None, folder_fps=1.0):
        got = frame_cache.lookup_frames(
            cache_dir,
            path,
            fps=config.fps,
            max_frames=config.max_frames,
            min_frames=config.min_frames,
            size=size,
        )
        if got is not None and len(got[0]) == len(times):
            return got
        return original(path, times, size=size, info=info, folder_fps=folder_fps)

    return decode


def _time(record: dict, root: str, processor, config: EncodeConfig, repeats: int) -> tuple[float, int]:
    sample = encode_record(record, data_root=root, processor=processor, config=config)  # warm-up
    ids = sample["input_ids"]
    visual = int(((ids == processor.image_token_id) | (ids == processor.video_token_id)).sum())
    t0 = time.perf_counter()
    for _ in range(repeats):
        encode_record(record, data_root=root, processor=processor, config=config)
    return (time.perf_counter() - t0) / repeats, visual


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed encodes per record kind and mode")
    args = ap.parse_args()
    torch.set_num_threads(1)

    clip = make_clip("720p", 1, 2)
    image = CACHE / "image_720p.jpg"
    if not image.exists():
        from PIL import Image

        Image.fromarray(np.ascontiguousarray(_texture(1280, 720)[:720, :1280])).save(image, quality=90)
    root = str(CACHE)
    config = EncodeConfig()
    processor = build_processor(build_tiny_tokenizer())
    cache_dir = str(CACHE / "frame_cache_b2")
    # what `prepare` stores: the largest frame size this config can ask for
    from videollama3_train.data.prepare import frame_pixel_cap

    counts = frame_cache.build_frame_cache(
        [(str(clip.resolve()), None, None)],
        cache_dir,
        fps=config.fps,
        max_frames=config.max_frames,
        min_frames=config.min_frames,
        max_pixels_per_frame=frame_pixel_cap(config),
        progress=False,
    )
    print(f"cache: {json.dumps(counts)}", file=sys.stderr)

    records = _records(clip.name, image.name)
    original = media.decode_video
    rows = []
    for mode in ("decode", "cache"):
        media.decode_video = original if mode == "decode" else _cached_decode(original, cache_dir, config)
        try:
            for kind, record in records.items():
                if mode == "cache" and kind == "image":
                    continue  # images are not cached
                seconds, visual = _time(record, root, processor, config, args.repeats)
                rows.append((kind, mode, seconds, visual))
                print(f"  {kind:6s} {mode:6s} {seconds:.3f} s/sample", file=sys.stderr, flush=True)
        finally:
            media.decode_video = original

    print("\n| record | video frames from | samples/s/worker | visual tokens/s/worker | ms/sample |")
    print("|---|---|---:|---:|---:|")
    for kind, mode, seconds, visual in rows:
        src = "decode (PyAV)" if mode == "decode" else "frame cache (emulated wiring)"
        if kind == "image":
            src = "- (image only)"
        print(f"| {kind} | {src} | {1 / seconds:.2f} | {visual / seconds:,.0f} | {seconds * 1000:.0f} |")
    print(
        f"\none worker, torch threads 1; image 1280x720 JPEG; video {clip.name} (fps 1 -> 60 frames); "
        f"{args.repeats} timed encodes each after one warm-up"
    )


if __name__ == "__main__":
    main()

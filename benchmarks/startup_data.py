"""A large synthetic official-format dataset for B8 (``bench_startup.py``) and the cost-pass tests.

The mix of the start-up measurements: 50% single images (JPEG, each side 200-1200 px), 5% 30-s 320x240 H.264
clips (25 fps), 45% text-only records, every record naming its own media path. Paths are symlinks onto a small
pool of real files (``pool/``), so a million records cost a few MB of disk (symlinks are inodes, not data), while
the cost pass still opens, resolves and reads a distinct path per record. Text lengths vary (questions 5-30 words, answers 5-60,
1-2 turns, under the tiny preset's 1024-token samples) so tokenisation is a real share of the work.

    python benchmarks/startup_data.py /tmp/b8 100000      # -> /tmp/b8/train_100000.jsonl + media
"""

from __future__ import annotations

import json
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

IMAGE_SHARE, VIDEO_SHARE = 0.50, 0.05  # the rest is text-only
POOL_IMAGES, POOL_VIDEOS = 48, 3
VIDEO_SIZE, VIDEO_SECONDS, VIDEO_FPS = (320, 240), 30, 25
LINKS_PER_DIR = 10_000  # keeps directories small at 1M records

_WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "on",
    "with",
    "for",
    "that",
    "this",
    "image",
    "shows",
    "video",
    "person",
    "car",
    "red",
    "blue",
    "green",
    "left",
    "right",
    "over",
    "under",
    "near",
    "scene",
    "people",
    "table",
    "window",
    "street",
    "small",
    "large",
    "two",
    "three",
    "object",
    "moving",
    "slowly",
    "quickly",
    "background",
    "describe",
    "what",
    "happens",
    "where",
    "color",
    "count",
    "answer",
    "question",
    "carefully",
    "detail",
]


def _pool(root: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    """Write (once) the pool of real media under ``root/pool``; returns their paths relative to ``root``."""
    import av
    from PIL import Image

    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for k in range(POOL_IMAGES):
        p = pool / f"img_{k:03d}.jpg"
        w, h = (int(v) for v in rng.integers(200, 1201, 2))
        if not p.exists():
            a = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR).save(p, quality=85)
        images.append(str(p.relative_to(root)))
    videos = []
    for k in range(POOL_VIDEOS):
        p = pool / f"vid_{k:02d}.mp4"
        if not p.exists():
            tmp = p.with_name(p.name + ".tmp.mp4")
            w, h = VIDEO_SIZE
            with av.open(str(tmp), "w") as c:
                s = c.add_stream("libx264", rate=Fraction(VIDEO_FPS))
                s.width, s.height, s.pix_fmt = w, h, "yuv420p"
                s.options = {"preset": "ultrafast", "x264-params": "keyint=50:scenecut=0"}
                base = rng.integers(0, 256, (h, 2 * w, 3), dtype=np.uint8)
                for i in range(VIDEO_SECONDS * VIDEO_FPS):
                    x = (i * 4 + k * 37) % w
                    f = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, x : x + w]), format="rgb24")
                    for pkt in s.encode(f):
                        c.mux(pkt)
                for pkt in s.encode():
                    c.mux(pkt)
            os.replace(tmp, p)
        videos.append(str(p.relative_to(root)))
    return images, videos


def _text(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), int(rng.integers(lo, hi + 1))))


def _link(root: Path, kind: str, i: int, target: str, suffix: str) -> str:
    rel = f"{kind}/{i // LINKS_PER_DIR:04d}/{i:08d}{suffix}"
    p = root / rel
    if not p.is_symlink():
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(root / target, p.parent), p)
    return rel


def make_dataset(root: str | os.PathLike, n: int, *, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """``(annotation file, records per modality)``: ``n`` official-format records of the B8 mix under ``root``
    (reused when the file exists). Modalities are drawn per record with the shares above."""
    root = Path(root)
    ann = root / f"train_{n}.jsonl"
    images, videos = _pool(root, seed)
    rng = np.random.default_rng(seed + n)
    u = rng.random(n)
    kinds = np.where(u < IMAGE_SHARE, 0, np.where(u < IMAGE_SHARE + VIDEO_SHARE, 1, 2))
    counts = {
        "image": int((kinds == 0).sum()),
        "video": int((kinds == 1).sum()),
        "text": int((kinds == 2).sum()),
    }
    if ann.exists():
        return ann, counts
    tmp = ann.with_name(ann.name + ".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            turns = int(rng.integers(1, 3))
            conv = []
            for _ in range(turns):
                q, a = _text(rng, 5, 30), _text(rng, 5, 60)
                conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            rec: dict = {"id": i}
            if kinds[i] == 0:
                rec["image"] = _link(root, "img", i, images[i % len(images)], ".jpg")
                conv[0]["value"] = "<image>\n" + conv[0]["value"]
            elif kinds[i] == 1:
                rec["video"] = [_link(root, "vid", i, videos[i % len(videos)], ".mp4")]
                conv[0]["value"] = "<video>\n" + conv[0]["value"]
            rec["conversations"] = conv
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, ann)
    return ann, counts


if __name__ == "__main__":
    path, counts = make_dataset(sys.argv[1], int(sys.argv[2]))
    print(path, counts)

"""Generate a small, learnable sample dataset in the official VideoLLaMA3 annotation schema.

Usage::

    python data/generate_sample.py --out data/sample [--seed 0] [--train 360] [--heldout 60]

Writes ``train.jsonl`` and ``heldout.jsonl`` (one record per line, paths relative to ``--out``) and the media
under ``<out>/media/{images,videos}``. Every answer is one word from a small closed set per task, so held-out
accuracy is the exact match of the generated answer and chance level is ``1 / len(choices)``; held-out records
carry ``answer``, ``choices`` and ``task`` besides ``conversations``. Train records carry ``task`` too (the loader
ignores unknown keys; it lets the report split losses by task if wanted).

Tasks (the mapping from pixels / text to the answer is deterministic, so a model can learn it):

- image ``colour``      one shape; "What colour is the shape?"              red / green / blue / yellow
- image ``shape``       one shape; "What shape is shown?"                   circle / square / triangle
- image ``count``       1-3 shapes of one colour; "How many shapes ...?"  one / two / three
- image ``same_colour`` two images (multi-image record); same colour?       yes / no
- video ``video_colour`` a square moving across the frame; its colour       red / green / blue / yellow
- video ``direction``   a square moving across the frame                   left / right / up / down
- text  ``sum``         "What is three plus four?"                          zero ... eight (number words)
- text  ``opposite``    "What is the opposite of hot?"                      a fixed word list

The shares favour what a small randomly initialised model learns from a few hundred records within minutes
(colours through the image and the video path, a memorisable word list): the ``tiny`` preset reaches well above
chance on them, while shape, count, motion and arithmetic stay as harder items a real model is expected to get.

Answers are balanced per task (classes are dealt round-robin, then shuffled), sizes and positions are random,
and the whole output is a pure function of ``--seed`` (PNG and single-threaded x264 encodes are deterministic).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------------
# Closed answer sets
# ---------------------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three")
YES_NO = ("yes", "no")
DIRECTIONS = ("left", "right", "up", "down")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
OPPOSITES: dict[str, str] = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "day": "night",
    "fast": "slow",
    "open": "closed",
    "wet": "dry",
    "old": "new",
}
OPPOSITE_ANSWERS = tuple(sorted(set(OPPOSITES.values())))

# Fraction of records per modality, and of tasks inside a modality.
MODALITY_SHARES = {"image": 0.40, "video": 0.35, "text": 0.25}
IMAGE_TASK_SHARES = {"colour": 0.5, "shape": 0.2, "count": 0.2, "same_colour": 0.1}
VIDEO_TASK_SHARES = {"video_colour": 0.7, "direction": 0.3}
TEXT_TASK_SHARES = {"sum": 0.3, "opposite": 0.7}

SUFFIX = " Answer with one word."
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (200, 200, 200))


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place_boxes(rng: random.Random, size: int, n: int, side: int) -> list[tuple[int, int, int, int]]:
    """``n`` non-overlapping square boxes of ``side`` px inside a ``size`` px canvas (rejection sampling).

    Non-overlap matters for the count task: two touching shapes of one colour would read as one.
    """
    gap = 3
    # A first box placed in the middle can leave no room for the others: start over rather than give up.
    for _ in range(100):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(200):
            if len(boxes) == n:
                return boxes
            x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
            if all(
                x + side + gap < b[0] or b[2] + gap < x or y + side + gap < b[1] or b[3] + gap < y
                for b in boxes
            ):
                boxes.append((x, y, x + side, y + side))
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} shapes of {side}px in a {size}px image")


def render_image(rng: random.Random, path: Path, *, colour: str, shape: str, count: int = 1) -> None:
    """Write a PNG of ``count`` shapes of one colour and kind on a plain background."""
    size = rng.randrange(56, 113)
    side = rng.randint(size // 5, size // 3) if count > 1 else rng.randint(size // 3, size // 2)
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    for box in _place_boxes(rng, size, count, side):
        _draw_shape(draw, shape, box, COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)


def render_video(rng: random.Random, path: Path, *, direction: str, colour: str | None = None) -> None:
    """Write an H.264 mp4 of a coloured square sliding across a plain background in ``direction``."""
    size = rng.choice((56, 70, 84))  # even sides: yuv420p needs them
    fps = rng.choice((2, 3, 4))
    seconds = rng.randint(4, 6)
    n_frames = fps * seconds
    side = size // 4
    colour = COLOURS[colour if colour is not None else rng.choice(sorted(COLOURS))]
    background = np.array(rng.choice(BACKGROUNDS), dtype=np.uint8)
    # The square travels from one border to the other along the motion axis; its other coordinate is random.
    travel = np.linspace(2, size - side - 2, n_frames).round().astype(int)
    if direction in ("left", "up"):
        travel = travel[::-1]
    across = rng.randint(2, size - side - 2)

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        # One thread and a fixed preset keep the bitstream identical across runs (determinism per seed).
        stream.codec_context.thread_count = 1
        stream.options = {"preset": "veryfast", "crf": "23", "threads": "1"}
        stream.codec_context.time_base = Fraction(1, fps)
        for pos in travel:
            frame = np.empty((size, size, 3), dtype=np.uint8)
            frame[:] = background
            x, y = (pos, across) if direction in ("left", "right") else (across, pos)
            frame[y : y + side, x : x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------------------------
# Tasks: each maker draws its media and returns (media fields, question, answer, choices)
# ---------------------------------------------------------------------------------------------------------------


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def make_colour(rng: random.Random, out: Path, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/images/{stem}.png"
    render_image(rng, out / rel, colour=answer, shape=rng.choice(SHAPES))
    return {"image": rel}, "<image>\nWhat colour is the shape?" + SUFFIX, tuple(COLOURS)


def make_shape(rng: random.Random, out: Path, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/images/{stem}.png"
    render_image(rng, out / rel, colour=rng.choice(sorted(COLOURS)), shape=answer)
    return {"image": rel}, "<image>\nWhat shape is shown?" + SUFFIX, SHAPES


def make_count(rng: random.Random, out: Path, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/images/{stem}.png"
    count = COUNT_WORDS.index(answer) + 1
    render_image(rng, out / rel, colour=rng.choice(sorted(COLOURS)), shape=rng.choice(SHAPES), count=count)
    return {"image": rel}, "<image>\nHow many shapes are there?" + SUFFIX, COUNT_WORDS


def make_same_colour(
    rng: random.Random, out: Path, stem: str, answer: str
) -> tuple[dict, str, tuple[str, ...]]:
    first = rng.choice(sorted(COLOURS))
    second = first if answer == "yes" else rng.choice([c for c in sorted(COLOURS) if c != first])
    rels = [f"media/images/{stem}_a.png", f"media/images/{stem}_b.png"]
    for rel, colour in zip(rels, (first, second)):
        render_image(rng, out / rel, colour=colour, shape=rng.choice(SHAPES))
    prompt = "<image>\n<image>\nDo the two shapes have the same colour?" + SUFFIX
    return {"image": rels}, prompt, YES_NO


def make_direction(
    rng: random.Random, out: Path, stem: str, answer: str
) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/videos/{stem}.mp4"
    render_video(rng, out / rel, direction=answer)
    return {"video": rel}, "<video>\nIn which direction does the square move?" + SUFFIX, DIRECTIONS


def make_video_colour(
    rng: random.Random, out: Path, stem: str, answer: str
) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/videos/{stem}.mp4"
    render_video(rng, out / rel, direction=rng.choice(DIRECTIONS), colour=answer)
    return {"video": rel}, "<video>\nWhat colour is the moving square?" + SUFFIX, tuple(COLOURS)


def make_sum(rng: random.Random, out: Path, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    total = NUMBER_WORDS.index(answer)
    a = rng.randint(0, total)
    prompt = f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[total - a]}?" + SUFFIX
    return {}, prompt, NUMBER_WORDS


def make_opposite(rng: random.Random, out: Path, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    word = next(k for k, v in OPPOSITES.items() if v == answer)
    return {}, f"What is the opposite of {word}?" + SUFFIX, OPPOSITE_ANSWERS


Maker = Callable[[random.Random, Path, str, str], tuple[dict, str, tuple[str, ...]]]

# task -> (modality, answer classes, maker)
TASKS: dict[str, tuple[str, tuple[str, ...], Maker]] = {
    "colour": ("image", tuple(COLOURS), make_colour),
    "shape": ("image", SHAPES, make_shape),
    "count": ("image", COUNT_WORDS, make_count),
    "same_colour": ("image", YES_NO, make_same_colour),
    "video_colour": ("video", tuple(COLOURS), make_video_colour),
    "direction": ("video", DIRECTIONS, make_direction),
    "sum": ("text", NUMBER_WORDS, make_sum),
    "opposite": ("text", OPPOSITE_ANSWERS, make_opposite),
}


# ---------------------------------------------------------------------------------------------------------------
# Split building
# ---------------------------------------------------------------------------------------------------------------


def _apportion(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Integer counts summing to ``total`` in the given proportions (largest remainder)."""
    raw = {k: total * s / sum(shares.values()) for k, s in shares.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def task_counts(total: int) -> dict[str, int]:
    """Records per task for a split of ``total`` records (modality shares, then task shares inside each)."""
    per_modality = _apportion(total, MODALITY_SHARES)
    counts = {
        **_apportion(per_modality["image"], IMAGE_TASK_SHARES),
        **_apportion(per_modality["video"], VIDEO_TASK_SHARES),
        **_apportion(per_modality["text"], TEXT_TASK_SHARES),
    }
    return {task: counts[task] for task in TASKS}


def build_split(rng: random.Random, out: Path, split: str, total: int, *, with_answers: bool) -> list[dict]:
    """Make ``total`` records of one split, shuffled; media are written under ``out/media``."""
    records: list[dict] = []
    for task, n in task_counts(total).items():
        modality, classes, maker = TASKS[task]
        # Deal classes round-robin so each class appears n/len(classes) times (+-1), then shuffle the order.
        answers = [classes[i % len(classes)] for i in range(n)]
        rng.shuffle(answers)
        for i, answer in enumerate(answers):
            stem = f"{split}_{task}_{i:04d}"
            media, prompt, choices = maker(rng, out, stem, answer)
            record = {**media, "conversations": _conversation(prompt, answer), "task": task}
            if with_answers:
                record.update(answer=answer, choices=list(choices), modality=modality)
            records.append(record)
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def media_paths(record: dict) -> list[str]:
    """The relative media paths of one record (``image`` may be a string or a list)."""
    paths: list[str] = []
    for key in ("image", "video"):
        value = record.get(key)
        if value:
            paths.extend([value] if isinstance(value, str) else value)
    return paths


def chance_accuracy(records: list[dict]) -> float:
    """Expected exact-match accuracy of guessing uniformly among each record's choices."""
    return sum(1.0 / len(r["choices"]) for r in records) / max(1, len(records))


def generate(out: Path, *, seed: int = 0, n_train: int = 360, n_heldout: int = 60) -> dict:
    """Write the dataset under ``out``; returns a summary (record counts, media bytes, chance accuracy)."""
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"split sizes must be >= 0, got train={n_train}, heldout={n_heldout}")
    out.mkdir(parents=True, exist_ok=True)
    # Separate streams per split: the held-out set stays the same whatever --train is.
    train = build_split(random.Random(f"{seed}-train"), out, "train", n_train, with_answers=False)
    heldout = build_split(random.Random(f"{seed}-heldout"), out, "heldout", n_heldout, with_answers=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    # Count only the files these records reference: a reused --out folder may hold media of an earlier run.
    media_bytes = sum((out / rel).stat().st_size for r in train + heldout for rel in media_paths(r))
    return {
        "train": len(train),
        "heldout": len(heldout),
        "media_bytes": media_bytes,
        "heldout_chance_accuracy": chance_accuracy(heldout),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder (data root)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the output is a pure function of it"
    )
    parser.add_argument("--train", type=int, default=360, help="number of training records")
    parser.add_argument("--heldout", type=int, default=60, help="number of held-out records")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = generate(args.out, seed=args.seed, n_train=args.train, n_heldout=args.heldout)
    print(
        f"wrote {summary['train']} train + {summary['heldout']} held-out records to {args.out} "
        f"({summary['media_bytes'] / 1e6:.2f} MB media, chance accuracy "
        f"{summary['heldout_chance_accuracy']:.3f}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

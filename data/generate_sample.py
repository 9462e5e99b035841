"""Generate a small, learnable sample dataset in the official VideoLLaMA3 annotation schema.

Usage::

    python data/generate_sample.py --out data/sample [--seed 0] [--train 360] [--heldout 64]

Writes ``train.jsonl`` and ``heldout.jsonl`` (one record per line, paths relative to ``--out``) and the media
under ``<out>/media/{images,videos}``. Every answer is one word from a small closed set per task; held-out accuracy
is the exact match of the generated answer. Every record carries ``task`` (the loader ignores unknown keys): the
evaluation reports accuracy per task beside a *baseline* measured with the same metric, always answering the
task's most frequent training answer (:func:`majority_baseline`). Held-out records also carry ``answer``,
``choices`` (the closed set, informative) and ``modality``.

Tasks (the mapping from pixels / text to the answer is deterministic, so a model can learn it):

- image ``colour``      one shape; "What colour is the shape?"              red / green / blue / yellow
- video ``video_colour`` a square moving across the frame; its colour       red / green / blue / yellow
- text  ``opposite``    "What is the opposite of hot?" (5 phrasings)        a fixed word list

One task per modality, each one the tiny preset learns from a few hundred records within the quickstart's four
stages, so every row of the quickstart's held-out table beats its baseline (data/README.md has the measured
table). Tasks it did not learn in that budget left the sample: ``shape`` (circle / square / triangle), ``count``
(1-3 shapes) and ``sum`` (number words) stayed at or below their baselines (measured 2026-12-07: 0.333 / 0.333,
0.200 / 0.400, 0.000 / 0.000); the direction of a square on a plain background is not observable to the tiny model
at all once stages 3-4 prune the unchanged tokens (no absolute position embedding in the vision encoder;
``data/generate_motion.py`` is the motion set it does learn, B7 in BENCHMARKS.md, and mixes ``shape`` and ``sum``
in); "do two images have the same colour?" stayed at 0 against a 0.5 baseline.

:func:`generate_benchmark` writes ``mc_train.json`` / ``mc_test.json``: the colour questions as a multiple-choice
benchmark in the common video-QA form (docs/benchmarks.md).

Held-out is disjoint from training, by construction, with the same task families on both sides:

- media: every rendered image / video is assigned to a split by a hash of its pixels (and frame rate), 1 in
  ``HELDOUT_MODULUS`` to held-out; each split re-draws until its content falls in its own region. So no held-out
  image or video (file or content) occurs in training, and both splits sample the same distribution.
- text: a prompt is an (instance, phrasing) combination; a fixed, seed-independent share of the combinations is
  held out (:func:`heldout_combination`), rotated so every instance and every phrasing is also seen in training
  (an opposite pair is asked in training with 3 of its 5 phrasings, in held-out with the other 2). So no held-out
  prompt + answer pair occurs in training; held-out text measures generalisation to unseen phrasings.

Answers are balanced per task (classes are dealt round-robin, then shuffled), sizes and positions are random,
and the whole output is a pure function of ``--seed`` (train and held-out use separate random streams, so the
held-out set does not change with ``--train``). PNG is lossless and deterministic; the x264 settings are pinned so
the mp4 bytes are too (see :func:`write_video`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter
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
SHAPES = ("circle", "square", "triangle")  # drawn at random: the colour task's answer does not depend on it
DIRECTIONS = ("left", "right", "up", "down")
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

# Phrasings of the text task; (instance, phrasing) combinations are split between train and held-out.
OPPOSITE_TEMPLATES = (
    "What is the opposite of {w}?",
    "Which word means the opposite of {w}?",
    "Name the opposite of {w}.",
    "Give the opposite of the word {w}.",
    "What word is the opposite of {w}?",
)
OPPOSITE_HELDOUT_PER_INSTANCE = 2  # of 5 phrasings

# Fraction of records per task (one task per modality).
TASK_SHARES = {"colour": 0.40, "video_colour": 0.35, "opposite": 0.25}
# Default split sizes. 64 held-out records are 26 colour, 22 video_colour and 16 opposite: each of the 16 held-out
# opposite prompts (8 pairs x 2 phrasings) once, and enough images and videos that a task's accuracy is not the luck
# of a few records (one record is 0.04-0.06 of a task's accuracy).
N_TRAIN, N_HELDOUT = 360, 64

SUFFIX = " Answer with one word."
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (200, 200, 200))

# 1 in HELDOUT_MODULUS rendered media (by content hash) belongs to the held-out split.
HELDOUT_MODULUS = 8
_MAX_DRAWS = 2000  # (1 - 1/8) ** 2000: never reached in practice

# x264 settings of every video. mbtree=0: x264's macroblock-tree rate control made the bitstream depend on the
# process's memory layout (measured: the same frames encoded with different heap states, e.g. another environment
# variable, gave 2-3 different byte streams per video out of 300 encodes, decoded frames identical; with
# mbtree=0, or constant QP, 300 of 300 were identical). threads=1 keeps both x264 and PyAV's RGB->YUV conversion
# (swscale, which takes the codec's thread count) single-threaded, so CPU count and affinity cannot matter either.
X264_OPTIONS = {"preset": "veryfast", "crf": "23", "threads": "1", "x264-params": "mbtree=0"}


# ---------------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------------


class Split:
    """What a task maker needs: which split it draws for, its random stream, the output root, selection pools.

    (A plain class, not a dataclass: the tests load this file with importlib without registering a module.)
    """

    def __init__(self, name: str, rng: random.Random, out: Path):
        self.name = name  # "train" | "heldout"
        self.rng = rng
        self.out = out
        self.pools: dict[tuple, list] = {}


def content_digest(*arrays: np.ndarray, extra: str = "") -> str:
    """sha256 of arrays (shape, dtype and bytes) and ``extra``: the identity of a rendered image or video."""
    h = hashlib.sha256(extra.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def content_split(digest: str) -> str:
    """The split a piece of content belongs to: held-out for 1 in ``HELDOUT_MODULUS`` digests."""
    return "heldout" if int(digest[:8], 16) % HELDOUT_MODULUS == 0 else "train"


def _draw_in_split(split: Split, draw: Callable[[], tuple[tuple[np.ndarray, ...], str, object]]):
    """Call ``draw()`` -> ``(arrays, extra, result)`` until the content (``arrays`` and ``extra``, see
    :func:`content_digest`) belongs to ``split``; returns that draw's ``result``."""
    for _ in range(_MAX_DRAWS):
        arrays, extra, result = draw()
        if content_split(content_digest(*arrays, extra=extra)) == split.name:
            return result
    raise RuntimeError(f"no content for split {split.name!r} in {_MAX_DRAWS} draws")


def heldout_combination(instance: int, template: int, n_templates: int, n_heldout: int) -> bool:
    """Whether the text prompt (instance, phrasing) is held out: ``n_heldout`` of the ``n_templates`` phrasings of
    each instance, rotated with the instance so every phrasing is held out for some instances and seen in training
    with the others. Fixed (seed-independent), so train and held-out of any seed never share a prompt."""
    return (instance + template) % n_templates < n_heldout


def _pick(split: Split, key: tuple, options: list) -> object:
    """Cycle through ``options`` in a shuffled order per ``key`` (no repeats until all were used)."""
    pool = split.pools.get(key)
    if not pool:
        pool = list(options)
        split.rng.shuffle(pool)
        split.pools[key] = pool
    return pool.pop()


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


def draw_image(rng: random.Random, *, colour: str, shape: str) -> np.ndarray:
    """RGB array of one shape (a third to a half of the side) at a random place on a plain background."""
    size = rng.randrange(56, 113)
    side = rng.randint(size // 3, size // 2)
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
    _draw_shape(ImageDraw.Draw(image), shape, (x, y, x + side, y + side), COLOURS[colour])
    return np.asarray(image)


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", optimize=False)


def draw_video(rng: random.Random, *, direction: str, colour: str) -> tuple[np.ndarray, int]:
    """Frames ``(T, S, S, 3)`` of a coloured square sliding across a plain background in ``direction``, and fps."""
    size = rng.choice((56, 70, 84))  # even sides: yuv420p needs them
    fps = rng.choice((2, 3, 4))
    seconds = rng.randint(4, 6)
    n_frames = fps * seconds
    side = size // 4
    background = np.array(rng.choice(BACKGROUNDS), dtype=np.uint8)
    # The square travels from one border to the other along the motion axis; its other coordinate is random.
    travel = np.linspace(2, size - side - 2, n_frames).round().astype(int)
    if direction in ("left", "up"):
        travel = travel[::-1]
    across = rng.randint(2, size - side - 2)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    frames[:] = background
    for i, pos in enumerate(travel):
        x, y = (pos, across) if direction in ("left", "right") else (across, pos)
        frames[i, y : y + side, x : x + side] = COLOURS[colour]
    return frames, fps


def write_video(path: Path, frames: np.ndarray, fps: int, *, crf: int | None = None) -> None:
    """Encode ``frames`` as an H.264 (yuv420p) mp4 with the pinned :data:`X264_OPTIONS` (``crf``: another quality)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = frames.shape[1]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # also the thread count of PyAV's RGB->YUV conversion
        stream.options = {**X264_OPTIONS, **({} if crf is None else {"crf": str(crf)})}
        stream.codec_context.time_base = Fraction(1, fps)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------------------------
# Tasks: each maker draws its media for the split and returns (media fields, question, choices)
# ---------------------------------------------------------------------------------------------------------------


def _conversation(prompt: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def _image(split: Split, rel: str, *, colour: str | None, shape: str | None) -> None:
    """Draw an image of the split's content region and write it to ``out/rel`` (None: a random colour / shape)."""
    rng = split.rng

    def draw():
        c = colour if colour is not None else rng.choice(sorted(COLOURS))
        s = shape if shape is not None else rng.choice(SHAPES)
        pixels = draw_image(rng, colour=c, shape=s)
        return (pixels,), "", pixels

    write_image(split.out / rel, _draw_in_split(split, draw))


def _video(split: Split, rel: str, *, direction: str | None, colour: str | None) -> None:
    """Draw a video of the split's content region (pixels and frame rate) and write it to ``out/rel``."""
    rng = split.rng

    def draw():
        d = direction if direction is not None else rng.choice(DIRECTIONS)
        c = colour if colour is not None else rng.choice(sorted(COLOURS))
        frames, fps = draw_video(rng, direction=d, colour=c)
        return (frames,), f"fps={fps}", (frames, fps)

    frames, fps = _draw_in_split(split, draw)
    write_video(split.out / rel, frames, fps)


def make_colour(split: Split, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/images/{stem}.png"
    _image(split, rel, colour=answer, shape=None)
    return {"image": rel}, "<image>\nWhat colour is the shape?" + SUFFIX, tuple(COLOURS)


def make_video_colour(split: Split, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/videos/{stem}.mp4"
    _video(split, rel, direction=None, colour=answer)
    return {"video": rel}, "<video>\nWhat colour is the moving square?" + SUFFIX, tuple(COLOURS)


def _text_prompt(split: Split, task: str, answer: str, instances, templates, n_heldout: int, fields) -> str:
    """A prompt for ``answer`` from this split's (instance, phrasing) combinations, cycling without repeats."""
    combos = [
        (i, t)
        for i in instances
        for t in range(len(templates))
        if heldout_combination(i, t, len(templates), n_heldout) == (split.name == "heldout")
    ]
    i, t = _pick(split, (task, answer), combos)
    return templates[t].format(**fields(i)) + SUFFIX


def make_opposite(split: Split, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    words = list(OPPOSITES)
    instances = [i for i, w in enumerate(words) if OPPOSITES[w] == answer]
    prompt = _text_prompt(
        split,
        "opposite",
        answer,
        instances,
        OPPOSITE_TEMPLATES,
        OPPOSITE_HELDOUT_PER_INSTANCE,
        lambda i: {"w": words[i]},
    )
    return {}, prompt, OPPOSITE_ANSWERS


Maker = Callable[[Split, str, str], tuple[dict, str, tuple[str, ...]]]

# task -> (modality, answer classes, maker)
TASKS: dict[str, tuple[str, tuple[str, ...], Maker]] = {
    "colour": ("image", tuple(COLOURS), make_colour),
    "video_colour": ("video", tuple(COLOURS), make_video_colour),
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
    """Records per task for a split of ``total`` records (:data:`TASK_SHARES`)."""
    counts = _apportion(total, TASK_SHARES)
    return {task: counts[task] for task in TASKS}


def build_split(
    rng: random.Random,
    out: Path,
    split: str,
    total: int,
    *,
    with_answers: bool,
    tasks: dict[str, tuple[str, tuple[str, ...], Maker]] | None = None,
    counts: dict[str, int] | None = None,
) -> list[dict]:
    """Make ``total`` records of split ``split`` ("train" | "heldout"), shuffled; media are written under
    ``out/media``. Media content and text prompts come from the split's own region (module docstring).
    ``tasks`` / ``counts``: another task table and records per task (default: :data:`TASKS`, :func:`task_counts`;
    ``data/generate_motion.py`` passes its own)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    tasks = TASKS if tasks is None else tasks
    ctx = Split(split, rng, out)
    records: list[dict] = []
    for task, n in (task_counts(total) if counts is None else counts).items():
        modality, classes, maker = tasks[task]
        # Deal classes round-robin so each class appears n/len(classes) times (+-1), then shuffle the order.
        answers = [classes[i % len(classes)] for i in range(n)]
        rng.shuffle(answers)
        for i, answer in enumerate(answers):
            stem = f"{split}_{task}_{i:04d}"
            media, prompt, choices = maker(ctx, stem, answer)
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


def record_key(record: dict, root: Path) -> tuple:
    """What makes two records the same item: prompt, answer and the bytes of every media file."""
    prompt, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
    media = tuple(hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in media_paths(record))
    return prompt, answer, media


def overlap(train: list[dict], heldout: list[dict], root: Path) -> dict[str, int]:
    """Held-out records equal to a training record (:func:`record_key`), held-out media files whose path or bytes
    occur in training, and held-out prompts (text-only records) that occur in training with the same answer."""
    train_keys = {record_key(r, root) for r in train}
    train_paths = {rel for r in train for rel in media_paths(r)}
    train_bytes = {hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in train_paths}
    held_media = [rel for r in heldout for rel in media_paths(r)]
    return {
        "records": sum(record_key(r, root) in train_keys for r in heldout),
        "media_paths": sum(rel in train_paths for rel in held_media),
        "media_bytes": sum(
            hashlib.sha256((root / rel).read_bytes()).hexdigest() in train_bytes for rel in held_media
        ),
    }


def majority_answers(records: list[dict]) -> dict[str, str]:
    """Per task, the most frequent answer (ties: the alphabetically first), as
    ``videollama3_train.evaluate.majority_answers`` computes it."""
    counts: dict[str, Counter] = {}
    for r in records:
        counts.setdefault(r["task"], Counter())[r["conversations"][1]["value"].strip()] += 1
    return {task: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for task, c in counts.items()}


def majority_baseline(train: list[dict], heldout: list[dict]) -> float:
    """Held-out exact-match accuracy of always answering the task's most frequent training answer."""
    answers = majority_answers(train)
    hits = sum(answers.get(r["task"]) == r["conversations"][1]["value"].strip() for r in heldout)
    return hits / max(1, len(heldout))


def generate(out: Path, *, seed: int = 0, n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT) -> dict:
    """Write the dataset under ``out``; returns a summary (record counts, media bytes, held-out baseline,
    train/held-out overlap, which is 0 by construction and checked)."""
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"split sizes must be >= 0, got train={n_train}, heldout={n_heldout}")
    out.mkdir(parents=True, exist_ok=True)
    # Separate streams per split: the held-out set stays the same whatever --train is.
    train = build_split(random.Random(f"{seed}-train"), out, "train", n_train, with_answers=False)
    heldout = build_split(random.Random(f"{seed}-heldout"), out, "heldout", n_heldout, with_answers=True)
    return write_splits(out, train, heldout)


# The sample's tasks asked as multiple-choice questions, in the common video-QA benchmark form that eval.benchmarks
# reads (docs/benchmarks.md): the question without its placeholders and one-word instruction, the task's answer
# classes as options (sorted), the answer's letter.
MC_TASKS = ("colour", "video_colour", "opposite")


def generate_benchmark(
    out: Path, *, seed: int = 0, n_train: int = 48, n_test: int = 24, tasks: tuple[str, ...] = MC_TASKS
) -> dict:
    """Write ``mc_train.json`` and ``mc_test.json`` under ``out``: multiple-choice questions of ``tasks`` (an image,
    a video or text, the question, the options, the answer letter), equally many per task, the test split disjoint
    from the training one by content and phrasing (as the sample's held-out split). Returns the counts and the
    chance accuracy of the test split."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    for split, n, name in (("train", n_train, "mc_train.json"), ("heldout", n_test, "mc_test.json")):
        counts = {task: n // len(tasks) + (i < n % len(tasks)) for i, task in enumerate(tasks)}
        table = {task: TASKS[task] for task in tasks}
        records = build_split(
            random.Random(f"{seed}-mc-{split}"), out, split, n, with_answers=False, tasks=table, counts=counts
        )
        questions = []
        for r in records:
            prompt, answer = (t["value"] for t in r["conversations"])
            options = sorted(TASKS[r["task"]][1])
            question = prompt.replace("<image>\n", "").replace("<video>\n", "").removesuffix(SUFFIX)
            media = {k: r[k] for k in ("image", "video") if k in r}
            letter = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[options.index(answer)]
            questions.append(
                {**media, "question": question, "options": options, "answer": letter, "task": r["task"]}
            )
        (out / name).write_text(json.dumps(questions, indent=0) + "\n", encoding="utf-8")
        summary[name] = len(questions)
        summary["chance"] = sum(1 / len(TASKS[q["task"]][1]) for q in questions) / max(len(questions), 1)
    return summary


def write_splits(out: Path, train: list[dict], heldout: list[dict]) -> dict:
    """Check the splits share nothing, write ``train.jsonl`` / ``heldout.jsonl`` under ``out``; returns the summary
    (record counts, media bytes, held-out baseline, train/held-out overlap: 0, or this raises)."""
    shared = overlap(train, heldout, out)
    if any(shared.values()):  # cannot happen (module docstring); never write a leaking split
        raise RuntimeError(f"held-out overlaps training: {shared}")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    # Count only the files these records reference: a reused --out folder may hold media of an earlier run.
    media_bytes = sum((out / rel).stat().st_size for r in train + heldout for rel in media_paths(r))
    return {
        "train": len(train),
        "heldout": len(heldout),
        "media_bytes": media_bytes,
        "heldout_baseline_accuracy": majority_baseline(train, heldout),
        "overlap": shared,
    }


def cli(
    argv: list[str] | None, *, doc: str, generate: Callable[..., dict], out: str, n_train: int, n_heldout: int
) -> int:
    """The command line of a generator: ``--out --seed --train --heldout``, then one line of summary (any
    ``<name>_baseline_accuracy`` beside the held-out one is printed too)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(out), help="output folder (data root)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the output is a pure function of it"
    )
    parser.add_argument("--train", type=int, default=n_train, help="number of training records")
    parser.add_argument("--heldout", type=int, default=n_heldout, help="number of held-out records")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = generate(args.out, seed=args.seed, n_train=args.train, n_heldout=args.heldout)
    others = "".join(
        f", {key.removesuffix('_baseline_accuracy')} baseline {value:.3f}"
        for key, value in summary.items()
        if key.endswith("_baseline_accuracy") and key != "heldout_baseline_accuracy" and value is not None
    )
    print(
        f"wrote {summary['train']} train + {summary['heldout']} held-out records to {args.out} "
        f"({summary['media_bytes'] / 1e6:.2f} MB media, held-out baseline accuracy "
        f"{summary['heldout_baseline_accuracy']:.3f}{others}, held-out/train overlap 0) in "
        f"{time.perf_counter() - start:.1f}s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(argv, doc=__doc__, generate=generate, out="data/sample", n_train=N_TRAIN, n_heldout=N_HELDOUT)


if __name__ == "__main__":
    sys.exit(main())

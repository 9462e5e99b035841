"""Generate the motion generalisation set: a held-out motion task mixed with image and text tasks.

Usage::

    python data/generate_motion.py --out data/motion [--seed 0] [--train 800] [--heldout 100]

A dataset apart from the bundled sample data (``data/generate_sample.py``), made to answer one question: does the
``tiny`` preset *generalise* motion, or memorise its training clips? Its ``motion`` task shows a square sliding
left / right / up / down in a short clip and asks where it goes; the held-out clips are new draws of the same
distribution (other frame sizes, scenes, square sizes, positions, speeds and frame rates), never a training clip
(media are assigned to a split by a hash of their content, as in the sample data). Motion is ~40% of the records;
the rest are image (``colour``, ``shape``) and text (``opposite``, ``sum``) tasks, so the model learns motion while
learning everything else, as in a real mixture (``colour`` and ``opposite`` are the sample data's; ``shape`` and
``sum``, which the quickstart's budget does not teach the tiny preset, are defined here).

What the clips are made of, and why (each measured with the tiny preset, B7 in BENCHMARKS.md):

- a static *scene* behind the square (brightness ramps across x and y), not a plain colour. VideoLLaMA3's vision
  encoder has no absolute position embedding (2D RoPE only: on a uniform background a patch's features do not say
  where it is) and stages 3-4 prune the tokens that did not change (DiffFP), so on a plain background the kept
  tokens of a moving square carry no position at all: held-out motion stayed at chance (0.22-0.28) whatever the
  training. Any real video has a scene; here it is the simplest one that localises a token.
- one square colour (:data:`SQUARE`): with the sample data's four colours the tiny model's motion accuracy fell
  (0.47 -> 0.30 in one stage), and colour is the sample data's question, not this one's.
- near-lossless H.264 (crf :data:`CRF`): at the sample data's crf 23 the codec's noise on the ramps made DiffFP keep
  50-100% of the tokens of still regions; at crf 5 it keeps the square's trail.
- enough clips: 320 motion clips (800 records). With 160 (400 records) the tiny preset memorised its clips on
  some seeds (held-out motion 0.45-0.97 over four seeds); with 320 it learns the rule.
- the square crosses the frame (85-100% of the free span, from one border towards the other, at constant speed);
  the answer needs the order of the frames: a single frame, or the set of frames, does not tell which way it went.

Same schema and fields as the sample data (``task`` on every record; ``answer``, ``choices``, ``modality`` on
held-out ones), so ``pipeline model=tiny data=file data.path=<out>/train.jsonl data.root=<out>
data.heldout_path=<out>/heldout.jsonl data.heldout_root=<out>`` trains on it and reports held-out accuracy per task
beside each task's majority-answer baseline. ``benchmarks/bench_generalisation.py`` does exactly that.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np

# The sample generator is a script, not a module of the package: load it from beside this file.
_spec = importlib.util.spec_from_file_location(
    "generate_sample", Path(__file__).with_name("generate_sample.py")
)
sample = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample)

DIRECTIONS = sample.DIRECTIONS
FRAME_SIZES = (56, 70, 84)  # even sides (yuv420p)
SPAN = (0.85, 1.0)  # share of the free span (frame side - square side) the square travels
SQUARE = "blue"  # its colour (sample.COLOURS)
CRF = 5  # x264 quality: near-lossless, so still regions stay still for DiffFP
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
# "What is three plus four?": (pair, phrasing) combinations split between train and held-out as the sample's
# opposites are (sample.heldout_combination); a held-out sum may be unseen in training.
SUM_TEMPLATES = (
    "What is {a} plus {b}?",
    "How much is {a} plus {b}?",
    "What do you get when you add {a} and {b}?",
)
SUM_HELDOUT_PER_INSTANCE = 1  # of 3 phrasings
# Every ordered pair (a, b) with a + b <= 8, in a fixed order (the instance index used by heldout_combination).
SUM_PAIRS = tuple((a, total - a) for total in range(len(NUMBER_WORDS)) for a in range(total + 1))


def scene(rng: random.Random, size: int) -> np.ndarray:
    """A static background ``(S, S, 3)``: a brightness ramp across x in one channel and across y in another."""
    ramp = np.linspace(0.0, 1.0, size)
    low, high = rng.randint(40, 80), rng.randint(170, 210)
    x = (low + (high - low) * ramp)[None, :].repeat(size, 0)
    y = (low + (high - low) * ramp)[:, None].repeat(size, 1)
    return np.stack([x, y, np.full_like(x, rng.randint(90, 160))], axis=-1).round().astype(np.uint8)


def draw_motion(rng: random.Random, *, direction: str, colour: str) -> tuple[np.ndarray, int]:
    """Frames ``(T, S, S, 3)`` of a square moving at constant speed in ``direction`` from a random start, and fps."""
    size = rng.choice(FRAME_SIZES)
    fps = rng.choice((2, 3, 4))
    n_frames = fps * rng.randint(3, 5)
    side = rng.randint(size // 5, size // 4)
    free = size - side - 4  # positions 2 .. size - side - 2
    distance = round(free * rng.uniform(*SPAN))
    start = rng.randint(2, 2 + free - distance)
    travel = np.linspace(start, start + distance, n_frames).round().astype(int)
    if direction in ("left", "up"):
        travel = travel[::-1]
    across = rng.randint(2, size - side - 2)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    frames[:] = scene(rng, size)
    for i, pos in enumerate(travel):
        x, y = (pos, across) if direction in ("left", "right") else (across, pos)
        frames[i, y : y + side, x : x + side] = sample.COLOURS[colour]
    return frames, fps


def make_shape(split, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/images/{stem}.png"
    sample._image(split, rel, colour=None, shape=answer)
    return {"image": rel}, "<image>\nWhat shape is shown?" + sample.SUFFIX, sample.SHAPES


def make_sum(split, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    total = NUMBER_WORDS.index(answer)
    instances = [i for i, (a, b) in enumerate(SUM_PAIRS) if a + b == total]
    prompt = sample._text_prompt(
        split,
        "sum",
        answer,
        instances,
        SUM_TEMPLATES,
        SUM_HELDOUT_PER_INSTANCE,
        lambda i: {"a": NUMBER_WORDS[SUM_PAIRS[i][0]], "b": NUMBER_WORDS[SUM_PAIRS[i][1]]},
    )
    return {}, prompt, NUMBER_WORDS


def make_motion(split, stem: str, answer: str) -> tuple[dict, str, tuple[str, ...]]:
    rel = f"media/videos/{stem}.mp4"
    rng = split.rng

    def draw():
        frames, fps = draw_motion(rng, direction=answer, colour=SQUARE)
        return (frames,), f"fps={fps}", (frames, fps)

    frames, fps = sample._draw_in_split(split, draw)
    sample.write_video(split.out / rel, frames, fps, crf=CRF)
    return {"video": rel}, "<video>\nIn which direction does the square move?" + sample.SUFFIX, DIRECTIONS


# task -> (modality, answer classes, maker), as in the sample data
TASKS = {
    "motion": ("video", DIRECTIONS, make_motion),
    "colour": sample.TASKS["colour"],
    "shape": ("image", sample.SHAPES, make_shape),
    "opposite": sample.TASKS["opposite"],
    "sum": ("text", NUMBER_WORDS, make_sum),
}
TRAIN_SHARES = {"motion": 0.40, "colour": 0.20, "shape": 0.10, "opposite": 0.18, "sum": 0.12}
# Held-out leans on motion: the number this set exists for needs enough records to be more than noise.
HELDOUT_SHARES = {"motion": 0.60, "colour": 0.12, "shape": 0.08, "opposite": 0.12, "sum": 0.08}


def build_split(
    rng: random.Random, out: Path, split: str, total: int, shares: dict[str, float]
) -> list[dict]:
    """``total`` records of ``split`` ("train" | "heldout") in the given task shares, classes balanced, shuffled."""
    counts = sample._apportion(total, shares)
    return sample.build_split(
        rng, out, split, total, with_answers=split == "heldout", tasks=TASKS, counts=counts
    )


def generate(out: Path, *, seed: int = 0, n_train: int = 800, n_heldout: int = 100) -> dict:
    """Write the set under ``out``; returns a summary (counts, media bytes, baseline, overlap — 0, checked)."""
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"split sizes must be >= 0, got train={n_train}, heldout={n_heldout}")
    out.mkdir(parents=True, exist_ok=True)
    train = build_split(random.Random(f"motion-{seed}-train"), out, "train", n_train, TRAIN_SHARES)
    heldout = build_split(random.Random(f"motion-{seed}-heldout"), out, "heldout", n_heldout, HELDOUT_SHARES)
    summary = sample.write_splits(out, train, heldout)
    motion = [r for r in heldout if r["task"] == "motion"]
    summary["motion_baseline_accuracy"] = sample.majority_baseline(train, motion) if motion else None
    return summary


def main(argv: list[str] | None = None) -> int:
    return sample.cli(argv, doc=__doc__, generate=generate, out="data/motion", n_train=800, n_heldout=100)


if __name__ == "__main__":
    sys.exit(main())

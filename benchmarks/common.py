"""Shared helpers of the training benchmarks (B4 ``bench_step.py``, B5 ``bench_loss.py``).

Runs with torch, transformers and accelerate alone (the GPU box has no hydra / wandb / datasets / av /
deepspeed): it imports only ``videollama3_train.model.*``, ``data.collate``, ``data.packing``, ``trainer.loss``
and ``trainer.metrics`` (``tests/test_benchmarks_smoke.py`` checks that none of them pulls in those packages).

* model shapes (``2b`` / ``small`` / ``tiny``) and a random-weight model built straight from the config;
* a synthetic stage-3-like mixture (images at merge 1, videos at merge 2 with a ~70% compression mask,
  text-only), realistic lengths, no media decoded: pixels are random tensors of the right shapes;
* selective activation checkpointing (every n-th LLM layer, vision tower on/off);
* memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU a ``TorchDispatchMode`` that follows the bytes of
  live tensor storages (tracemalloc does not see torch's allocator) and the process RSS high-water mark;
* a description of the machine, and markdown tables.
"""

from __future__ import annotations

import datetime
import math
import platform
import resource
import shlex
import statistics
import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from videollama3_train.model.presets import PRESETS, ModelShape, TextShape, VisionShape, build_model_config

IGNORE_INDEX = -100
PATCH_DIM = 3 * 14 * 14  # one flattened (C, 1, 14, 14) patch row

# ---------------------------------------------------------------------------------------------------------------
# Shapes and model
# ---------------------------------------------------------------------------------------------------------------

SHAPES: dict[str, ModelShape] = {
    "2b": PRESETS["videollama3_2b"],
    # A few layers of the 2B widths (vision 1152/4304/16 heads, LLM 1536/8960/12+2 heads, full Qwen2 vocabulary):
    # every matmul has its real shape, only depth is cut. Runs on CPU in tens of seconds per step.
    "small": ModelShape(
        vision=VisionShape(num_hidden_layers=2),
        text=TextShape(num_hidden_layers=2),
    ),
    "tiny": PRESETS["tiny"],
}

# Default token budget of one packed row: 16384 at the real shape (docs/reference.md §2), less on CPU.
DEFAULT_MAX_TOKENS = {"2b": 16384, "small": 512, "tiny": 1024}

QWEN_IMAGE_ID, QWEN_VIDEO_ID = 151655, 151656


def media_token_ids(vocab: int) -> tuple[int, int]:
    """``(image_id, video_id)``: the Qwen2 ids when the vocabulary has them, else the last two ids."""
    if vocab > QWEN_VIDEO_ID:
        return QWEN_IMAGE_ID, QWEN_VIDEO_ID
    return vocab - 2, vocab - 1


def build_bench_model(
    shape: str | ModelShape, attn_implementation: str, *, seed: int = 0, device: str | torch.device = "cpu"
):
    """A random-weight ``VideoLlama3ForConditionalGeneration`` of ``shape`` (a name of :data:`SHAPES` or a
    ``ModelShape``) in fp32 (master weights; mixed precision comes from autocast), in train mode.
    ``attn_implementation`` must already be resolved (``model.attention.select_attention``).

    Built with ``construction_backend(attn)`` and switched with ``use_attention`` afterwards: transformers 5.x
    refuses to construct a model whose implementation name contains "flash" unless it is a flash-attn kernel, and
    ``flash_varlen`` is ours."""
    from transformers import VideoLlama3ForConditionalGeneration

    from videollama3_train.model.attention import construction_backend, use_attention
    from videollama3_train.model.core import init_projector

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
        shape = SHAPES[shape]
    image_id, video_id = media_token_ids(shape.text.vocab_size)
    config = build_model_config(
        shape,
        image_token_id=image_id,
        video_token_id=video_id,
        attn_implementation=construction_backend(attn_implementation),
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = VideoLlama3ForConditionalGeneration(config)
    use_attention(model, attn_implementation)
    init_projector(model)
    model.train()
    return model


def set_checkpointing(model: torch.nn.Module, *, llm_every: int, vision: bool) -> str:
    """Activation checkpointing of every ``llm_every``-th LLM layer (0 = none) and of every vision layer when
    ``vision``. Returns a short description. (Same mechanism as ``trainer.fit.apply_gradient_checkpointing``,
    which uses one period for both towers; the benchmark sets them independently.)"""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if llm_every <= 0 and not vision:
        return "none"
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    index = {"vision": 0, "llm": 0}
    for name, module in model.named_modules():
        if not isinstance(module, GradientCheckpointingLayer):
            continue
        tower = "vision" if ".vision_model." in f".{name}." else "llm"
        if tower == "vision":
            module.gradient_checkpointing = vision
        else:
            module.gradient_checkpointing = llm_every > 0 and index["llm"] % llm_every == 0
        index[tower] += 1
    parts = []
    if llm_every > 0:
        parts.append("LLM all" if llm_every == 1 else f"LLM 1/{llm_every}")
    if vision:
        parts.append("vision all")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic stage-3-like mixture
# ---------------------------------------------------------------------------------------------------------------

# ChatML skeleton: <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n ... <|im_end|>\n
USER_HEADER, USER_END, ASSISTANT_HEADER, ANSWER_END = 3, 2, 3, 2
TIMESTAMP_TOKENS = 7  # "Time 12.0s:" + "," between frames


def _lognormal_int(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(round(rng.lognormal(math.log(median), sigma)), lo, hi))


def _grid_for(tokens: int, aspect: float) -> tuple[int, int]:
    """``(h, w)`` with ``h * w`` close to ``tokens`` and ``w / h`` close to ``aspect``."""
    h = max(1, round(math.sqrt(tokens / aspect)))
    return h, max(1, round(tokens / h))


def synthetic_samples(
    n: int,
    *,
    vocab: int,
    max_tokens: int,
    scale: float = 1.0,
    mix: Sequence[float] = (0.55, 0.30, 0.15),
    keep_ratio: float = 0.7,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``n`` Sample dicts (docs/architecture.md) WITHOUT pixels (see :func:`add_pixels`), in mixture order.

    Lengths at ``scale=1`` follow a stage-3 SFT mixture under a 16k row / 10240 visual tokens per sample:
    ``mix`` = shares of image / video / text-only samples. Images: 1 (85%) or 2-4 per sample, ~900 tokens each
    (lognormal, merge 1, varied aspect ratios). Videos: 8-64 frames at 1 fps, merge 2, the 10240-token budget
    split over frames (<= ~300 tokens per frame), a compression mask keeping ``keep_ratio`` of the tokens on
    average (frame 0 whole, every frame at least one token), timestamps between frames. Text: 1-4 turns,
    prompts ~40 and answers ~150 tokens (longer for text-only). ``scale`` shrinks every length for CPU runs.
    Samples longer than ``max_tokens`` are redrawn, so all of them pack.
    """
    rng = np.random.default_rng([seed, 0xB4])
    image_id, video_id = media_token_ids(vocab)
    text_hi = min(vocab, 151643) - 3 if vocab > QWEN_VIDEO_ID else vocab - 2
    probs = np.asarray(mix, dtype=np.float64) / sum(mix)
    budget = max(4, int(10240 * scale))
    out: list[dict[str, Any]] = []
    while len(out) < n:
        modality = ("image", "video", "text")[int(rng.choice(3, p=probs))]
        sample = _one_sample(rng, modality, scale, budget, keep_ratio, text_hi, image_id, video_id)
        if sample["input_ids"].shape[0] <= max_tokens:
            sample["meta"] = {"dataset": modality, "index": len(out), "modality": modality}
            out.append(sample)
    return out


def _one_sample(rng, modality, scale, budget, keep_ratio, text_hi, image_id, video_id) -> dict[str, Any]:
    s = max(scale, 1e-3)
    turns = int(rng.integers(1, 5)) if modality == "text" else int(rng.choice([1, 1, 1, 2]))
    prompt_med, answer_med = (300, 400) if modality == "text" else (40, 150)
    pieces: list[tuple[str, int]] = []  # (kind, count): kind in text / label / image / video / frame breaks
    media: dict[str, Any] = {}

    if modality == "image":
        n_img = 1 if rng.random() < 0.85 else int(rng.integers(2, 5))
        per = max(4, budget // n_img)
        grids = []
        for _ in range(n_img):
            tok = _lognormal_int(rng, 900 * s, 0.7, 4, per)
            grids.append((1, *_grid_for(tok, math.exp(rng.uniform(-0.7, 0.7)))))
        media["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        media["image_merge_sizes"] = torch.ones(n_img, dtype=torch.long)
        media_tokens = [("image", h * w) for _, h, w in grids]
        media_tokens = [p for m in media_tokens for p in (m, ("text", 1))]  # "\n" after each image
    elif modality == "video":
        t = max(2, round(int(rng.integers(8, 65)) * math.sqrt(s)))
        per_frame = max(1, min(budget // t, _lognormal_int(rng, 300 * s, 0.4, 1, 10**6)))
        hh, ww = _grid_for(per_frame, math.exp(rng.uniform(0.0, 0.6)))
        frame = hh * ww
        target = float(np.clip(rng.normal(keep_ratio, 0.08), 0.3, 1.0))
        p = float(np.clip((target * t - 1) / (t - 1), 0.02, 1.0))
        mask = torch.from_numpy(rng.random((t, frame)) < p)
        mask[0] = True
        for f in range(1, t):
            if not bool(mask[f].any()):
                mask[f, int(rng.integers(frame))] = True
        media["video_grid_thw"] = torch.tensor([[t, 2 * hh, 2 * ww]], dtype=torch.long)
        media["video_merge_sizes"] = torch.tensor([2], dtype=torch.long)
        media["video_compression_mask"] = mask.reshape(-1)
        media_tokens = []
        for f in range(t):
            media_tokens += [("text", TIMESTAMP_TOKENS), ("video", int(mask[f].sum()))]
        media_tokens.append(("text", 1))
    else:
        media_tokens = []

    for turn in range(turns):
        pieces.append(("text", USER_HEADER))
        if turn == 0:
            pieces += media_tokens
        pieces.append(("text", _lognormal_int(rng, prompt_med * s, 0.8, 2, int(2000 * s) + 2)))
        pieces.append(("text", USER_END + ASSISTANT_HEADER))
        pieces.append(("label", _lognormal_int(rng, answer_med * s, 1.0, 1, int(3000 * s) + 1) + 1))
        pieces.append(("text", ANSWER_END - 1))  # the "\n" after <|im_end|> (im_end itself is labelled)

    ids, labels = [], []
    for kind, count in pieces:
        if kind == "image":
            chunk = np.full(count, image_id)
        elif kind == "video":
            chunk = np.full(count, video_id)
        else:
            chunk = rng.integers(0, text_hi, count)
        ids.append(chunk)
        labels.append(chunk if kind == "label" else np.full(count, IGNORE_INDEX))
    sample = {
        "input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        "labels": torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        **media,
    }
    return sample


def sample_patches(sample: dict[str, Any]) -> int:
    return sum(int(sample[k].prod(dim=1).sum()) for k in ("image_grid_thw", "video_grid_thw") if k in sample)


def sample_costs(samples: Sequence[dict[str, Any]]) -> np.ndarray:
    """``(N, 2)`` int64 (tokens, patches): the cost table ``data.packing.pack`` takes."""
    return np.array([[int(s["input_ids"].shape[0]), sample_patches(s)] for s in samples], dtype=np.int64)


def add_pixels(sample: dict[str, Any], seed: int) -> dict[str, Any]:
    """A copy of ``sample`` with random ``pixel_values`` / ``pixel_values_videos`` of the right shapes
    (normalised range [-1, 1], float32, like the processor's output)."""
    out = dict(sample)
    g = torch.Generator().manual_seed(seed)
    for grid_key, pix_key in (("image_grid_thw", "pixel_values"), ("video_grid_thw", "pixel_values_videos")):
        if grid_key in sample:
            rows = int(sample[grid_key].prod(dim=1).sum())
            out[pix_key] = torch.rand(rows, PATCH_DIM, generator=g) * 2 - 1
    return out


def mixture_summary(samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    samples = list(samples)
    kinds = [s["meta"]["modality"] for s in samples]
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    labelled = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in samples)
    return {
        "samples": len(samples),
        "share": {k: kinds.count(k) / max(1, len(kinds)) for k in ("image", "video", "text")},
        "median_tokens": int(statistics.median(lengths)) if lengths else 0,
        "label_fraction": labelled / max(1, sum(lengths)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages allocated while the mode is active (and still alive).

    Every non-view output of an op whose storage is not one of the op's inputs' (in-place ops, views of
    pre-existing tensors) is counted until its storage is freed (weakref callback). Tensors that existed before
    the mode (parameters, inputs) are not counted: add them yourself. CPU-side equivalent of
    ``torch.cuda.max_memory_allocated() - memory_allocated()`` without the caching allocator's rounding.
    Slow (Python per op): use it on one untimed step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t._is_view() or t.layout != torch.strided:
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = st._cdata
            if key in self._live:
                continue
            if inputs is None:
                inputs = {
                    a.untyped_storage()._cdata
                    for a in tree_flatten((args, kwargs))[0]
                    if isinstance(a, torch.Tensor) and a.layout == torch.strided
                }
            if key in inputs:
                continue
            nbytes = st.nbytes()
            self._live[key] = weakref.ref(st, self._freed(key, nbytes))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out

    def _freed(self, key: int, nbytes: int):
        def callback(_ref) -> None:
            self.current -= nbytes
            self._live.pop(key, None)

        return callback


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Parameters (+ gradients still held) + optimizer state tensors."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return tensor_bytes(tensors)


def rss_peak_bytes() -> int:
    """High-water mark of this process's resident memory (monotonic over the process's life)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def gib(n: float) -> str:
    """Bytes as GiB, or MiB under 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is visible")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> str:
    import transformers

    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        import os

        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:
            pass
        what = f"CPU {cpu}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"
    return (
        f"{what}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )


def command_line(argv: Sequence[str] | None, script: str) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", script, *map(shlex.quote, args)])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")

"""Pixels -> patch rows: per-sample visual budget, resize + normalise, block-major patchify, frame pruning.

Follows transformers' ``models/video_llama_3/{image,video}_processing_video_llama_3.py`` (same ``smart_resize``, same
torchvision calls, same row layout) so a sample encoded here equals what ``VideoLlama3Processor`` produces
(``tests/test_parity.py``). Sizes follow the processor's own budgets (:func:`processor_budgets`: per image, and per
video divided by its frame count) while a sample's items fit ``max_visual_tokens`` together; a sample over it falls
back to the official rule (docs/reference.md §3), the budget split equally over all its images and frames.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as tvF
from transformers.models.video_llama_3.image_processing_video_llama_3 import smart_resize

from ..contract import merged_tokens
from .errors import DataError

__all__ = [
    "per_item_tokens",
    "processor_budgets",
    "processor_frame_size",
    "processor_image_size",
    "target_size",
    "target_size_pixels",
    "resize_and_normalize",
    "patchify",
    "normalized_patches",
    "compression_mask",
    "tokens_per_frame",
]


def per_item_tokens(num_items: int, max_visual_tokens: int, min_tokens: int, max_tokens: int) -> int:
    """LLM tokens allowed to each image / video frame of a sample holding ``num_items`` of them.

    The budget is shared equally (official rule); ``min_tokens`` wins over the total, so a sample with very many
    frames can exceed ``max_visual_tokens`` by at most ``num_items * min_tokens`` (docs/reference.md §3: 16 each).
    """
    if num_items <= 0:
        return 0
    return max(min_tokens, min(max_tokens, max_visual_tokens // num_items))


def target_size(
    height: int,
    width: int,
    *,
    merge_size: int,
    max_tokens: int,
    min_tokens: int,
    patch_size: int = 14,
) -> tuple[int, int]:
    """``(height, width)`` in pixels that one image / frame is resized to under a budget in LLM tokens.

    ``smart_resize`` with ``factor = patch * merge`` and pixel bounds expressed in LLM tokens: one token covers
    ``factor**2`` pixels, so the item yields between ``min_tokens`` and ``max_tokens`` tokens (up to rounding to the
    factor grid). Raises ``DataError("bad_aspect_ratio")`` beyond 200:1, which the model cannot take.
    """
    factor = patch_size * merge_size
    return target_size_pixels(
        height,
        width,
        factor=factor,
        min_pixels=min_tokens * factor * factor,
        max_pixels=max_tokens * factor * factor,
    )


def target_size_pixels(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """transformers' ``smart_resize`` with pixel bounds as the processor holds them; ``DataError`` instead of its
    ``ValueError`` (aspect ratio over 200:1, or an empty image)."""
    if height < 1 or width < 1:
        raise DataError("bad_aspect_ratio", f"image of size {width}x{height} has no pixels")
    try:
        return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:  # smart_resize's only ValueError is the aspect-ratio check
        raise DataError("bad_aspect_ratio", f"{width}x{height}: {e}") from e


def processor_budgets(
    *,
    patch_size: int,
    image_merge_size: int,
    video_merge_size: int,
    max_visual_tokens: int,
    min_tokens_per_item: int,
    max_tokens_per_item: int,
) -> dict[str, int]:
    """Pixel budgets of the stage's processor (``build_processor``'s keywords): an image gets up to
    ``min(max_visual_tokens, max_tokens_per_item)`` tokens, a video ``max_visual_tokens`` over all its frames (the
    video processor divides its pixel budget by the frame count), each item at least ``min_tokens_per_item``."""
    fi = (patch_size * image_merge_size) ** 2
    fv = (patch_size * video_merge_size) ** 2
    return {
        "image_min_pixels": min_tokens_per_item * fi,
        "image_max_pixels": min(max_visual_tokens, max_tokens_per_item) * fi,
        "video_min_pixels": min_tokens_per_item * fv,
        "video_max_pixels": max_visual_tokens * fv,
    }


def processor_image_size(
    height: int, width: int, *, merge_size: int, budgets: dict[str, int], patch_size: int = 14
) -> tuple[int, int]:
    """What ``VideoLlama3ImageProcessor.resize`` picks for one image under ``budgets`` (:func:`processor_budgets`)."""
    return target_size_pixels(
        height,
        width,
        factor=patch_size * merge_size,
        min_pixels=budgets["image_min_pixels"],
        max_pixels=budgets["image_max_pixels"],
    )


def processor_frame_size(
    height: int,
    width: int,
    num_frames: int,
    *,
    merge_size: int,
    budgets: dict[str, int],
    patch_size: int = 14,
) -> tuple[int, int]:
    """What ``VideoLlama3VideoProcessor.resize`` picks for the frames of a ``num_frames``-frame video: its pixel
    budget divided by the frame count (integer division, in pixels); the minimum is not divided."""
    return target_size_pixels(
        height,
        width,
        factor=patch_size * merge_size,
        min_pixels=budgets["video_min_pixels"],
        max_pixels=budgets["video_max_pixels"] // max(1, num_frames),
    )


def resize_and_normalize(
    frames: torch.Tensor,
    size: tuple[int, int],
    *,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """Resize uint8 frames to ``size = (height, width)`` and normalise them.

    Args:
        frames: uint8 ``(N, 3, H, W)``.
    Returns:
        float32 ``(N, 3, height, width)``, ``(x / 255 - mean) / std``.

    The same operations as transformers' torchvision backend, in the same order: bicubic with antialias on the
    uint8 tensor (so rounding to uint8 happens as there), then rescale and normalise fused into one ``normalize``
    with mean and std multiplied by 255.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) frames, got {frames.dtype} {tuple(frames.shape)}")
    if tuple(frames.shape[-2:]) != tuple(size):
        frames = tvF.resize(frames, list(size), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    # transformers fuses rescale_factor=1/255 this way; keep its exact float values
    scale = 1.0 / (1.0 / 255.0)
    mean_t = torch.tensor(mean) * scale
    std_t = torch.tensor(std) * scale
    return tvF.normalize(frames.to(torch.float32), mean_t, std_t)


def normalized_patches(
    frames: torch.Tensor,
    size: tuple[int, int],
    *,
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.5, 0.5, 0.5),
    patch_size: int = 14,
    merge_size: int = 1,
    chunk: int = 8,
) -> torch.Tensor:
    """``patchify(resize_and_normalize(frames, size, ...))``, bit for bit, with no second float copy.

    The float32 output is allocated once and filled ``chunk`` frames at a time: each chunk is resized (uint8, per
    frame as in the batched call), put in patch order (uint8), converted into its rows of the output and
    normalised there in place. Normalising is per element with one mean and std per channel, so doing it after
    the reordering changes no value. The two-step form holds the normalised frames, their float copy and their
    patch-ordered copy at once: ~2 float copies of the output more at its peak (measured for a 20-min 360p clip
    at 180 frames in BENCHMARKS.md, B1).

    Args:
        frames: uint8 ``(N, 3, H, W)``, any strides (a permuted view of decoded ``(N, H, W, 3)`` frames is fine).
    Returns:
        float32 ``(N * gh * gw, 3 * patch * patch)`` as :func:`patchify` returns.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) frames, got {frames.dtype} {tuple(frames.shape)}")
    n, c = frames.shape[:2]
    h, w = size
    per_frame = (h // patch_size) * (w // patch_size)
    out = torch.empty((n * per_frame, c * patch_size * patch_size), dtype=torch.float32)
    scale = 1.0 / (1.0 / 255.0)  # as resize_and_normalize: transformers' fused rescale, exact float values
    mean_t = (torch.tensor(mean) * scale).to(torch.float32).view(1, -1, 1)
    std_t = (torch.tensor(std) * scale).to(torch.float32).view(1, -1, 1)
    for a in range(0, n, chunk):
        part = frames[a : a + chunk]
        if tuple(part.shape[-2:]) != (h, w):
            part = tvF.resize(part, [h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        rows = out[a * per_frame : (a + len(part)) * per_frame]
        rows.copy_(patchify(part, patch_size=patch_size, merge_size=merge_size))  # uint8 -> float32 in place
        # what tvF.normalize does (on a clone), in place on (patches, C, patch * patch) channel-major rows
        rows.view(rows.shape[0], c, -1).sub_(mean_t).div_(std_t)
    return out


def patchify(frames: torch.Tensor, *, patch_size: int = 14, merge_size: int = 1) -> torch.Tensor:
    """Cut frames into patch rows, block-major, as the vision tower expects.

    Args:
        frames: float ``(T, C, H, W)`` with H, W multiples of ``patch_size * merge_size``.
    Returns:
        ``(T * gh * gw, C * patch * patch)`` with ``gh = H / patch``: frame by frame, raster over ``merge x merge``
        blocks, then raster inside a block; each row is one patch flattened as ``(C, 1, patch, patch)`` (temporal
        patch 1), i.e. 588 values for RGB and 14-pixel patches.
    """
    t, c, h, w = frames.shape
    factor = patch_size * merge_size
    if h % factor or w % factor:
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch*merge = {factor}")
    gh, gw = h // patch_size, w // patch_size
    x = frames.reshape(
        t, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    # -> (t, block_row, block_col, row_in_block, col_in_block, c, py, px)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)
    return x.reshape(t * gh * gw, c * patch_size * patch_size)


def tokens_per_frame(grid_thw: torch.Tensor, merge_sizes: torch.Tensor) -> list[int]:
    """LLM tokens of one frame of each item: ``h * w / m**2`` for rows of ``grid_thw (n, 3)``."""
    return [merged_tokens(1, h, w, m) for (_, h, w), m in zip(grid_thw.tolist(), merge_sizes.tolist())]


def compression_mask(
    pixel_values_videos: torch.Tensor,
    grid_thw: torch.Tensor,
    merge_sizes: torch.Tensor,
    threshold: float = 0.1,
    min_tokens: int = 1,
) -> torch.Tensor:
    """Differential frame pruning (DiffFP): which merged video tokens to keep.

    Args:
        pixel_values_videos: ``(sum t*h*w, C*p*p)`` normalised patch rows, block-major.
        grid_thw: ``(n_videos, 3)`` in patches; merge_sizes: ``(n_videos,)``.
    Returns:
        bool ``(sum t*h*w / m**2,)``. For a video with ``t > 1``: frame 0 is kept whole; a merged token of frame i
        is kept when ``mean|x_i - x_{i-1}| * 255 > threshold`` over its ``m*m`` patches; a frame with fewer than
        ``min_tokens`` kept tokens keeps its first ``min_tokens``. ``t == 1`` keeps everything.

    Same rule as ``VideoLlama3VideoProcessor._get_compression_mask``, with ``threshold`` configurable.
    """
    sizes = grid_thw.prod(dim=1).tolist()
    masks = []
    for rows, (t, h, w), m in zip(
        pixel_values_videos.split(sizes, dim=0), grid_thw.tolist(), merge_sizes.tolist()
    ):
        per_frame = merged_tokens(1, h, w, m)
        if t == 1:
            masks.append(torch.ones(per_frame, dtype=torch.bool))
            continue
        # block-major rows: the m*m patches of one merged token are consecutive, so a view groups them
        tok = rows.view(t, per_frame, -1)
        diff = (tok[1:] - tok[:-1]).abs().mean(dim=-1) * 255
        keep = torch.cat([torch.ones(1, per_frame, dtype=torch.bool), diff > threshold], dim=0)
        starved = keep.sum(dim=1) < min_tokens
        keep[starved, :min_tokens] = True
        masks.append(keep.flatten())
    if not masks:
        return torch.zeros(0, dtype=torch.bool)
    return torch.cat(masks)

"""The data configs: which annotation files (``DataConfig``, ``DatasetConfig``), how a record becomes a sample
(``EncodeConfig``, per stage), and how samples are packed and loaded."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncodeConfig:
    # --- vision -------------------------------------------------------------------------------------------
    patch_size: int = 14
    image_merge_size: int = 1  # stage 1-3: 1, stage 4: 2
    video_merge_size: int = 2
    max_visual_tokens: int = 10240  # LLM visual tokens per sample, shared over all its images and frames
    min_tokens_per_item: int = 16  # LLM tokens at least per image / per video frame
    max_tokens_per_item: int = 16384  # LLM tokens at most per image / per video frame
    max_image_pixels: int = 178_956_970  # decompression-bomb guard (Pillow's default limit), in source pixels
    # --- video ----------------------------------------------------------------------------------------------
    fps: float = 1.0  # frames sampled per second of video
    max_frames: int = 180  # cap, evenly spaced
    min_frames: int = 4
    use_token_compression: bool = False  # differential frame pruning (stages 3-4)
    compression_threshold: float = 0.1  # keep a merged token when mean|x_i - x_{i-1}| * 255 > threshold
    decode_scale: bool = (
        True  # let FFmpeg's scaler shrink frames at decode (False: native size, exact parity)
    )
    frame_cache_dir: str | None = (
        None  # directory written by `prepare`; read instead of decoding when present
    )
    # --- text -----------------------------------------------------------------------------------------------
    max_length: int = 16384  # tokens per sample, visual tokens included
    length_policy: str = (
        "rebudget"  # over max_length: "rebudget" (shrink visual budget, else drop), "drop", "truncate"
    )
    system_prompt: str | None = None  # used when a record has none

    def __post_init__(self):
        if self.image_merge_size not in (1, 2) or self.video_merge_size not in (1, 2):
            raise ValueError("merge sizes must be 1 or 2")
        if self.length_policy not in ("rebudget", "drop", "truncate"):
            raise ValueError(f"length_policy must be rebudget, drop or truncate, got {self.length_policy!r}")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.min_tokens_per_item < 1 or self.max_tokens_per_item < self.min_tokens_per_item:
            raise ValueError("need 1 <= min_tokens_per_item <= max_tokens_per_item")


@dataclass
class DatasetConfig:
    path: str = "???"  # annotation file: JSON list or JSONL, official or chat-messages schema
    root: str | None = (
        None  # media root the record paths are relative to; None = the annotation file's folder
    )
    weight: float | None = None  # share of the epoch's samples (0 < weight <= 1); excludes `repeat`
    repeat: int | None = None  # whole copies per epoch; None with no weight = once
    max_samples: int | None = None  # cap on records used (a seeded subset)


@dataclass
class DataConfig:
    name: str = "file"  # label of the mixture (logs)
    path: str | None = None  # shorthand for a one-dataset mixture (data=file data.path=... data.root=...)
    root: str | None = None  # media root of `path`
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)  # named datasets of a mixture
    heldout_path: str | None = None  # held-out annotations (loss + generation accuracy), optional
    heldout_root: str | None = None  # media root of heldout_path; None = its folder
    heldout_max_samples: int = 64  # held-out records evaluated per evaluation
    max_tokens: int = 16384  # packing budget: tokens per micro-batch (one packed row)
    max_patches: int = 65536  # packing budget: vision-tower patches per micro-batch
    buffer_size: int = 2048  # samples per shuffle buffer of the best-fit-decreasing packer
    seed: int = 0  # mixture and packing order (same seed -> same micro-batches)
    num_workers: int = 2  # decoding worker processes per rank (0 = in the main process)
    prefetch_factor: int = 2  # micro-batches prefetched per worker
    cost_workers: int = 2  # processes of the cost pre-pass
    cost_cache: bool = True  # cache the cost table beside the annotations (keyed by file and encode config)
    max_bad_fraction: float = 0.01  # abort when more than this fraction of samples fail to decode

    def __post_init__(self):
        if self.path is None and not self.datasets:
            raise ValueError("no data: set data.path (and data.root) or data.datasets")
        if self.max_tokens < 16 or self.max_patches < 4:
            raise ValueError("data.max_tokens / data.max_patches are far too small")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    def dataset_dict(self) -> dict[str, DatasetConfig]:
        """All datasets of the mixture, the `path` shorthand included (as dataset 'main')."""
        out = dict(self.datasets)
        if self.path is not None:
            out = {"main": DatasetConfig(path=self.path, root=self.root), **out}
        return out

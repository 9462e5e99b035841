"""The knobs that turn one annotation record into one sample, per stage (REFERENCE §2-3)."""

from __future__ import annotations

from dataclasses import dataclass


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

"""The data configs: which annotation files (``DataConfig``, ``DatasetConfig``), how a record becomes a sample
(``EncodeConfig``, per stage), and how samples are packed and loaded.

Every field carries its unit and meaning in the comment on its own line (``scripts/gen_config_doc.py`` turns
them into ``docs/config.md``). Checks of one config run in ``__post_init__``; checks across configs in
:func:`check_data_and_encode` (``DataConfig.validate_against``); ``DataConfig.check_paths`` looks at the disk.
All three run at start, before any model is built or any record is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EncodeConfig:
    # --- vision -------------------------------------------------------------------------------------------
    patch_size: int = 14  # pixels per side of one vision-tower patch
    image_merge_size: int = 1  # patches merged per side into one LLM token, images (stage 1-3: 1, stage 4: 2)
    video_merge_size: int = 2  # patches merged per side into one LLM token, video frames
    # LLM visual tokens per image, and per video over all its frames (the processor's budgets); a sample whose
    # items exceed it together shares it equally over all its images and frames instead
    max_visual_tokens: int = 10240
    min_tokens_per_item: int = 16  # LLM tokens at least per image / per video frame
    max_tokens_per_item: int = 16384  # LLM tokens at most per image / per video frame
    max_image_pixels: int = 178_956_970  # decompression-bomb guard (Pillow's default limit), in source pixels
    # --- video ----------------------------------------------------------------------------------------------
    fps: float = 1.0  # frames sampled per second of video
    max_frames: int = 180  # frames per video at most, evenly spaced over the clip when over the cap
    min_frames: int = 4  # frames per video at least (short clips are sampled faster)
    # frames per second of the source assigned to a frame folder (file i shown at i / rate; the official code's 3);
    # data.datasets.<name>.frame_folder_fps overrides it per dataset; this value serves data.path and held-out data
    frame_folder_fps: float = 3.0
    # frames per second assigned to GIFs instead of their own frame delays (the official code's is 25); None = the
    # file's own timing; data.datasets.<name>.gif_fps overrides it per dataset
    gif_fps: float | None = None
    use_token_compression: bool = False  # differential frame pruning (stages 3-4)
    compression_threshold: float = 0.1  # keep a merged token when mean|x_i - x_{i-1}| * 255 > threshold
    # opt-in, approximate: where the target is under half the native size, FFmpeg's bicubic scaler shrinks
    # frames while converting them, before the exact resize (B1: -4% to +17% speed, within noise). Pixels
    # then differ from the processor's at inference by up to 1.1 (mean 0.04-0.07) in normalised units, and
    # with pruning on a token can flip between kept and dropped (1 in 1,008 measured), changing input_ids.
    # False (default): exactly the processor's pixels
    decode_scale: bool = False
    # directory written by `prepare`; read instead of decoding when present
    frame_cache_dir: str | None = None
    # follow symlinks inside a media root (copied from data.follow_symlinks at start, which is the key to set)
    follow_symlinks: bool = True
    # --- text -----------------------------------------------------------------------------------------------
    max_length: int = 16384  # tokens per sample, visual tokens included
    length_policy: str = "rebudget"  # over max_length: rebudget (shrink visuals, else drop), drop, truncate
    system_prompt: str | None = None  # system turn added to a record that has none (None: add nothing)

    def __post_init__(self):
        if self.image_merge_size not in (1, 2) or self.video_merge_size not in (1, 2):
            raise ValueError("merge sizes must be 1 or 2")
        if self.length_policy not in ("rebudget", "drop", "truncate"):
            raise ValueError(f"length_policy must be rebudget, drop or truncate, got {self.length_policy!r}")
        if self.min_frames < 1 or self.max_frames < self.min_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.frame_folder_fps <= 0 or (self.gif_fps is not None and self.gif_fps <= 0):
            raise ValueError(
                f"frame_folder_fps / gif_fps must be positive, got {self.frame_folder_fps} / {self.gif_fps}"
            )
        if self.min_tokens_per_item < 1 or self.max_tokens_per_item < self.min_tokens_per_item:
            raise ValueError("need 1 <= min_tokens_per_item <= max_tokens_per_item")


@dataclass
class DatasetConfig:
    """One dataset of a mixture, as configured and as the packer (``mixture.plan_mixture``) takes it.

    ``weight`` and ``repeat`` exclude each other; with neither the dataset is used once per epoch. Checked
    here, at config time, so a bad mixture stops the run before the cost pre-pass.
    """

    name: str = ""  # label in logs and reports; filled from the key of data.datasets (leave it unset in YAML)
    path: str = "???"  # annotation file: JSON list or JSONL, official or chat-messages schema
    # media root the record paths are relative to; None = the annotation file's folder
    root: str | None = None
    weight: float | None = None  # share of the epoch's samples (0 < weight <= 1); excludes `repeat`
    repeat: int | None = None  # whole copies of the dataset per epoch (>= 1); None with no weight = once
    max_samples: int | None = None  # records used at most (>= 1): a seeded subset, the same every epoch
    frame_folder_fps: float | None = None  # frames/s of its frame folders; None = encode.frame_folder_fps
    gif_fps: float | None = None  # frames/s assigned to its GIFs; None = encode.gif_fps

    def __post_init__(self):
        # Hydra builds a dataset before the mixture that names it, so the name may still be empty here
        where = f"data.datasets.{self.name}" if self.name else "a dataset of data.datasets"
        if self.weight is not None and self.repeat is not None:
            raise ValueError(f"{where}: give weight or repeat, not both")
        if self.weight is not None and not 0 < self.weight <= 1:
            raise ValueError(f"{where}: weight must be in (0, 1], got {self.weight}")
        if self.repeat is not None and self.repeat < 1:
            raise ValueError(f"{where}: repeat must be >= 1, got {self.repeat}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"{where}: max_samples must be >= 1, got {self.max_samples}")
        for key in ("frame_folder_fps", "gif_fps"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{where}: {key} must be positive, got {value}")

    def encode_config(self, encode: EncodeConfig) -> EncodeConfig:
        """``encode`` with this dataset's media clocks (``frame_folder_fps``, ``gif_fps``) where it sets them: the
        config its records are costed and encoded under (the cost cache is keyed on it, so changing a clock
        re-costs the dataset)."""
        changes = {
            k: getattr(self, k) for k in ("frame_folder_fps", "gif_fps") if getattr(self, k) is not None
        }
        return dataclasses.replace(encode, **changes) if changes else encode

    def resolved(self, name: str | None = None) -> DatasetConfig:
        """A copy named ``name`` (default: its own) with ``root`` set: ``root``, else the annotation file's
        folder."""
        root = self.root if self.root is not None else str(Path(self.path).parent)
        return dataclasses.replace(self, name=name if name is not None else self.name, root=str(root))


@dataclass
class DataConfig:
    name: str = "file"  # label of the mixture (logs)
    path: str | None = None  # shorthand for a one-dataset mixture named 'main' (data=file data.path=...)
    root: str | None = None  # media root of `path`; None = its folder
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)  # named datasets of a mixture
    heldout_path: str | None = None  # held-out annotations (loss + generation accuracy), optional
    heldout_root: str | None = None  # media root of heldout_path; None = its folder
    heldout_max_samples: int = 64  # held-out records evaluated per evaluation
    max_tokens: int = 16384  # packing budget: LLM tokens per micro-batch (one packed row)
    max_patches: int = 65536  # packing budget: vision-tower patches per micro-batch
    # packing budget: predicted activation memory of one packed row in GB (1e9 bytes; data/cost_model.py
    # ActivationModel, docs/packing.md "Memory"); a sample over it alone is reported oversized. None = derived from
    # the model's dimensions, trainer.gradient_checkpointing and the backend: an 80 GB device less 10% and the
    # model states of one rank (18 bytes per parameter, sharded as the backend shards them); 0 = no bound
    max_activation_gb: float | None = None
    buffer_size: int = 2048  # samples per shuffle buffer of the best-fit-decreasing packer
    seed: int = 0  # mixture and packing order (same seed -> same micro-batches)
    num_workers: int = 2  # decoding worker processes per rank (0 = in the main process)
    prefetch_factor: int = 2  # micro-batches prefetched per worker
    cost_workers: int = 2  # processes of the cost pre-pass (0 or 1 = in the main process)
    cost_cache: bool = True  # cache the cost table (keyed by annotation file, encode config, tokenizer)
    # folder of the cost tables (train, doctor, prepare); None = beside the annotations, or the run directory when
    # the annotations' folder is read-only
    cost_cache_dir: str | None = None
    max_bad_fraction: float = 0.01  # abort when more than this fraction of samples fail to decode
    # follow symlinks that exist inside a media root wherever they point (a shared dataset folder linked into the
    # root is the dataset owner's choice); paths written in annotations still may not leave the root (`..`, an
    # absolute path elsewhere). False: a path whose links resolve outside the root is refused too
    follow_symlinks: bool = True

    def __post_init__(self):
        if self.path is None and not self.datasets:
            raise ValueError("no data: set data.path (and data.root) or data.datasets")
        if self.max_tokens < 16 or self.max_patches < 4:
            raise ValueError("data.max_tokens / data.max_patches are far too small")
        if self.max_activation_gb is not None and not self.max_activation_gb >= 0:
            raise ValueError(
                f"data.max_activation_gb must be >= 0 GB (0 = no bound) or None (derived), got {self.max_activation_gb}"
            )
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        for key, d in self.datasets.items():
            d.name = d.name or key

    def dataset_dict(self) -> dict[str, DatasetConfig]:
        """All datasets of the mixture as configured, the `path` shorthand included (as dataset 'main')."""
        out = dict(self.datasets)
        if self.path is not None:
            out = {"main": DatasetConfig(name="main", path=self.path, root=self.root), **out}
        return out

    def resolved_datasets(self) -> dict[str, DatasetConfig]:
        """name -> :class:`DatasetConfig` named by its key, with its media root resolved (see
        ``DatasetConfig.resolved``): what the cost pass, the packer and the loader take."""
        return {name: d.resolved(name) for name, d in self.dataset_dict().items()}

    def check_paths(self) -> None:
        """Raise ``FileNotFoundError`` naming the dataset, the config key and the path when an annotation file
        is missing or a media root is not a directory (the held-out set included). Cheap: call it at start."""
        for name, d in self.resolved_datasets().items():
            key = "data" if name == "main" and self.path is not None else f"data.datasets.{name}"
            if not Path(d.path).is_file():
                raise FileNotFoundError(
                    f"{key}.path: annotation file of dataset {name!r} not found: {d.path}"
                )
            if not Path(d.root).is_dir():
                raise FileNotFoundError(
                    f"{key}.root: media root of dataset {name!r} is not a directory: {d.root}"
                )
        if self.heldout_path:
            if not Path(self.heldout_path).is_file():
                raise FileNotFoundError(
                    f"data.heldout_path: held-out annotation file not found: {self.heldout_path}"
                )
            root = self.heldout_root or str(Path(self.heldout_path).parent)
            if not Path(root).is_dir():
                raise FileNotFoundError(
                    f"data.heldout_root: media root of the held-out set is not a directory: {root}"
                )

    def validate_against(self, encode: EncodeConfig, sequence_parallel: int = 1) -> None:
        """Cross-field checks of this data config with the stage's encode config: see
        :func:`check_data_and_encode`."""
        check_data_and_encode(self, encode, sequence_parallel)


def check_data_and_encode(data: DataConfig, encode: EncodeConfig, sequence_parallel: int = 1) -> None:
    """Raise ``ValueError`` naming both keys when a sample the encode config allows cannot fit a micro-batch.

    With ``trainer.sequence_parallel=N`` a micro-batch is one row of a group of N ranks: ``N`` times the budgets.

    * ``encode.max_length`` (tokens of one sample) must not exceed ``data.max_tokens`` (tokens of one packed
      row): else every sample between the two is left out of the packing, which used to surface only as a
      warning after the cost pre-pass.
    * a sample at its visual budget, ``encode.max_visual_tokens`` LLM tokens of ``merge x merge`` patches
      each, must fit ``data.max_patches`` for both image and video merge sizes (a one-video sample reaches its
      budget as soon as the video has enough frames). The budget is what the encoder aims for, not a hard
      maximum (``min_tokens_per_item`` per item wins, sizes round to the patch grid), so this catches
      inconsistent configs, not every oversized sample: those are still counted and reported by the packer.
    """
    n = sequence_parallel
    group = f" x trainer.sequence_parallel={n}" if n > 1 else ""
    if encode.max_length > data.max_tokens * n:
        raise ValueError(
            f"encode.max_length={encode.max_length} tokens per sample > data.max_tokens={data.max_tokens}{group} "
            "tokens per micro-batch: longer samples could never be packed; lower encode.max_length or raise "
            "data.max_tokens"
        )
    for kind, merge in (("image", encode.image_merge_size), ("video", encode.video_merge_size)):
        patches = encode.max_visual_tokens * merge * merge
        if patches > data.max_patches * n:
            raise ValueError(
                f"an {kind} sample at its visual budget has encode.max_visual_tokens="
                f"{encode.max_visual_tokens} tokens x encode.{kind}_merge_size={merge}^2 = {patches} patches > "
                f"data.max_patches={data.max_patches}{group} patches per micro-batch; lower encode.max_visual_tokens "
                "or raise data.max_patches"
            )

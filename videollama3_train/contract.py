"""What ``model/``, ``data/`` and ``trainer/`` agree on, in one place with no dependencies.

The data pipeline produces batches, the model consumes them and the trainer carries them between the two; none of
the three imports another for these facts. A batch (one packed row, see ``data/collate.py``) is a dict whose keys
are named here; the loader the trainer drives follows :class:`Loader`.

Reference: the forward signature of transformers' ``VideoLlama3ForConditionalGeneration`` (5.17-5.24).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# Label value that carries no loss (the convention of PyTorch's cross-entropy and of transformers).
IGNORE_INDEX = -100

# The four stages of the paper (arXiv 2501.13106 §3), in training order.
STAGES = ("encoder_adaptation", "alignment", "multitask_sft", "video_finetune")

# Visual forward kwargs of the model, per modality: (pixels, grid (n, 3) of t/h/w patches, merge size per item).
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_merge_sizes")
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "video_merge_sizes", "video_compression_mask")
VISUAL_KEYS = IMAGE_KEYS + VIDEO_KEYS
# The vision tower's inputs per modality (the compression mask is applied after the tower, in the LLM).
TOWER_INPUTS = {"image": IMAGE_KEYS, "video": VIDEO_KEYS[:3]}
# Keys of a collated batch that are model forward kwargs (visual ones only when present). ``cu_seqlens`` and
# ``max_seqlen`` are deliberately absent: the vision tower would read a ``cu_seqlens`` kwarg as its own segment
# table.
FORWARD_KEYS = ("input_ids", "labels", "position_ids", "attention_mask") + VISUAL_KEYS
# Marker key of a micro-batch whose samples all failed to encode (the loader counted them).
EMPTY_KEY = "empty"


def merged_tokens(t: int, h: int, w: int, merge: int) -> int:
    """LLM tokens of one visual item: ``t*h*w`` patches merged ``merge x merge`` (before compression)."""
    return int(t) * int(h) * int(w) // (int(merge) * int(merge))


def merged_token_counts(grid_thw: Any, merge_sizes: Any) -> list[int]:
    """:func:`merged_tokens` of every item of a ``(n, 3)`` grid with its ``(n,)`` merge sizes (tensors or lists)."""
    grid = grid_thw.tolist() if hasattr(grid_thw, "tolist") else list(grid_thw)
    merges = merge_sizes.tolist() if hasattr(merge_sizes, "tolist") else list(merge_sizes)
    if len(grid) != len(merges):
        raise ValueError(
            f"every item of the grid needs a merge size (got {len(merges)} for {len(grid)} items)"
        )
    return [merged_tokens(t, h, w, m) for (t, h, w), m in zip(grid, merges, strict=True)]


def forward_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's forward kwargs of a collated batch (drops ``cu_seqlens``, ``max_seqlen``, ``meta``...)."""
    return {k: batch[k] for k in FORWARD_KEYS if k in batch}


def is_empty(batch: Mapping[str, Any]) -> bool:
    """True for the marker of a micro-batch whose samples all failed to encode."""
    return bool(batch.get(EMPTY_KEY, False))


@dataclass(frozen=True)
class ParallelDims:
    """How a run's ranks divide the work, decided once (by the stage runner, from the launcher's world and
    ``trainer.sequence_parallel``) and handed to the data build and to the loop.

    The world is cut into consecutive sequence-parallel groups of ``sp_size`` ranks: ranks
    ``[sp_group * sp_size, (sp_group + 1) * sp_size)`` share each packed row (Ulysses: each runs ``1 / sp_size`` of
    its tokens and of its frames). The groups are the data-parallel replicas: the loader deals rows to
    ``dp_size`` of them, and group ``dp_rank`` gets its own rows, ``sp_size`` times the per-rank token and patch
    budgets. ``sp_size = 1``: plain data parallel, every rank its own replica.
    """

    world_size: int = 1
    rank: int = 0  # of this process in the world
    sp_size: int = 1  # ranks sharing each row (trainer.sequence_parallel)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world_size} processes")
        if self.sp_size < 1 or self.world_size % self.sp_size:
            raise ValueError(
                f"trainer.sequence_parallel={self.sp_size} must divide the number of processes ({self.world_size})"
            )

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the sequence-parallel groups of the world."""
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        """This rank's replica (its group's index): the rank its loader deals rows to."""
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        """This rank's place within its sequence-parallel group."""
        return self.rank % self.sp_size

    @property
    def sp_enabled(self) -> bool:
        return self.sp_size > 1

    def sp_groups(self) -> list[list[int]]:
        """The ranks of every sequence-parallel group, in group order."""
        return [list(range(s, s + self.sp_size)) for s in range(0, self.world_size, self.sp_size)]


@runtime_checkable
class Loader(Protocol):
    """What the trainer needs of a loader: packed micro-batches of this rank, resumable.

    ``micro_batches_per_epoch(e)`` says how many micro-batches epoch ``e`` yields on every rank (packing plans differ
    a little per epoch); ``set_epoch(e)`` restarts at the beginning of epoch ``e``; ``state_dict`` /
    ``load_state_dict`` save and restore the position (plain dicts); ``skipped`` counts samples dropped for bad
    data by reason; ``token_budget`` is the tokens of one packed row (for the packing fill metric).
    """

    token_budget: int

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def micro_batches_per_epoch(self, epoch: int) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    def skipped(self) -> dict[str, int]: ...


class ListLoader:
    """A :class:`Loader` over a fixed list of micro-batches (the same every epoch): for tests and benchmarks."""

    def __init__(self, micro_batches: Sequence[dict[str, Any]], token_budget: int = 0):
        self.micro_batches = list(micro_batches)
        self.token_budget = token_budget
        self._epoch, self._pos = 0, 0

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self._pos < len(self.micro_batches):
            self._pos += 1
            yield self.micro_batches[self._pos - 1]

    def micro_batches_per_epoch(self, epoch: int) -> int:  # noqa: ARG002 - same every epoch
        return len(self.micro_batches)

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._pos = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])

    @property
    def skipped(self) -> dict[str, int]:
        return {}


def as_loader(loader: Iterable | Loader) -> Loader:
    """``loader`` itself when it follows :class:`Loader`, else a :class:`ListLoader` over its micro-batches."""
    if isinstance(loader, Loader):
        return loader
    return ListLoader(list(loader), token_budget=int(getattr(loader, "token_budget", 0) or 0))

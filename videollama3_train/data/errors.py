"""One exception type for every bad input, carrying what a user needs to find it, and one for data that cannot
train as a whole."""

from __future__ import annotations


class DataError(ValueError):
    """A record that cannot be turned into a sample.

    ``reason`` is a short stable slug (``missing_file``, ``empty_file``, ``corrupt_image``, ``corrupt_video``,
    ``no_video_stream``, ``no_frames``, ``placeholder_mismatch``, ``empty_assistant``, ``unknown_role``,
    ``path_escapes_root``, ``image_too_large``, ``bad_aspect_ratio``, ``too_long``, ``bad_schema``, ``bad_text``,
    ``unsupported_streaming``, ``unsupported_image_folder``)
    used for skip counters and the doctor's report.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        dataset: str | None = None,
        index: int | None = None,
        path: str | None = None,
    ):
        self.reason = reason
        self.message = message
        self.dataset = dataset
        self.index = index
        self.path = path
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.dataset:
            where.append(f"dataset {self.dataset!r}")
        if self.index is not None and self.index >= 0:
            where.append(f"record {self.index}")
        if self.path:
            where.append(f"file {self.path}")
        prefix = f"[{self.reason}] " + (", ".join(where) + ": " if where else "")
        return prefix + self.message

    def locate(self, *, dataset: str | None = None, index: int | None = None) -> DataError:
        """Fill in dataset/record when the error was raised below the level that knows them."""
        if dataset is not None and not self.dataset:
            self.dataset = dataset
        if index is not None and (self.index is None or self.index < 0):
            self.index = index
        self.args = (self._render(),)
        return self

    def __reduce__(self):  # picklable across DataLoader workers
        return (_rebuild, (self.reason, self.message, self.dataset, self.index, self.path))


class UnusableDataError(RuntimeError):
    """The data as a whole cannot train: a dataset's share of unusable records is above ``data.max_bad_fraction``,
    or the packing plan has no optimizer step. A user's data to fix, not a bug: the command says it in one line."""


def _rebuild(reason, message, dataset, index, path):
    return DataError(reason, message, dataset=dataset, index=index, path=path)

"""One process pool with a progress bar, for the passes that touch every record or video once: the cost pre-pass
(``costs.compute_costs``), the frame cache (``frame_cache.build_frame_cache``) and the doctor's scan.

Why processes and not threads: each item is CPU work in Python (JSON, tokenising, PyAV demuxing, JPEG encoding)
that holds the GIL. Why an initializer: the large, read-only state of a pass (a memory-mapped dataset, the
processor) is sent to each worker once instead of being pickled with every item.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

__all__ = ["parallel_map"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class _Named:
    """``fn`` that names the item it failed on: the exception keeps its type (callers catch it by type), with
    a note, since a traceback from a worker process otherwise says nothing about which item broke."""

    def __init__(self, fn: Callable[[Any], Any], desc: str):
        self.fn, self.desc = fn, desc

    def __call__(self, item: Any) -> Any:
        try:
            return self.fn(item)
        except Exception as e:
            note = f"{self.desc}: {getattr(self.fn, '__name__', self.fn)!s:.80} failed on item {item!r:.200}"
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(note)
            else:
                logger.error(note)
            raise


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    desc: str,
    progress: bool = True,
    unit: str = "it",
    weight: Callable[[T], int] | None = None,
    on_result: Callable[[R], Mapping[str, Any] | None] | None = None,
    initializer: Callable[..., None] | None = None,
    initargs: Sequence[Any] = (),
    chunksize: int = 1,
) -> list[R]:
    """``[fn(item) for item in items]``, in ``workers`` processes, in order, with a tqdm bar.

    workers: processes; ``<= 1`` (or a single item) runs inline in this process (easier to debug, and no pool to
        start for a small job), after calling ``initializer(*initargs)`` here.
    desc, unit, progress: the bar's label and unit; ``progress=False`` hides it (e.g. on ranks other than 0).
    weight: bar units per item (e.g. the records of a range of records); default 1.
    on_result: called here, in order, with each result as it arrives; a mapping it returns is shown after the bar
        (e.g. a running failure count).
    initializer, initargs: run once per worker process (see the module docstring).
    chunksize: items per task sent to a worker; keep 1 when items are already coarse (ranges, whole videos).
    ``fn``, the items and ``initargs`` must be picklable when ``workers > 1``. An exception of ``fn`` propagates with
    its own type, carrying a note that names the item; queued items are cancelled first.
    """
    items = list(items)
    weights = [1] * len(items) if weight is None else [int(weight(it)) for it in items]
    call = _Named(fn, desc)

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(weights), desc=desc, unit=unit, mininterval=1.0, disable=not progress)
    out: list[R] = []

    def absorb(result: R) -> None:
        out.append(result)
        bar.update(weights[len(out) - 1])
        if on_result is not None:
            postfix = on_result(result)
            if postfix:
                bar.set_postfix(postfix, refresh=False)

    try:
        if workers <= 1 or len(items) <= 1:
            if initializer is not None:
                initializer(*initargs)
            for item in items:
                absorb(call(item))
        else:
            pool = ProcessPoolExecutor(workers, initializer=initializer, initargs=tuple(initargs))
            try:
                for result in pool.map(call, items, chunksize=chunksize):
                    absorb(result)
            finally:
                # after an error, drop the queued items instead of waiting for the whole pass to finish
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return out

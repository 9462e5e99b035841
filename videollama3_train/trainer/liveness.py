"""A lost rank ends the job promptly, with a message naming it; it never hangs the others.

Three pieces, all on the launcher's rendezvous store (``MASTER_ADDR:MASTER_PORT``: torchrun's agent store, or the
store rank 0 hosts under a plain ``env://`` launch):

* **the collective timeout** (``trainer.collective_timeout_s``) is set on the process group when the accelerator is
  built (``backend.build_accelerator``): a collective whose peer never arrives fails after it instead of waiting
  for ever. gloo does not even wait for it when the peer's process is gone: the survivor's next collective fails at
  once with "Connection closed by peer" (measured: 0.7 ms after a SIGKILL of the other rank).
* **a heartbeat**: every rank increments its counter in the store once a second from a daemon thread
  (:func:`start`). When a collective fails, :func:`guard` looks at which counters stopped and re-raises
  :class:`LostRankError` naming those ranks ("rank 1 of 2 stopped ...") rather than gloo's or NCCL's socket text.
* **rank-0-only work outside collectives** (:func:`main_only`): held-out evaluation and the export run on rank 0
  alone; the other ranks do not wait in a barrier (which would fail after the collective timeout, or hang without
  one) but poll the store for rank 0's "done", watching its heartbeat: an evaluation may take an hour, a dead
  rank 0 is noticed within ``MAIN_LOST_AFTER_S``.

Without a process group (one process) every function is a no-op.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

PREFIX = "videollama3/liveness"  # store keys: <PREFIX>/beat/<rank>, <PREFIX>/main/<n>
HEARTBEAT_S = 1.0  # seconds between two heartbeats of a rank
# a failed collective: heartbeats are sampled over this window; a rank whose counter did not move is lost (3
# missed beats: a live rank's daemon thread beats even while its main thread computes, the GIL is released by
# torch kernels and handed over every 5 ms otherwise)
PROBE_S = 3.5
# rank-0-only work: the others give up on rank 0 when its heartbeat has not moved for this long (generous: rank 0
# is busy then, but its heartbeat thread still runs)
MAIN_LOST_AFTER_S = 60.0
STORE_TIMEOUT_S = 30.0  # one store operation (connect, get, add)


class LostRankError(RuntimeError):
    """A collective failed because a rank stopped (its process died, its node or network went away)."""


class _State:
    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.calls = 0  # main_only blocks so far (every rank makes the same sequence of calls)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


_state: _State | None = None


def start() -> None:
    """Start this rank's heartbeat (after the process group exists; idempotent; no-op without one)."""
    global _state
    if _state is not None or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world == 1:
        return
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=STORE_TIMEOUT_S),
            wait_for_workers=False,
        )
    except (
        KeyError,
        ValueError,
        RuntimeError,
    ) as e:  # no env:// rendezvous: the collective timeout still holds
        log.warning(
            "no heartbeat (rendezvous store unreachable: %s); a lost rank is reported by its timeout", e
        )
        return
    _state = _State(store, dist.get_rank(), world)
    _beat(_state)
    _state.thread = threading.Thread(target=_beat_forever, args=(_state,), name="liveness", daemon=True)
    _state.thread.start()


def stop() -> None:
    """Stop the heartbeat and wait for its thread: before the process group is left at the end of a run, so no
    store call is in flight while the process tears down (an exit with a thread inside a C++ store call may abort)."""
    global _state
    if _state is not None:
        _state.stop.set()
        if _state.thread is not None:
            _state.thread.join(timeout=2 * HEARTBEAT_S)
        _state = None


def _beat(state: _State) -> None:
    state.store.add(f"{PREFIX}/beat/{state.rank}", 1)


def _beat_forever(state: _State) -> None:
    while not state.stop.wait(HEARTBEAT_S):
        try:
            _beat(state)
        except Exception:  # noqa: BLE001 - the store is gone (its host died): the collectives will say so
            return


def _counters(state: _State) -> list[int]:
    return [state.store.add(f"{PREFIX}/beat/{r}", 0) for r in range(state.world)]


def lost_ranks(window_s: float = PROBE_S) -> list[int] | None:
    """Ranks whose heartbeat did not move over ``window_s`` seconds; None when the store itself is unreachable
    (the host of the rendezvous store is gone: rank 0's under a plain launch, the launcher's under torchrun)."""
    state = _state
    if state is None:
        return []
    try:
        before = _counters(state)
        time.sleep(window_s)
        after = _counters(state)
    except Exception:  # noqa: BLE001 - any store failure means its host is unreachable
        return None
    return [r for r in range(state.world) if r != state.rank and after[r] == before[r]]


def describe(lost: list[int] | None, world: int, what: str, silent_s: float = PROBE_S) -> str:
    """The message of a lost rank: which one (None: the store's host), during what, what to do."""
    if lost is None:
        return (
            f"the rendezvous store (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, hosted by rank 0 or the launcher) "
            f"stopped answering during {what}: rank 0 of {world} (or the launcher) was lost; rerun the same "
            "command to resume from the newest checkpoint"
        )
    names = ", ".join(str(r) for r in lost)
    return (
        f"rank {names} of {world} stopped (no heartbeat for {silent_s:.0f}+ s: its process died or its node is "
        f"unreachable) during {what}; this rank stops too. Check rank {lost[0]}'s log for the cause, then rerun the "
        "same command to resume from the newest checkpoint"
    )


@contextmanager
def guard(what: str = "training") -> Iterator[None]:
    """Re-raise a failed collective as :class:`LostRankError` naming the lost rank(s) when some rank's heartbeat
    stopped; any other error (or none lost) goes through unchanged."""
    try:
        yield
    except LostRankError:
        raise
    except Exception as e:
        state = _state
        if state is None or not _looks_collective(e):
            raise
        lost = lost_ranks()
        if lost == []:
            raise
        message = describe(lost, state.world, what)
        log.error("%s (rank %d: %s)", message, state.rank, str(e).splitlines()[0][:300] if str(e) else e)
        # The failed stage's locals go now: its loader's worker processes ignore SIGTERM (preemption is the
        # trainer's), so multiprocessing's exit handler could not end them and the interpreter would wait on
        # them for ever; dropping the loader shuts them down. The traceback keeps its lines.
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise LostRankError(message) from e


def _looks_collective(e: BaseException) -> bool:
    """gloo, NCCL and the store raise RuntimeError (DistBackendError / DistNetworkError are subclasses)."""
    return isinstance(e, (RuntimeError, TimeoutError, ConnectionError))


@contextmanager
def main_only(what: str) -> Iterator[bool]:
    """Every rank enters, in the same order; the block's value is True on rank 0 alone, which does the work while
    the others wait at the end of the block outside any collective. They leave once rank 0 left the block, raise
    :class:`LostRankError` when its heartbeat stops for ``MAIN_LOST_AFTER_S`` or the store goes away, and
    ``RuntimeError`` when the block raised on rank 0.

        with main_only("the export") as main:
            if main:
                export(...)
    """
    state = _state
    if (
        state is None
    ):  # one process, or no store: rank 0 works, the others go on (a collective timeout bounds it)
        yield not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        return
    state.calls += 1
    key = f"{PREFIX}/main/{state.calls}"
    if state.rank != 0:
        yield False
        _wait_for_main(state, key, what)
        return
    try:
        yield True
    except BaseException as e:
        state.store.set(key, f"failed: {type(e).__name__}: {e}"[:500])
        raise
    state.store.set(key, "ok")


def _wait_for_main(state: _State, key: str, what: str) -> None:
    last, since = None, time.monotonic()
    while True:
        try:
            if state.store.check([key]):
                status = state.store.get(key).decode()
                if status != "ok":
                    raise RuntimeError(f"rank 0 failed during {what} ({status}); see rank 0's log")
                return
            beat = state.store.add(f"{PREFIX}/beat/0", 0)
        except RuntimeError as e:
            if "rank 0 failed" in str(e):
                raise
            raise LostRankError(describe(None, state.world, what)) from e
        now = time.monotonic()
        if beat != last:
            last, since = beat, now
        elif now - since > MAIN_LOST_AFTER_S:
            raise LostRankError(describe([0], state.world, what, MAIN_LOST_AFTER_S))
        time.sleep(0.2)

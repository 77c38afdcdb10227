"""Threads beside the model: a read-ahead, a worker a few items behind, and one background call.

On two cores the model keeps both busy most of the time; reading (GDAL), blending and writing
(numpy) release the GIL and run in these threads while the model runs. Each one hands its
errors back to the caller's thread, and none can wedge an interrupted run: every queue operation
is a single C call (``Handoff``), and every thread is a daemon.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Handoff:
    """A bounded queue between two threads that a KeyboardInterrupt cannot wedge.

    ``queue.Queue`` takes its lock in Python code: Ctrl-C or SIGTERM (raised as KeyboardInterrupt
    in the main thread) landing between the lock's acquire and release leaves it held, and the
    clean-up's next ``put`` or ``get`` then waits for ever. Here every operation is a single call
    into ``queue.SimpleQueue`` (C); the bound is a second SimpleQueue of free slots.
    """

    def __init__(self, depth: int) -> None:
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._slots: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, depth)):
            self._slots.put(None)

    def put(self, item: object, timeout: float | None = None) -> None:
        """Wait for a free slot (``queue.Empty`` after ``timeout`` seconds), then hand ``item`` over."""
        self._slots.get(timeout=timeout)
        self._items.put(item)

    def put_last(self, item: object) -> None:
        """Hand over an end marker without waiting for a slot (it never blocks)."""
        self._items.put(item)

    def get(self) -> object:
        item = self._items.get()
        self._slots.put(None)
        return item


def prefetch(gen: Iterator[T], depth: int) -> Iterator[T]:
    """Run ``gen`` in a background thread, ``depth`` items ahead (GDAL releases the GIL)."""
    if depth <= 0:
        yield from gen
        return
    q = Handoff(depth)
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Empty:  # no free slot yet
                        continue
                if stop.is_set():
                    return
            q.put_last(done)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put_last(exc)

    thread = threading.Thread(target=work, name="geoseg-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the reader notices within 0.1 s, even when no slot frees up
        thread.join(timeout=5.0)


class Behind:
    """Calls ``fn(item)`` for each ``put(item)`` in a background thread, at most ``depth`` items
    behind, so blending and writing overlap the next model call (numpy and GDAL release the GIL).
    The first error raised by ``fn`` is raised again by the next ``put`` or by ``close``."""

    def __init__(self, fn: Callable[[object], None], depth: int = 2) -> None:
        self._fn, self._error, self.busy_s = fn, None, 0.0
        self._q = Handoff(depth)
        self._thread = threading.Thread(target=self._work, name="geoseg-blender", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                t0 = time.perf_counter()
                try:
                    self._fn(item)
                except BaseException as exc:  # raised again in the caller's thread
                    self._error = exc
                self.busy_s += time.perf_counter() - t0

    def put(self, item: object) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(item)

    def close(self, *, raise_error: bool = True) -> None:
        """Wait for every item put so far; raise the first error (unless another one is already
        on its way up: ``raise_error=False``)."""
        if self._thread.is_alive():
            self._q.put_last(None)
            self._thread.join()
        if self._error is not None and raise_error:
            raise self._error


class Background:
    """Run ``fn(*args)`` in a daemon thread (never holds up an interrupted run's exit)."""

    def __init__(self, fn: Callable, *args: object) -> None:
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as exc:  # raised again by result(), in the caller's thread
            self._error = exc

    def result(self) -> object:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

"""FIFO admission to the one engine: coroutines wait for their turn without holding a thread.

Waiting used to hold one of Starlette's worker threads per request (a `threading.Lock` taken inside a
thread), so 40 queued streams starved the running one of threads for its next token. Here a waiter is
an asyncio future; the slot is handed over with `call_soon_threadsafe`, so the engine thread (or any
thread) can release it, and servers on different event loops can share one engine.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque


class QueueFull(Exception):
    """The queue holds its maximum of waiting requests; `retry_after` is a hint in seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting already; retry in {retry_after} s")
        self.waiting, self.retry_after = waiting, retry_after


class Admission:
    """One holder at a time, the others waiting in arrival order, at most `max_waiting` of them."""

    def __init__(self, max_waiting: int):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._held = False
        self._since = 0.0  # when the current holder got the slot
        self._mean_hold = 1.0  # seconds a request holds the slot (moving average): the Retry-After hint

    @property
    def held(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Wait for the slot (FIFO); raises QueueFull at once when `max_waiting` requests wait already."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._held and not self._waiters:
                self._take()
                return
            if len(self._waiters) >= self.max_waiting:
                raise QueueFull(len(self._waiters), self._retry_after())
            entry = (loop, loop.create_future())
            self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            self._abandon(entry)
            raise

    def release(self) -> None:
        """Give the slot to the next waiter (callable from any thread)."""
        with self._lock:
            self._mean_hold = 0.8 * self._mean_hold + 0.2 * (time.monotonic() - self._since)
            if not self._waiters:
                self._held = False
                return
            loop, future = self._waiters.popleft()
            self._since = time.monotonic()
        try:
            loop.call_soon_threadsafe(self._grant, future)
        except RuntimeError:  # that waiter's event loop is closed (its server stopped): pass the slot on
            self.release()

    def _take(self) -> None:
        self._held, self._since = True, time.monotonic()

    def _grant(self, future: asyncio.Future) -> None:
        if future.done():  # cancelled between the hand-over and now: the slot goes to the next one
            self.release()
        else:
            future.set_result(None)

    def _abandon(self, entry) -> None:
        """A waiter was cancelled: leave the queue, or pass on a slot it was already given."""
        with self._lock:
            if entry in self._waiters:
                self._waiters.remove(entry)
                return
        future = entry[1]
        if future.done() and not future.cancelled():  # granted, then cancelled before it ran
            self.release()
        # else the grant is still on its way; _grant sees the cancelled future and passes the slot on

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._mean_hold * (len(self._waiters) + 1)))

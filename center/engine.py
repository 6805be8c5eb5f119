"""One compute thread; decode steps (one position each) waiting together run as one batched forward on the
model's execution backend (the native int4 kernel takes the whole batch in one call)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .sessions import Session


@dataclass
class Job:
    session: Session
    h: np.ndarray  # [n, D] float32
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Engine:
    """Runs jobs on `model` (a `cfm_runtime.Model`); `submit` returns a Future of (h_out [n, D], compute_ms, batch)."""

    def __init__(self, model, max_batch: int = 32):
        self.model, self.max_batch = model, max_batch
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.batches = self.batched_steps = 0
        self.thread = threading.Thread(target=self._loop, name="center-engine", daemon=True)
        self.thread.start()

    def submit(self, session: Session, h: np.ndarray) -> concurrent.futures.Future:
        job = Job(session, h)
        self.jobs.put(job)
        return job.future

    def report(self) -> dict:
        """Telemetry: forwards run and decode steps computed in them (their ratio is the mean batch)."""
        return {"batches": self.batches, "batched_steps": self.batched_steps,
                "batch_mean": round(self.batched_steps / self.batches, 2) if self.batches else 0.0}

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            pending = [job]
            while len(pending) < 4 * self.max_batch:
                try:
                    pending.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            if None in pending:
                pending.remove(None)
                self.jobs.put(None)
            self._run(pending)

    def _run(self, jobs: list[Job]) -> None:
        decode = defaultdict(list)
        for j in jobs:
            if j.h.shape[0] == 1:
                decode[(j.session.start, j.session.end)].append(j)
            else:
                self._guarded([j])
        for group in decode.values():
            for i in range(0, len(group), self.max_batch):
                self._guarded(group[i:i + self.max_batch])

    def _guarded(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            outs, ms = self._forward(jobs)
        except Exception as e:  # reported to each caller as INTERNAL by the status mapping
            for j in jobs:
                j.future.set_exception(e)
            return
        for j, out in zip(jobs, outs):
            j.future.set_result((out, ms, len(jobs)))

    def _forward(self, jobs: list[Job]) -> tuple[list[np.ndarray], float]:
        t0 = time.perf_counter()
        s = jobs[0].session
        h = np.stack([j.h for j in jobs])  # [B, n, D]; B > 1 only for decode steps (n == 1)
        out = self.model.backend.span(h, s.start, s.end, [j.session.cache for j in jobs])
        self.batches += 1
        self.batched_steps += len(jobs)
        return list(out), (time.perf_counter() - t0) * 1000

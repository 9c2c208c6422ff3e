"""The inference pool behind ``cnnlab serve``: a bounded number of requests at a time, run
by a few worker threads, with queued requests for the same run batched.

The event loop never runs a model: a request becomes a ``Job`` whose future a worker
thread resolves (torch releases the GIL while it computes, so the loop keeps reading and
answering other requests meanwhile). A worker takes the oldest job and, with it, the
other queued jobs of the same key (run and options), up to ``max_batch``: under load one
forward pass serves several clients, as TorchServe's and Triton's dynamic batching do.
``Gate`` is the bound: a request is admitted before its body is read, or refused (503).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class Gate:
    """At most ``capacity`` requests inside at once; ``enter`` says whether one got in."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.inside = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.inside >= self.capacity:
                return False
            self.inside += 1
            return True

    def full(self) -> bool:
        with self._lock:
            return self.inside >= self.capacity

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


@dataclass
class Job:
    """One request's work: ``payload`` for the batch function, answered through ``future``."""

    key: Hashable  # jobs with equal keys may share a batch
    payload: Any
    future: Future = field(default_factory=Future)


# Called with one key and its jobs' payloads; returns one result or exception per payload.
BatchFunction = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class Pool:
    """``workers`` threads running ``work`` on batches of queued jobs."""

    def __init__(self, work: BatchFunction, workers: int = 1, max_batch: int = 8) -> None:
        if workers < 1 or max_batch < 1:
            raise ValueError(f"need workers >= 1 and max_batch >= 1, got {workers}, {max_batch}")
        self.work, self.workers, self.max_batch = work, workers, max_batch
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False

    def start(self) -> None:
        """Start the workers (again, after ``stop``: an app's lifespan may run twice)."""
        with self._ready:
            self._stopping = False
        # Daemon threads: a worker inside a long forward pass never keeps the process alive.
        self._threads = [
            threading.Thread(target=self._serve, name=f"cnnlab-infer-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> Future:
        with self._ready:
            if self._stopping:
                raise RuntimeError("the pool is stopping")
            self._jobs.append(job)
            self._ready.notify()
        return job.future

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the queued jobs, let running batches finish and join the workers."""
        with self._ready:
            self._stopping = True
            while self._jobs:
                self._jobs.popleft().future.cancel()
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _next_batch(self) -> list[Job] | None:
        with self._ready:
            while not self._jobs and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return None
            first = self._jobs.popleft()
            batch = [first]
            for job in list(self._jobs):  # the same key, oldest first; the rest keep order
                if len(batch) == self.max_batch:
                    break
                if job.key == first.key:
                    self._jobs.remove(job)
                    batch.append(job)
            return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self.work(batch[0].key, [job.payload for job in batch])
            except Exception as error:  # each waiting request gets it; the worker goes on
                results = [error] * len(batch)
            for job, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

"""The serving engine: one worker thread owns the model and decodes queued requests in batches.

HTTP handlers (on the event loop) `submit` jobs; the worker takes the oldest job plus every queued
job whose decoding settings match (same `SamplerConfig.decode_key()`: greedy vs sampling,
temperature, top-k, top-p, min tokens), up to `max_batch` rows, and decodes them together. Each
row keeps its own prompt, budget, seed and stop strings, so batching never changes a request's
text. Text streams back to the event loop between decode chunks.

Back-pressure: at most `max_queue` jobs wait; more get 429. On shutdown queued jobs get 503 at
once, the running batch may finish within the grace period, and is then stopped with 503.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any

from absl import logging

from tinystories_jax.sampling.config import SamplerConfig, SamplerError
from tinystories_jax.sampling.text import StoryCompletion, StoryWriter
from tinystories_jax.serving.protocol import APIError, GenerationRequest


@dataclasses.dataclass(eq=False)
class Job:
  """One HTTP request's work: prompts x n rows; events go to `events` on `loop`.

  Events: ("text", choice_index, piece), ("done", [StoryCompletion per choice]),
  ("error", APIError). Choice index of prompt p, sample k is p * n + k.
  """
  request: GenerationRequest
  encoded: list[list[int]]
  max_new: int
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue
  cancelled: bool = False
  results: dict[int, StoryCompletion] = dataclasses.field(default_factory=dict)

  @property
  def rows(self) -> int:
    return len(self.encoded) * self.request.n

  def emit(self, event: tuple) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Stop(Exception):
  """Raised inside a batch to end it early (shutdown, or every client went away)."""


class Engine:
  """Batches and runs jobs on a worker thread (see module docstring)."""

  def __init__(self, writer: StoryWriter, *, max_batch: int = 32, max_queue: int = 64):
    self.writer = writer
    self.max_batch = max_batch
    self.max_queue = max_queue
    self._queue: collections.deque[Job] = collections.deque()
    self._cv = threading.Condition()
    self._closing = False
    self._deadline: float | None = None
    self._thread = threading.Thread(target=self._work, name="sampling-engine", daemon=True)
    self.batches_run = 0

  def start(self) -> None:
    self._thread.start()

  @property
  def closing(self) -> bool:
    return self._closing

  def submit(self, job: Job) -> None:
    """Queues a job, or raises APIError 503 (shutting down) / 429 (queue full)."""
    with self._cv:
      if self._closing:
        raise APIError(503, "The server is shutting down; retry against another instance.",
                       code="shutting_down")
      if len(self._queue) >= self.max_queue:
        raise APIError(429, f"{len(self._queue)} requests are already waiting; retry shortly.",
                       code="queue_full")
      self._queue.append(job)
      self._cv.notify()

  def begin_shutdown(self, grace_s: float) -> None:
    """Refuses new jobs, fails queued ones with 503, lets the running batch run `grace_s` more."""
    with self._cv:
      if self._closing:
        return
      self._closing = True
      self._deadline = time.monotonic() + grace_s
      queued = list(self._queue)
      self._queue.clear()
      self._cv.notify_all()
    for job in queued:
      job.emit(("error", APIError(503, "The server is shutting down; this request was not "
                                  "started. Retry against another instance.",
                                  code="shutting_down")))

  def join(self, timeout: float | None = None) -> None:
    self._thread.join(timeout)

  # ----------------------------------------------------------------------------------------------

  def _next_batch(self) -> list[Job] | None:
    with self._cv:
      while not self._queue and not self._closing:
        self._cv.wait()
      if not self._queue:
        return None
      first = self._queue.popleft()
      batch, rows = [first], first.rows
      key = first.request.config.decode_key()
      for job in list(self._queue):
        if rows >= self.max_batch:
          break
        if job.request.config.decode_key() == key and rows + job.rows <= self.max_batch:
          self._queue.remove(job)
          batch.append(job)
          rows += job.rows
      return batch

  def _work(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      try:
        self._run(batch)
      except _Stop:
        error = APIError(503, "The server shut down before this request finished.",
                         code="shutting_down")
        for job in batch:
          job.emit(("error", error))
      except SamplerError as e:  # a check that only the sampler can make
        for job in batch:
          job.emit(("error", APIError(422, str(e), code="invalid_value")))
      except Exception as e:  # pylint: disable=broad-except
        # The worker must outlive one bad batch; its clients get a 500 with the reason.
        logging.exception("decoding a batch failed")
        for job in batch:
          job.emit(("error", APIError(500, f"Decoding failed: {type(e).__name__}: {e}",
                                      code="internal_error")))
      self.batches_run += 1

  def _run(self, batch: list[Job]) -> None:
    rows: list[tuple[Job, int, list[int]]] = []  # (job, choice index, prompt ids)
    for job in batch:
      for p, ids in enumerate(job.encoded):
        for k in range(job.request.n):
          rows.append((job, p * job.request.n + k, ids))
    for start in range(0, len(rows), self.max_batch):
      self._run_rows(rows[start:start + self.max_batch])
    for job in batch:
      job.emit(("done", [job.results[i] for i in range(job.rows)]))

  def _run_rows(self, rows: list[tuple[Any, int, list[int]]]) -> None:
    jobs = {id(job): job for job, _, _ in rows}.values()
    first = rows[0][0].request.config
    config = SamplerConfig(**dict(first.to_dict(), stop=(), seed=0,
                                  max_new_tokens=max(job.max_new for job in jobs)))

    def on_text(pieces: list[str]) -> None:
      if self._deadline is not None and time.monotonic() > self._deadline:
        raise _Stop()
      if all(job.cancelled for job in jobs):
        raise _Stop()
      for (job, index, _), piece in zip(rows, pieces):
        if piece and job.request.stream and not job.cancelled:
          job.emit(("text", index, piece))

    stories = self.writer.complete(
        [], config, encoded=[ids for _, _, ids in rows],
        # A choice's randomness follows its sample number k, not its place in the request: the
        # same prompt and seed give the same story alone or inside a list.
        streams=[index % job.request.n for job, index, _ in rows],
        limits=[job.max_new for job, _, _ in rows],
        seeds=[job.request.config.seed for job, _, _ in rows],
        stops=[job.request.config.stop for job, _, _ in rows], on_text=on_text)
    for (job, index, _), [story] in zip(rows, stories):
      job.results[index] = story

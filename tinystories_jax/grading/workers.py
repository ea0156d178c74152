"""Online grading spread over several processes, for endpoints faster than one Python core.

The HTTP stack under the `openai` client (httpx, httpcore, anyio) costs about 2 ms of CPU per
request, so one process tops out near 500 requests (250 two-turn grades) a second however fast
the endpoint is. With `--workers=N` each of N processes grades every N-th item with
`concurrency / N` requests in flight; all append to the same `grades.jsonl`, which is safe
because each row is one `write` on an O_APPEND descriptor. Resumption is unchanged: the keys are
in the file, whichever process wrote them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import multiprocessing
import os
import queue
import traceback

import tqdm

from tinystories_jax.grading import grader as grader_lib
from tinystories_jax.grading.client import ChatClient, StopRun, run_event_loop
from tinystories_jax.grading.journal import Journal
from tinystories_jax.grading.rubric import RUBRICS


def _count_rows(path: str) -> int:
  with open(path, "rb") as f:
    return f.read().count(b"\n")


def grade_in_workers(todo: list, config: grader_lib.GradeConfig, journal_path: str,
                     workers: int) -> None:
  """Grades `todo` in `workers` processes; returns when all are done.

  Raises:
    StopRun: a worker had to stop (refused credentials, unreachable endpoint); the others are
      stopped at once.
    RuntimeError: a worker crashed; carries its traceback.
  """
  context = multiprocessing.get_context("spawn")  # No event loop or sockets copied by fork.
  messages = context.Queue()
  share = dataclasses.replace(
      config, progress=False,
      client=dataclasses.replace(config.client,
                                 concurrency=max(1, math.ceil(config.client.concurrency
                                                              / workers))))
  processes = [context.Process(target=_worker, args=(todo[i::workers], share, journal_path, i,
                                                     messages), daemon=True)
               for i in range(workers) if todo[i::workers]]
  start_rows = _count_rows(journal_path)
  bar = tqdm.tqdm(total=len(todo), desc="grading", unit="item", disable=not config.progress)
  try:
    for process in processes:
      process.start()
    while True:
      try:
        kind, text = messages.get(timeout=0.5)
      except queue.Empty:
        if not any(p.is_alive() for p in processes):
          break
      else:
        if kind == "stop":
          raise StopRun(text)
        raise RuntimeError(f"A grading worker failed:\n{text}")
      bar.n = min(len(todo), _count_rows(journal_path) - start_rows)
      bar.refresh()
    crashed = [p.exitcode for p in processes if p.exitcode]
    if crashed:
      raise RuntimeError(f"A grading worker exited with code {crashed[0]}; rerun to resume.")
  finally:
    for process in processes:
      if process.is_alive():
        process.terminate()
      process.join()
    bar.close()


async def _orphan_watch(parent: int) -> None:
  """Ends this worker at once if the parent dies (a killed run must not keep writing)."""
  while os.getppid() == parent:
    await asyncio.sleep(0.1)
  os._exit(1)  # pylint: disable=protected-access


async def _grade_shard(grader, shard: list, config: grader_lib.GradeConfig, parent: int) -> None:
  watch = asyncio.ensure_future(_orphan_watch(parent))
  try:
    await grader_lib.grade_online(grader, shard, config)
  finally:
    watch.cancel()


def _worker(shard: list, config: grader_lib.GradeConfig, journal_path: str, index: int,
            messages) -> None:
  parent = os.getppid()
  try:
    client = ChatClient(config.client, seed=config.seed * 1000 + index)
    with Journal(journal_path, keep_rows=False, repair=False) as journal:
      grader = grader_lib.Grader(client, RUBRICS[config.rubric], journal, config)
      run_event_loop(_grade_shard(grader, shard, config, parent))
  except StopRun as e:
    messages.put(("stop", str(e)))
  except BaseException:  # pylint: disable=broad-except
    messages.put(("error", traceback.format_exc()))
    os._exit(1)  # pylint: disable=protected-access

"""The OpenAI Batch API as a resumable request runner, for grading and dataset generation.

`BatchRunner.run(requests, on_result)` turns chat-completion bodies into answers: it writes the
request JSONL, splits it under the API's limits (50,000 requests and 200 MB per file at the time of
writing; we stay under 100 MB), uploads each part through `/v1/files`, creates the batches,
polls them, downloads output and error files, merges, and submits the failed requests again up
to `max_rounds` times. Every batch id goes into a state file the moment it exists and every
downloaded file is kept, so a killed run picks up its batches instead of paying for them twice.
Results are cached by `custom_id`: calling `run` again with the same ids costs nothing.
Requests and results stream through files, so memory stays flat at two million stories.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import openai

from tinystories_jax.grading.client import (AuthStop, ClientConfig, UnusableAnswer, Usage,
                                            read_answer, redact_key, resolve_api_key)

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """Batch sizes and patience.

  Attributes:
    max_requests: requests per batch file.
    max_bytes: bytes per batch file.
    max_rounds: submissions per request (the first included) before it counts as failed.
    poll_interval_s: seconds between status checks.
    completion_window: the API's completion window.
  """
  max_requests: int = 50_000
  max_bytes: int = 100 * 2**20
  max_rounds: int = 3
  poll_interval_s: float = 30.0
  completion_window: str = "24h"


@dataclasses.dataclass
class BatchResult:
  """The outcome for one custom_id: `text` (usable answer) or `error`."""
  text: str | None
  error: str | None
  usage: Usage
  attempts: int
  raw_answers: list[str] = dataclasses.field(default_factory=list)


class BatchRunner:
  """Submits, polls and merges batches, remembering everything in `work_dir`.

  Args:
    client_config: endpoint, model and key (the same settings as online requests).
    batch_config: sizes and patience.
    work_dir: holds `state.json`, the request files and the downloaded results.
    log: called with one line per event worth telling the user.
  """

  def __init__(self, client_config: ClientConfig, batch_config: BatchConfig, work_dir: str,
               log: Callable[[str], None] = print):
    self.config = batch_config
    self.work_dir = work_dir
    self.log = log
    os.makedirs(work_dir, exist_ok=True)
    self._key = resolve_api_key(client_config)
    self._client = openai.OpenAI(base_url=client_config.base_url, api_key=self._key,
                                 max_retries=3, timeout=client_config.timeout_s)
    self.state_path = os.path.join(work_dir, "state.json")
    self.state: dict[str, Any] = {"batches": []}
    if os.path.exists(self.state_path):
      with open(self.state_path, encoding="utf-8") as f:
        self.state = json.load(f)

  def _save_state(self) -> None:
    tmp = self.state_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.state, f, indent=1)
    os.replace(tmp, self.state_path)

  def _call(self, what: str, fn, *args, **kwargs):
    """One Files/Batches API call, with credential failures turned into a clear stop."""
    try:
      return fn(*args, **kwargs)
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
      raise AuthStop(f"The endpoint refused our credentials while trying to {what} "
                     f"(HTTP {e.status_code}); check the API key and --base_url.") from None
    except openai.APIStatusError as e:
      message = redact_key(str(e.message), self._key)
      raise RuntimeError(f"Could not {what}: HTTP {e.status_code}: {message}") from None

  # ---- submission -----------------------------------------------------------------------

  def _create(self, input_path: str, count: int, tag: str) -> None:
    with open(input_path, "rb") as f:
      uploaded = self._call("upload a batch file", self._client.files.create,
                            file=(os.path.basename(input_path), f), purpose="batch")
    batch = self._call("create a batch", self._client.batches.create,
                       input_file_id=uploaded.id, endpoint=ENDPOINT,
                       completion_window=self.config.completion_window,
                       metadata={"tool": "tinystories-jax", "part": tag})
    self.state["batches"].append({
        "id": batch.id, "input_path": os.path.basename(input_path),
        "input_file_id": uploaded.id, "requests": count, "status": batch.status,
        "output_path": None, "error_path": None, "created_at": time.time()})
    self._save_state()
    self.log(f"batch {batch.id}: {count} requests submitted")

  def _submit(self, requests: Iterable[tuple[str, dict[str, Any]]], tag: str) -> int:
    """Streams requests into files under the size limits and starts a batch per file."""
    total = count = size = 0
    f = path = None
    for custom_id, body in requests:
      line = (json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                          "body": body}, ensure_ascii=False) + "\n").encode("utf-8")
      if f is not None and (count >= self.config.max_requests
                            or size + len(line) > self.config.max_bytes):
        f.close()
        self._create(path, count, tag)
        f = None
      if f is None:
        number = len(self.state["batches"])
        path = os.path.join(self.work_dir, f"{number:05d}-{tag}.input.jsonl")
        f = open(path, "wb")  # pylint: disable=consider-using-with
        count = size = 0
      f.write(line)
      count += 1
      size += len(line)
      total += 1
    if f is not None:
      f.close()
      self._create(path, count, tag)
    return total

  # ---- waiting and merging --------------------------------------------------------------

  def _download(self, file_id: str | None, name: str) -> str | None:
    if not file_id:
      return None
    content = self._call("download batch results", self._client.files.content, file_id)
    path = os.path.join(self.work_dir, name)
    with open(path, "wb") as f:
      f.write(content.read() if hasattr(content, "read") else content.content)
    return os.path.basename(path)

  def _wait(self) -> None:
    """Polls every unfinished batch to a terminal status and downloads its files."""
    while True:
      waiting = [b for b in self.state["batches"] if not b.get("downloaded")]
      if not waiting:
        return
      for entry in waiting:
        batch = self._call("check a batch", self._client.batches.retrieve, entry["id"])
        entry["status"] = batch.status
        if batch.status in TERMINAL:
          stem = entry["input_path"][:-len(".input.jsonl")]
          entry["output_path"] = self._download(batch.output_file_id, f"{stem}.output.jsonl")
          entry["error_path"] = self._download(batch.error_file_id, f"{stem}.errors.jsonl")
          errors = getattr(batch, "errors", None)
          data = getattr(errors, "data", None) or []
          entry["batch_error"] = "; ".join(str(getattr(e, "message", e)) for e in data) or None
          entry["downloaded"] = True
          self.log(f"batch {entry['id']}: {batch.status}")
        self._save_state()
      if any(not b.get("downloaded") for b in self.state["batches"]):
        time.sleep(self.config.poll_interval_s)

  def _answers(self, entry: dict[str, Any]) -> Iterator[tuple[str, dict | None, str | None]]:
    """(custom_id, response body or None, error or None) for every request of one batch."""
    answered = set()
    for name in (entry.get("output_path"), entry.get("error_path")):
      if not name:
        continue
      with open(os.path.join(self.work_dir, name), encoding="utf-8") as f:
        for line in f:
          if not line.strip():
            continue
          row = json.loads(line)
          response = row.get("response") or {}
          status = response.get("status_code")
          answered.add(row["custom_id"])
          if status == 200:
            yield row["custom_id"], response.get("body"), None
          else:
            detail = row.get("error") or (response.get("body") or {}).get("error") or {}
            yield row["custom_id"], None, (
                f"HTTP {status}: {detail.get('message', 'no message')}" if status
                else str(detail.get("message", "failed")))
    # Requests a batch never answered (expired, failed validation) count as failed tries.
    with open(os.path.join(self.work_dir, entry["input_path"]), encoding="utf-8") as f:
      for line in f:
        custom_id = json.loads(line)["custom_id"]
        if custom_id not in answered:
          yield custom_id, None, (entry.get("batch_error")
                                  or f"batch {entry['status']} without an answer")

  def run(self, requests: Callable[[], Iterable[tuple[str, dict[str, Any]]]],
          on_result: Callable[[str, BatchResult], None], *, tag: str = "requests",
          parse: Callable[[str], Any] | None = None,
          retry_temperature: float | None = None) -> None:
    """Delivers one result per request, submitting only what no earlier batch answered usably.

    Results stream from the downloaded files to `on_result` as they are merged, so memory does
    not grow with the answers (two million stories fit).

    Args:
      requests: returns (custom_id, chat-completions body) pairs afresh on each call.
      on_result: called exactly once per custom_id; after `max_rounds` submissions without a
        usable answer the result carries the last error.
      tag: names the request files (e.g. "turn1").
      parse: raises `UnusableAnswer` for an answer to submit again.
      retry_temperature: temperature for resubmitting a request whose answer was unusable.
    """
    self._wait()  # Batches a killed run left behind.
    wanted = {custom_id for custom_id, _ in requests()}
    tally = _Tally(wanted, parse, on_result)
    for entry in self.state["batches"]:
      tally.merge(self._answers(entry))
    while True:
      first_new = len(self.state["batches"])
      again = ((cid, body if retry_temperature is None or cid not in tally.raw
                else body | {"temperature": retry_temperature})
               for cid, body in requests()
               if cid not in tally.settled and tally.attempts[cid] < self.config.max_rounds)
      if not self._submit(again, tag):
        break
      self._wait()
      for entry in self.state["batches"][first_new:]:
        tally.merge(self._answers(entry))
    tally.give_up()


class _Tally:
  """Per-request bookkeeping while merging; only unsettled requests keep their history."""

  def __init__(self, wanted: set[str], parse, on_result):
    self.wanted = wanted
    self.parse = parse
    self.on_result = on_result
    self.settled: set[str] = set()
    self.attempts: collections.Counter = collections.Counter()
    self.usage: dict[str, Usage] = {}
    self.raw: dict[str, list[str]] = {}
    self.error: dict[str, str] = {}

  def merge(self, answers: Iterable[tuple[str, dict | None, str | None]]) -> None:
    for custom_id, body, error in answers:
      if custom_id not in self.wanted or custom_id in self.settled:
        continue
      self.attempts[custom_id] += 1
      usage = self.usage.setdefault(custom_id, Usage())
      usage.requests += 1
      if body is not None:
        try:
          text = read_answer(body, usage)
          self.raw.setdefault(custom_id, []).append(text)
          if self.parse is not None:
            self.parse(text)
          self._settle(custom_id, BatchResult(text, None, usage, self.attempts[custom_id],
                                              self.raw.pop(custom_id)))
          continue
        except UnusableAnswer as e:
          error = f"unusable answer: {e}"
      self.error[custom_id] = error or "no answer"

  def _settle(self, custom_id: str, result: BatchResult) -> None:
    self.settled.add(custom_id)
    for table in (self.usage, self.error, self.raw):
      table.pop(custom_id, None)
    self.attempts.pop(custom_id, None)
    self.on_result(custom_id, result)

  def give_up(self) -> None:
    for custom_id in sorted(self.wanted - self.settled):
      self._settle(custom_id, BatchResult(
          None, self.error.get(custom_id, "never answered"),
          self.usage.get(custom_id, Usage()), self.attempts[custom_id],
          self.raw.get(custom_id, [])))

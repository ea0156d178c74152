"""Grading a set of completions: the two-turn teacher protocol, resumable, then the report.

Flow: read and check every input (nothing is sent if one row is bad) → skip what `grades.jsonl`
already holds → grade the rest with bounded concurrency, appending each result the moment it
arrives → write `summary.json`, `report.md` and the charts from `grades.jsonl`.
Probes from the packaged eval sets are checked automatically and cost no request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import tqdm

from tinystories_jax.grading import batch as batch_lib
from tinystories_jax.grading import completions as completions_lib
from tinystories_jax.grading import evalsets
from tinystories_jax.grading import instruct_eval
from tinystories_jax.grading import report as report_lib
from tinystories_jax.grading.client import (ChatClient, ChatError, ClientConfig, Usage,
                                            UnusableAnswer, run_bounded, run_event_loop)
from tinystories_jax.grading.journal import Journal, content_key, read_rows
from tinystories_jax.grading.rubric import INSTRUCT, RUBRICS, Rubric

GRADES_FILE = "grades.jsonl"
RUBRIC_FILE = "rubric.json"
# After an unusable answer the same request at temperature 0 would likely get the same answer.
RETRY_TEMPERATURE = 0.7


@dataclasses.dataclass(frozen=True)
class GradeConfig:
  """Everything one grading run needs.

  Attributes:
    completions: completions JSONL files; several give a side-by-side comparison.
    output_dir: where grades.jsonl, summary.json, report.md and charts go.
    client: endpoint, grader model, concurrency and retry policy.
    rubric: rubric name (see `rubric.RUBRICS`).
    structured_output: ask for JSON-schema answers (dropped if the endpoint refuses).
    reference_stories: dataset story files to cut and grade as a reference ceiling.
    reference_count: how many reference stories.
    seed: picks reference stories and seeds retry jitter.
    retry_failed: grade again items recorded as failed in an earlier run.
    max_tokens: answer cap per grader turn.
    temperature: grader sampling temperature.
    prices: USD per million tokens (input, output) per grader model.
    progress: show a progress bar.
    mode: "online" (interactive requests) or "batch" (the OpenAI Batch API, half price).
    batch: batch sizes and patience, for mode "batch".
    workers: processes for online grading (see `workers.py`); concurrency is split among them.
  """
  completions: tuple[str, ...]
  output_dir: str
  client: ClientConfig
  rubric: str = "story"
  structured_output: bool = True
  reference_stories: tuple[str, ...] = ()
  reference_count: int = 100
  seed: int = 0
  retry_failed: bool = False
  max_tokens: int = 500
  temperature: float = 0.0
  prices: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  progress: bool = True
  mode: str = "online"
  batch: batch_lib.BatchConfig = batch_lib.BatchConfig()
  workers: int = 1


def item_key(item: completions_lib.Completion, grader_model: str, rubric: Rubric) -> str:
  """Resume key: the graded text, who wrote it, the grader model and the rubric version."""
  return content_key(item.model, item.id, item.prompt, item.completion, grader_model, rubric.tag)


def _assessment(text: str) -> str:
  if len(text.split()) < 3:
    raise UnusableAnswer("the assessment is too short to be one")
  return text.strip()


class Grader:
  """Grades items with one rubric, appending rows to a journal.

  `client` is the online chat client; None in batch mode, where requests go through files.
  """

  def __init__(self, client: ChatClient | None, rubric: Rubric, journal: Journal,
               config: GradeConfig):
    self.client = client
    self.rubric = rubric
    self.journal = journal
    self.config = config

  def base_row(self, key: str, item: completions_lib.Completion) -> dict[str, Any]:
    prompt_id = item.prompt_id
    if prompt_id is None:
      found = evalsets.find_prompt(item.prompt)
      prompt_id = found[1]["id"] if found else None
    row = {
        "key": key, "id": item.id, "model": item.model, "prompt_id": prompt_id,
        "prompt": item.prompt, "completion": item.completion, "source": item.source,
        "grader_model": self.config.client.model, "rubric": self.rubric.name,
        "rubric_version": self.rubric.version,
    }
    if self.rubric.name == INSTRUCT.name:
      row["auto_checks"] = instruct_eval.automatic_checks(
          instruct_eval.instructions_of(item.prompt), item.completion)
    return row

  def probe_row(self, key, item, probe_set: str, probe: dict[str, Any]) -> dict[str, Any]:
    check = evalsets.check_probe(item.completion, probe["answers"])
    return self.base_row(key, item) | {
        "kind": "probe", "probe_set": probe_set,
        "status": "ok", "check": check, "scores": None, "age_group": None, "error": None,
        "raw_answers": [], "usage": Usage().as_dict(), "attempts": 0, "latency_s": 0.0,
        "graded_at": time.time(),
    }

  def first_messages(self, item: completions_lib.Completion) -> list[dict[str, str]]:
    if self.rubric.name == INSTRUCT.name:
      instructions = instruct_eval.instructions_of(item.prompt)
      return self.rubric.first_messages(instructions=instruct_eval.describe(instructions),
                                        completion=item.completion.strip())
    return self.rubric.first_messages(beginning=item.prompt, completion=item.completion)

  async def grade_one(self, key: str, item: completions_lib.Completion) -> dict[str, Any]:
    """Both grader turns for one item; returns the row (status ok or failed)."""
    usage = Usage()
    raw_answers: list[dict[str, Any]] = []
    attempts = 0
    latency = 0.0
    row = self.base_row(key, item) | {"kind": self.rubric.name}
    first = self.first_messages(item)
    stage = "assessment"
    try:
      reply = await self.client.chat(
          first, parse=_assessment, max_tokens=self.config.max_tokens,
          temperature=self.config.temperature, retry_temperature=RETRY_TEMPERATURE)
      usage.add(reply.usage)
      attempts += reply.attempts
      latency += reply.latency_s
      raw_answers += [{"turn": 1, "text": t} for t in reply.raw_answers]
      assessment = reply.parsed
      stage = "scores"
      reply = await self.client.chat(
          self.rubric.second_messages(first, assessment), parse=self.rubric.parse_scores,
          response_format=self.rubric.response_format() if self.config.structured_output else None,
          max_tokens=self.config.max_tokens, temperature=self.config.temperature,
          retry_temperature=RETRY_TEMPERATURE)
      usage.add(reply.usage)
      attempts += reply.attempts
      latency += reply.latency_s
      raw_answers += [{"turn": 2, "text": t} for t in reply.raw_answers]
      row |= {"status": "ok", "scores": reply.parsed["scores"],
              "age_group": reply.parsed["age_group"], "assessment": assessment, "error": None}
    except ChatError as e:
      usage.add(e.usage)
      attempts += e.attempts
      raw_answers += [{"turn": 1 if stage == "assessment" else 2, "text": t}
                      for t in e.raw_answers]
      row |= {"status": "failed", "scores": None, "age_group": None,
              "assessment": None if stage == "assessment" else assessment,
              "error": f"{stage}: {e}"}
    row |= {"raw_answers": raw_answers, "usage": usage.as_dict(), "attempts": attempts,
            "latency_s": round(latency, 4), "graded_at": time.time()}
    return row


def _load_items(config: GradeConfig) -> list[completions_lib.Completion]:
  items = completions_lib.read_completions(list(config.completions)) if config.completions else []
  if config.reference_stories:
    items += completions_lib.reference_completions(
        list(config.reference_stories), config.reference_count, config.seed)
  if not items:
    raise completions_lib.InputError(
        "Nothing to grade: pass --completions=FILE.jsonl and/or --reference_stories=FILE.")
  return items


def latest_rows(journal_rows: list[dict[str, Any]], keys: set[str]) -> list[dict[str, Any]]:
  """The last row written for each wanted key (a retried failure supersedes the failure)."""
  latest: dict[str, dict[str, Any]] = {}
  for row in journal_rows:
    if row.get("key") in keys:
      latest[row["key"]] = row
  return list(latest.values())


def grade(config: GradeConfig) -> dict[str, Any]:
  """Grades every input item not already graded, then writes the report.

  Returns:
    The summary written to `summary.json`.

  Raises:
    completions_lib.InputError: bad inputs (before any request).
    client.ConfigError: a missing key or bad setting.
    client.StopRun: the endpoint kept refusing the credentials or could not be reached.
  """
  if config.workers < 1:
    raise completions_lib.InputError(f"--workers must be at least 1, got {config.workers}.")
  if config.mode not in ("online", "batch"):
    raise completions_lib.InputError(f"Unknown mode {config.mode!r}; use online or batch.")
  if config.rubric not in RUBRICS:
    raise completions_lib.InputError(
        f"Unknown rubric {config.rubric!r}; choose one of {', '.join(RUBRICS)}.")
  rubric = RUBRICS[config.rubric]
  items = _load_items(config)
  os.makedirs(config.output_dir, exist_ok=True)
  with open(os.path.join(config.output_dir, RUBRIC_FILE), "w", encoding="utf-8") as f:
    json.dump(rubric.as_dict(), f, indent=2)
  # Batch mode needs no chat client; its runner checks the key the same way.
  client = ChatClient(config.client, seed=config.seed) if config.mode == "online" else None
  keyed = [(item_key(item, config.client.model, rubric), item) for item in items]
  with Journal(os.path.join(config.output_dir, GRADES_FILE)) as journal:
    finished = {row["key"] for row in journal.rows
                if "key" in row and (row.get("status") == "ok" or not config.retry_failed)}
    todo = [(key, item) for key, item in keyed if key not in finished]
    logging.info("%d items, %d already graded, %d to grade with %s (%s).", len(keyed),
                 len(keyed) - len(todo), len(todo), config.client.model, rubric.tag)
    grader = Grader(client, rubric, journal, config)
    if config.mode == "batch":
      _grade_batch(grader, todo, config)
    elif config.workers > 1 and len(todo) > 1:
      # Imported here: workers.py builds on this module.
      from tinystories_jax.grading import workers  # pylint: disable=g-import-not-at-top
      workers.grade_in_workers(todo, config, journal.path, config.workers)
    else:
      run_event_loop(grade_online(grader, todo, config))
    rows = latest_rows(list(read_rows(journal.path)), {key for key, _ in keyed})
  return report_lib.write_report(
      rows, output_dir=config.output_dir, rubric=rubric, grader_model=config.client.model,
      prices=config.prices, expected_items=len(keyed), batch=config.mode == "batch")


async def grade_online(grader: Grader, todo: list, config: GradeConfig) -> None:
  """Grades `todo` with bounded concurrency in this process, appending each row as it comes."""
  bar = tqdm.tqdm(total=len(todo), desc="grading", unit="item", disable=not config.progress)
  failed = 0

  async def handle(pair):
    nonlocal failed
    key, item = pair
    probe = evalsets.find_probe(item.prompt) if grader.rubric.name == "story" else None
    if probe is not None:
      row = grader.probe_row(key, item, *probe)
    else:
      row = await grader.grade_one(key, item)
    grader.journal.append(row)
    if row["status"] != "ok":
      failed += 1
      logging.warning("%s %s failed: %s", item.model, item.id, row["error"])
    bar.update(1)
    bar.set_postfix(failed=failed, refresh=False)

  try:
    await run_bounded(todo, handle, config.client.concurrency)
  finally:
    bar.close()
    await grader.client.close()  # On this event loop, before it is closed.


def _grade_batch(grader: Grader, todo: list, config: GradeConfig) -> None:
  """Both turns through the Batch API: all first turns, then all second turns."""
  runner = batch_lib.BatchRunner(config.client, config.batch,
                                 os.path.join(config.output_dir, "batch"), log=logging.info)
  rubric = grader.rubric
  stories = []
  for key, item in todo:
    probe = evalsets.find_probe(item.prompt) if rubric.name == "story" else None
    if probe is not None:
      grader.journal.append(grader.probe_row(key, item, *probe))
    else:
      stories.append((key, item))

  def body(messages, response_format=None):
    out = {"model": config.client.model, "messages": messages,
           "max_tokens": config.max_tokens, "temperature": config.temperature}
    if response_format is not None and config.structured_output:
      out["response_format"] = response_format
    return out

  first = {key: grader.first_messages(item) for key, item in stories}
  turn1: dict[str, batch_lib.BatchResult] = {}
  runner.run(lambda: ((f"{key}:1", body(first[key])) for key, _ in stories),
             turn1.__setitem__, tag="turn1", parse=_assessment,
             retry_temperature=RETRY_TEMPERATURE)
  second = {}
  for key, item in stories:
    result = turn1[f"{key}:1"]
    if result.text is None:
      grader.journal.append(_batch_row(grader, key, item, [result], None, None,
                                       f"assessment: {result.error}"))
    else:
      second[key] = rubric.second_messages(first[key], _assessment(result.text))
  turn2: dict[str, batch_lib.BatchResult] = {}
  runner.run(lambda: ((f"{key}:2", body(messages, rubric.response_format()))
                      for key, messages in second.items()),
             turn2.__setitem__, tag="turn2", parse=rubric.parse_scores,
             retry_temperature=RETRY_TEMPERATURE)
  for key, item in stories:
    if key not in second:
      continue
    one, two = turn1[f"{key}:1"], turn2[f"{key}:2"]
    parsed = rubric.parse_scores(two.text) if two.text is not None else None
    grader.journal.append(_batch_row(grader, key, item, [one, two], _assessment(one.text), parsed,
                                     None if parsed else f"scores: {two.error}"))


def _batch_row(grader: Grader, key, item, results, assessment, parsed, error) -> dict[str, Any]:
  usage = Usage()
  raw_answers = []
  for turn, result in enumerate(results, 1):
    usage.add(result.usage)
    raw_answers += [{"turn": turn, "text": text} for text in result.raw_answers]
  return grader.base_row(key, item) | {
      "kind": grader.rubric.name, "status": "ok" if parsed else "failed",
      "scores": parsed["scores"] if parsed else None,
      "age_group": parsed["age_group"] if parsed else None, "assessment": assessment,
      "error": error, "raw_answers": raw_answers, "usage": usage.as_dict(),
      "attempts": sum(r.attempts for r in results), "latency_s": None, "mode": "batch",
      "graded_at": time.time()}

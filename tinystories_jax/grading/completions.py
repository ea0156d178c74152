"""Reading what is graded: completions files, and dataset stories cut into a reference set.

A completions file is JSONL with rows `{"id", "prompt", "completion", "model", "sampler"}` as
written by `python -m tinystories_jax.sample`; extra fields are kept. Every problem is reported
before any request is sent, as one sentence naming the file, the line and the fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import re
from collections.abc import Iterator
from typing import Any

REFERENCE_MODEL = "reference"
_STORY_SEPARATOR = "<|endoftext|>"


class InputError(ValueError):
  """A problem with an input file; its text says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Completion:
  """One continuation to grade.

  Attributes:
    id: the row's id, unique within its model.
    model: which model (checkpoint) wrote it.
    prompt: the story beginning it continues.
    completion: the continuation.
    source: the file it came from.
    prompt_id: the eval-set id of the prompt, where known.
    sampler: sampler settings, as written by the sampler.
  """
  id: str
  model: str
  prompt: str
  completion: str
  source: str
  prompt_id: str | None = None
  sampler: Any = None


def _open_text(path: str):
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def read_completions(paths: list[str]) -> list[Completion]:
  """Reads and checks completions files.

  Raises:
    InputError: a missing file, a line that is not a JSON object, a row without `id`, `prompt`
      or `completion`, or an id used twice by the same model.
  """
  if not paths:
    raise InputError("No completions file given; pass --completions=FILE.jsonl.")
  items: list[Completion] = []
  seen: dict[tuple[str, str], str] = {}
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(f"Completions file {path} does not exist; check the --completions path.")
    default_model = os.path.splitext(os.path.basename(path))[0]
    ids_in_file: set[str] = set()
    with _open_text(path) as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path} line {line_number}"
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise InputError(
              f"{where} is not valid JSON ({e.msg}); fix or remove that line.") from None
        if not isinstance(row, dict):
          raise InputError(f"{where} is not a JSON object; each line must be one completion row.")
        for field in ("id", "prompt", "completion"):
          if row.get(field) is None:
            raise InputError(f"{where} has no '{field}' field; every row needs id, prompt and "
                             "completion.")
        if not isinstance(row["completion"], str) or not isinstance(row["prompt"], str):
          raise InputError(f"{where}: 'prompt' and 'completion' must be strings.")
        row_id = str(row["id"])
        if row_id in ids_in_file:
          raise InputError(f"{where} repeats id {row_id!r}; ids must be unique within a file.")
        ids_in_file.add(row_id)
        model = str(row.get("model") or default_model)
        if (model, row_id) in seen:
          raise InputError(
              f"{where}: model {model!r} id {row_id!r} also appears in {seen[(model, row_id)]}; "
              "give each completions file its own model name.")
        seen[(model, row_id)] = path
        items.append(Completion(
            id=row_id, model=model, prompt=row["prompt"], completion=row["completion"],
            source=path,
            prompt_id=None if row.get("prompt_id") is None else str(row["prompt_id"]),
            sampler=row.get("sampler")))
  return items


def iter_story_texts(paths: list[str]) -> Iterator[str]:
  """Stories from `.jsonl` (field `text` or `story`) or `.txt` (`<|endoftext|>` lines), gz too."""
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(f"Story file {path} does not exist; check --reference_stories.")
    base = path[:-3] if path.endswith(".gz") else path
    with _open_text(path) as f:
      if base.endswith(".jsonl"):
        for line_number, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError:
            raise InputError(f"{path} line {line_number} is not JSON; fix or remove it.") from None
          text = row.get("text", row.get("story")) if isinstance(row, dict) else None
          if not isinstance(text, str):
            raise InputError(f"{path} line {line_number} has no 'text' or 'story' string.")
          if text.strip():
            yield text.strip()
      elif base.endswith(".txt"):
        story: list[str] = []
        for line in f:
          if line.strip() == _STORY_SEPARATOR:
            if "".join(story).strip():
              yield "".join(story).strip()
            story = []
          else:
            story.append(line)
        if "".join(story).strip():
          yield "".join(story).strip()
      else:
        raise InputError(f"Story file {path} must end in .jsonl or .txt (optionally .gz).")


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”']?\s+")


def cut_mid_sentence(story: str, rng: random.Random) -> tuple[str, str] | None:
  """Splits a story inside one of its middle sentences, as the eval prompts are cut.

  Returns:
    (beginning, continuation), or None when the story has no sentence long enough to cut.
  """
  bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(story)] + [len(story)]
  sentences = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)
               if bounds[i] < bounds[i + 1]]
  # Skip the first sentence so the grader sees some context; prefer the first half of the story.
  candidates = [s for s in sentences[1:max(2, len(sentences) // 2 + 1)]
                if len(story[s[0]:s[1]].split()) >= 5]
  if not candidates:
    return None
  start, end = rng.choice(candidates)
  words = list(re.finditer(r"\S+", story[start:end]))
  cut_word = rng.randint(2, len(words) - 2)
  cut = start + words[cut_word].start()
  beginning = story[:cut].rstrip()
  return beginning, " " + story[cut:].strip()


def reference_completions(paths: list[str], count: int, seed: int) -> list[Completion]:
  """`count` dataset stories, picked with `seed`, cut mid-sentence: the ceiling to compare with."""
  if count < 1:
    raise InputError(f"--reference_count must be at least 1, got {count}.")
  stories = list(iter_story_texts(paths))
  if not stories:
    raise InputError(f"No stories found in {', '.join(paths)}.")
  rng = random.Random(seed)
  order = list(range(len(stories)))
  rng.shuffle(order)
  items = []
  for index in order:
    cut = cut_mid_sentence(stories[index], rng)
    if cut is None:
      continue
    items.append(Completion(
        id=f"reference-{index:06d}", model=REFERENCE_MODEL, prompt=cut[0], completion=cut[1],
        source=",".join(paths)))
    if len(items) == count:
      break
  return items

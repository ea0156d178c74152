"""The team's evaluation prompts (package data) and the automatic probe check.

Sets, one JSONL file each under `grading/data/`, rows `{"id", "prompt"}` plus `answers` for probes:
  stories    story beginnings cut mid-sentence, graded by the LLM teacher;
  factual    probes of world knowledge (the paper's "factual knowledge" prompts);
  reasoning  probes of simple cause and effect;
  context    probes that need a name or object mentioned earlier (context tracking);
  instruct   TinyStoriesInstruct prefixes (words, a sentence, features, a summary; random
             subsets) for the instruction-following evaluation with the `instruct` rubric.
Each probe has one right continuation, so it is checked without a grader: the continuation's
first words must contain one of the accepted answers.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from typing import Any

EVAL_SETS = {
    "stories": "story_beginnings.jsonl",
    "factual": "probes_factual.jsonl",
    "reasoning": "probes_reasoning.jsonl",
    "context": "probes_context.jsonl",
    "instruct": "instruct_eval.jsonl",
}
# What `launch/eval.sh` samples for each rubric.
SETS_FOR_RUBRIC = {"story": ("stories", "factual", "reasoning", "context"),
                   "instruct": ("instruct",)}
PROBE_SETS = ("factual", "reasoning", "context")
# How far into the continuation the answer may appear ("went straight to his bed").
PROBE_WINDOW_WORDS = 6


def eval_set_path(name: str) -> str:
  """Filesystem path of a packaged eval set, for `sample --prompts_file`."""
  if name not in EVAL_SETS:
    raise ValueError(f"Unknown eval set {name!r}; choose one of {', '.join(EVAL_SETS)}.")
  return str(importlib.resources.files("tinystories_jax.grading") / "data" / EVAL_SETS[name])


@functools.cache
def load_eval_set(name: str) -> tuple[dict[str, Any], ...]:
  """The rows of a packaged eval set."""
  with open(eval_set_path(name), encoding="utf-8") as f:
    return tuple(json.loads(line) for line in f if line.strip())


def _prompt_key(prompt: str) -> str:
  return " ".join(prompt.split())


@functools.cache
def _prompt_index() -> dict[str, tuple[str, dict[str, Any]]]:
  index = {}
  for name in EVAL_SETS:
    for row in load_eval_set(name):
      index[_prompt_key(row["prompt"])] = (name, row)
  return index


def find_prompt(prompt: str) -> tuple[str, dict[str, Any]] | None:
  """(set name, row) when `prompt` is one of the packaged eval prompts, else None."""
  return _prompt_index().get(_prompt_key(prompt))


def find_probe(prompt: str) -> tuple[str, dict[str, Any]] | None:
  """(set name, probe row) when `prompt` is one of the packaged probes, else None."""
  found = find_prompt(prompt)
  return found if found is not None and found[0] in PROBE_SETS else None


def _words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+(?:['’][a-z]+)?", text.lower().replace("’", "'"))


def check_probe(completion: str, answers: list[str]) -> dict[str, Any]:
  """Whether the continuation's first words contain an accepted answer.

  Returns:
    {"correct": bool, "matched": the answer found or None, "answers": answers}.
  """
  head = _words(completion)[:PROBE_WINDOW_WORDS]
  for answer in answers:
    target = _words(answer)
    for start in range(len(head) - len(target) + 1):
      if target and head[start:start + len(target)] == target:
        return {"correct": True, "matched": answer, "answers": list(answers)}
  return {"correct": False, "matched": None, "answers": list(answers)}


def write_prompts(path: str, names: tuple[str, ...] = SETS_FOR_RUBRIC["story"]) -> int:
  """Writes the named sets as one prompts file for `sample --prompts_file`; returns rows.

  Rows are `{"id", "prompt", "set"}`; the grader recognises probes again by their prompt.
  """
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for name in names:
      for row in load_eval_set(name):
        f.write(json.dumps({"id": row["id"], "prompt": row["prompt"], "set": name}) + "\n")
        count += 1
  return count

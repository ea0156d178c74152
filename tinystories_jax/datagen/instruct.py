"""The TinyStoriesInstruct training layout: instruction lines, then the story.

  Features: Dialogue, Twist
  Words: run, ball, happy
  Summary: Lily and Tom play with a ball until the sun goes down.
  Random sentence: Lily smiled and said yes.
  Story:
  Once upon a time, ...

Each instruction line is present or absent at random (chosen in the story's plan), so a model
trained on it learns to follow any subset. `parse` is the inverse of `render`.
"""

from __future__ import annotations

import dataclasses
import random
import re

FIELDS = ("Features", "Words", "Summary", "Random sentence")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]+[\"”']?")


@dataclasses.dataclass(frozen=True)
class Instructions:
  """The instruction lines of one example (None: the line is absent)."""
  features: tuple[str, ...] | None = None
  words: tuple[str, ...] | None = None
  summary: str | None = None
  random_sentence: str | None = None


def render(instructions: Instructions, story: str) -> str:
  """The training text for one story."""
  lines = []
  if instructions.features is not None:
    lines.append("Features: " + ", ".join(instructions.features))
  if instructions.words is not None:
    lines.append("Words: " + ", ".join(instructions.words))
  if instructions.summary is not None:
    lines.append("Summary: " + _one_line(instructions.summary))
  if instructions.random_sentence is not None:
    lines.append("Random sentence: " + _one_line(instructions.random_sentence))
  lines.append("Story: ")
  return "\n".join(lines) + "\n" + story.strip()


def parse(text: str) -> tuple[Instructions, str]:
  """Splits a rendered example back into its instructions and story.

  Raises:
    ValueError: when there is no `Story:` line.
  """
  head, sep, story = text.partition("Story: \n")
  if not sep:
    head, sep, story = text.partition("Story:\n")
  if not sep:
    raise ValueError("not an Instruct example: no 'Story:' line")
  values = {}
  for line in head.splitlines():
    name, colon, value = line.partition(": ")
    if colon and name in FIELDS:
      values[name] = value
  split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
  return Instructions(
      features=split(values["Features"]) if "Features" in values else None,
      words=split(values["Words"]) if "Words" in values else None,
      summary=values.get("Summary"),
      random_sentence=values.get("Random sentence"),
  ), story


def _one_line(text: str) -> str:
  return " ".join(text.split())


def sentences(story: str) -> list[str]:
  """The story's sentences, whitespace-normalised."""
  return [_one_line(s) for s in _SENTENCE.findall(story) if len(s.split()) >= 3]


def pick_sentence(story: str, seed: int) -> str | None:
  """One sentence of the story, chosen with `seed`; None if it has none."""
  found = sentences(story)
  return random.Random(seed).choice(found) if found else None

"""What the grader is told, and how its answers are read.

The protocol follows the TinyStories paper (Eldan & Li 2023, section 3): the grader sees the
story's beginning, a `***` separator and the student's continuation; in a first turn it writes a
short assessment as a teacher would, and in a second turn, with its own assessment in the
conversation, it gives numeric scores (1-10) and guesses the student's age group. The wording
below is ours. Any change to a rubric's text must bump its `version`: the version goes into every
result and into the resume key, so old and new grades are never mixed up.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from tinystories_jax.grading.client import UnusableAnswer

AGE_GROUPS = {
    "A": "3 or under",
    "B": "4-5",
    "C": "6-7",
    "D": "8-9",
    "E": "10-12",
    "F": "13-16",
}
SCORE_MIN, SCORE_MAX = 1, 10
SEPARATOR = "***"


@dataclasses.dataclass(frozen=True)
class Rubric:
  """A two-turn grading protocol.

  Attributes:
    name: short name used by `--rubric`.
    version: goes into every result row and the resume key.
    system: the system message.
    first_turn: asks for the written assessment; `{placeholders}` are filled by `render`.
    second_turn: asks for the scores as JSON.
    score_names: the 1-10 scores the second turn must give.
    age_group: whether the second turn must also guess the age group.
  """
  name: str
  version: str
  system: str
  first_turn: str
  second_turn: str
  score_names: tuple[str, ...]
  age_group: bool = True

  @property
  def tag(self) -> str:
    return f"{self.name}@{self.version}"

  def first_messages(self, **fields: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": self.system},
        {"role": "user", "content": render(self.first_turn, **fields)},
    ]

  def second_messages(
      self, first: list[dict[str, str]], assessment: str) -> list[dict[str, str]]:
    return first + [
        {"role": "assistant", "content": assessment},
        {"role": "user", "content": self.second_turn},
    ]

  def json_schema(self) -> dict[str, Any]:
    properties: dict[str, Any] = {name: {"type": "integer"} for name in self.score_names}
    if self.age_group:
      properties["age_group"] = {"type": "string", "enum": sorted(AGE_GROUPS)}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }

  def response_format(self) -> dict[str, Any]:
    # Strict structured output keeps to the schema subset every OpenAI model accepts; the
    # 1-10 range is checked by `parse_scores`, which also serves endpoints without it.
    return {
        "type": "json_schema",
        "json_schema": {"name": f"{self.name}_grades", "strict": True,
                        "schema": self.json_schema()},
    }

  def parse_scores(self, text: str) -> dict[str, Any]:
    """Reads the second-turn answer: JSON if there is any, else labelled numbers in prose.

    Returns:
      {"scores": {name: int}, "age_group": letter or None}.

    Raises:
      UnusableAnswer: a score missing or outside 1-10, or an age group missing or unknown.
    """
    found = _scores_from_json(text, self) or _scores_from_prose(text, self)
    scores = {}
    for name in self.score_names:
      value = found.get(name)
      if value is None:
        raise UnusableAnswer(f"no {name} score in the answer")
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UnusableAnswer(f"{name} score {value!r} is not a number")
      if not SCORE_MIN <= value <= SCORE_MAX:
        raise UnusableAnswer(f"{name} score {value:g} is outside {SCORE_MIN}-{SCORE_MAX}")
      scores[name] = int(value) if float(value).is_integer() else float(value)
    age = None
    if self.age_group:
      age = found.get("age_group")
      if age is None:
        raise UnusableAnswer("no age group in the answer")
      age = str(age).strip().upper()[:1]
      if age not in AGE_GROUPS:
        raise UnusableAnswer(f"age group {found.get('age_group')!r} is not one of A-F")
    return {"scores": scores, "age_group": age}

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"json_schema": self.json_schema()}


def render(template: str, **fields: str) -> str:
  """Fills `{name}` placeholders; other braces (JSON examples) are left alone."""
  def fill(match: re.Match) -> str:
    name = match.group(1)
    return fields[name] if name in fields else match.group(0)
  return re.sub(r"\{([a-z_]+)\}", fill, template)


def _canonical(name: str) -> str:
  return re.sub(r"[^a-z]", "", name.lower())


def _scores_from_json(text: str, rubric: Rubric) -> dict[str, Any]:
  """The first JSON object in `text` that names any wanted field, keys normalised."""
  wanted = {_canonical(n): n for n in rubric.score_names}
  wanted["agegroup"] = "age_group"
  wanted["age"] = "age_group"
  decoder = json.JSONDecoder()
  for match in re.finditer(r"\{", text):
    try:
      obj, _ = decoder.raw_decode(text, match.start())
    except json.JSONDecodeError:
      continue
    if not isinstance(obj, dict):
      continue
    found = {}
    for key, value in obj.items():
      name = wanted.get(_canonical(str(key)))
      if name is not None:
        found[name] = _number(value) if name != "age_group" else value
    if found:
      return found
  return {}


def _number(value: Any) -> Any:
  if isinstance(value, str):
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", value)
    if match:
      return float(match.group(1))
  return value


def _scores_from_prose(text: str, rubric: Rubric) -> dict[str, Any]:
  """Labelled numbers such as `Grammar: 8/10` or `**Plot**: 6`, and `Age group: C`."""
  found: dict[str, Any] = {}
  for name in rubric.score_names:
    label = r"[\s_-]*".join(re.escape(part) for part in name.split("_"))
    # The first number after the label on the same line, e.g. "Consistency with the
    # beginning: 7" or "Plot - 6/10".
    match = re.search(label + r"[^\d\n]{0,60}?(-?\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
    if match:
      found[name] = float(match.group(1))
  if rubric.age_group:
    match = re.search(r"age[\s_-]*group\W{0,6}?(?:is\s+)?\(?([A-Fa-f])\b", text,
                      flags=re.IGNORECASE)
    if match:
      found["age_group"] = match.group(1)
  return found


STORY = Rubric(
    name="story",
    version="1",
    system=(
        "You are an experienced primary-school teacher. You mark short pieces of writing "
        "fairly and briefly, the way you would mark a pupil's exercise book."),
    first_turn=(
        "A pupil was given the beginning of a story and asked to continue it. The beginning "
        "stops in the middle of a sentence, so the pupil's first task was to finish that "
        "sentence. Below, the symbol *** marks the place where the given beginning ends and "
        "the pupil's own writing starts.\n\n"
        "{beginning}***{completion}\n\n"
        "Write a short overall assessment of the pupil's work, in a few sentences. Say how good "
        "the grammar and spelling are, whether the continuation fits the characters and events "
        "of the beginning, and how well the pupil finished the sentence that was cut off."),
    second_turn=(
        "Now mark the pupil's work. Give a whole-number score from 1 (very poor) to 10 "
        "(excellent) for each of: grammar; creativity; consistency with the beginning of the "
        "story; plot (does the story hang together and make sense). Then guess how old the "
        "pupil is: A: 3 or under, B: 4-5, C: 6-7, D: 8-9, E: 10-12, F: 13-16.\n"
        "Answer with one JSON object and nothing else, for example: "
        '{"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6, "age_group": "C"}'),
    score_names=("grammar", "creativity", "consistency", "plot"),
)

INSTRUCT = Rubric(
    name="instruct",
    version="1",
    system=STORY.system,
    first_turn=(
        "A pupil was asked to write a short story for young children that follows these "
        "instructions:\n\n{instructions}\n\nThis is the pupil's story:\n\n{completion}\n\n"
        "Write a short overall assessment of the story, in a few sentences. Go through the "
        "instructions one by one and say whether the story follows each of them; then say how "
        "good the grammar is and whether the story makes sense."),
    second_turn=(
        "Now mark the pupil's work. Give a whole-number score from 1 (very poor) to 10 "
        "(excellent) for each of: instructions (how well the story follows all of the "
        "instructions); grammar; consistency (the story does not contradict itself); plot (the "
        "story hangs together and makes sense).\n"
        "Answer with one JSON object and nothing else, for example: "
        '{"instructions": 6, "grammar": 8, "consistency": 7, "plot": 6}'),
    score_names=("instructions", "grammar", "consistency", "plot"),
    age_group=False,
)

RUBRICS = {STORY.name: STORY, INSTRUCT.name: INSTRUCT}

"""The packaged eval sets and the automatic probe check."""

import os

import pytest

from tinystories_jax.grading import evalsets


def test_story_beginnings_are_many_distinct_and_cut_mid_sentence():
  rows = evalsets.load_eval_set("stories")
  assert len(rows) >= 50
  assert len({r["id"] for r in rows}) == len(rows)
  assert len({r["prompt"] for r in rows}) == len(rows)
  for row in rows:
    assert not row["prompt"].rstrip().endswith((".", "!", "?")), row["id"]
    assert len(row["prompt"].split()) >= 10, row["id"]


@pytest.mark.parametrize("name", evalsets.PROBE_SETS)
def test_probe_sets_have_answers(name):
  rows = evalsets.load_eval_set(name)
  assert len(rows) >= 10
  for row in rows:
    assert row["answers"] and all(isinstance(a, str) and a for a in row["answers"])
    assert evalsets.find_probe(row["prompt"]) == (name, row)


def test_eval_set_path_exists_and_unknown_name_is_clear():
  assert os.path.isfile(evalsets.eval_set_path("factual"))
  with pytest.raises(ValueError, match="choose one of"):
    evalsets.eval_set_path("nope")


def test_story_prompt_is_not_a_probe():
  assert evalsets.find_probe(evalsets.load_eval_set("stories")[0]["prompt"]) is None


@pytest.mark.parametrize("completion,answers,correct", [
    (" bed and slept all night.", ["bed", "sleep"], True),
    (" her bed.", ["bed"], True),
    (" the kitchen. Later she went to bed.", ["bed"], False),
    (" red car, and he was happy.", ["red car"], True),
    (" Jack's balloon.", ["jack's"], True),
    (" car and a red hat", ["red car"], False),
])
def test_check_probe(completion, answers, correct):
  assert evalsets.check_probe(completion, answers)["correct"] is correct


def test_write_prompts_holds_every_set(tmp_path):
  path = tmp_path / "prompts.jsonl"
  count = evalsets.write_prompts(str(path))
  rows = [__import__("json").loads(line) for line in path.read_text().splitlines()]
  story_sets = evalsets.SETS_FOR_RUBRIC["story"]
  assert count == len(rows) == sum(len(evalsets.load_eval_set(n)) for n in story_sets)
  assert {r["set"] for r in rows} == set(story_sets)
  evalsets.write_prompts(str(path), evalsets.SETS_FOR_RUBRIC["instruct"])
  assert all(line.count("Story: ") == 1 for line in path.read_text().splitlines())

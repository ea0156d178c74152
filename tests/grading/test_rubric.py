"""The rubric's messages and the reading of grader answers (structured and free text)."""

import json

import pytest

from tinystories_jax.grading.client import UnusableAnswer
from tinystories_jax.grading.rubric import STORY, render


def test_first_turn_shows_beginning_separator_and_completion():
  messages = STORY.first_messages(beginning="Tom saw a", completion=" big dog.")
  assert messages[0]["role"] == "system"
  assert "Tom saw a*** big dog." in messages[1]["content"]
  assert "{beginning}" not in messages[1]["content"]


def test_second_turn_carries_the_assessment():
  first = STORY.first_messages(beginning="a", completion="b")
  second = STORY.second_messages(first, "Good work.")
  assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
  assert second[2]["content"] == "Good work."
  assert "age" in second[3]["content"].lower()


def test_render_leaves_json_braces_and_inserts_text_once():
  out = render('{a} and {"x": 1} {b}', a="{b}", b="B")
  assert out == '{b} and {"x": 1} B'


def test_response_format_is_strict_json_schema():
  fmt = STORY.response_format()
  schema = fmt["json_schema"]["schema"]
  assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
  assert set(schema["required"]) == {"grammar", "creativity", "consistency", "plot", "age_group"}
  assert schema["additionalProperties"] is False


@pytest.mark.parametrize("text", [
    '{"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5, "age_group": "C"}',
    'Sure!\n```json\n{"Grammar": "8/10", "Creativity": 6, "Consistency": 7, "Plot": 5, '
    '"Age group": "C: 6-7"}\n```',
    "Grammar: 8/10\nCreativity: 6/10\nConsistency with the beginning: 7\nPlot - 5\n"
    "Age group: C (6-7)",
    "**Grammar**: 8\n**Creativity**: 6\n**Consistency**: 7\n**Plot**: 5\n**Age group**: c",
])
def test_parse_scores_from_json_and_prose(text):
  parsed = STORY.parse_scores(text)
  assert parsed == {"scores": {"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5},
                    "age_group": "C"}


@pytest.mark.parametrize("text,reason", [
    ('{"grammar": 8, "creativity": 6, "consis', "consistency"),
    ('{"grammar": 11, "creativity": 6, "consistency": 7, "plot": 5, "age_group": "C"}',
     "outside 1-10"),
    ('{"grammar": 0, "creativity": 6, "consistency": 7, "plot": 5, "age_group": "C"}',
     "outside 1-10"),
    ('{"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5}', "age group"),
    ('{"grammar": 8, "creativity": 6, "consistency": 7, "plot": 5, "age_group": "Z"}',
     "not one of A-F"),
    ("The story was lovely and I enjoyed it.", "no grammar score"),
    ('{"grammar": "good", "creativity": 6, "consistency": 7, "plot": 5, "age_group": "C"}',
     "not a number"),
])
def test_parse_scores_rejects_incomplete_or_out_of_range(text, reason):
  with pytest.raises(UnusableAnswer, match=reason):
    STORY.parse_scores(text)


def test_rubric_dict_has_version_and_texts():
  data = STORY.as_dict()
  assert data["version"] == STORY.version
  json.dumps(data)
  assert "***" in data["first_turn"]

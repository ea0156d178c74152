"""The instruction-following evaluation: the eval set, automatic checks, the instruct rubric."""

import json

from tinystories_jax.datagen import instruct
from tinystories_jax.grading import evalsets, instruct_eval
from tinystories_jax.grading.rubric import INSTRUCT

from .conftest import read_rows, run_grade, write_jsonl

STORY = ("Tom liked to run in the park. He had a red ball. \"Look!\" said Tom. The sun was "
         "shining and the birds were singing. Tom was happy.")


def test_eval_set_prompts_are_instruct_prefixes_with_their_instructions():
  rows = evalsets.load_eval_set("instruct")
  assert len(rows) >= 20
  for row in rows:
    parsed = instruct_eval.instructions_of(row["prompt"])
    given = row["instructions"]
    assert parsed.summary == given["summary"]
    assert parsed.random_sentence == given["random_sentence"]
    assert (list(parsed.words) if parsed.words else None) == given["words"]
    assert any(v is not None for v in given.values())


def test_automatic_checks_accept_word_forms_and_exact_sentences():
  given = instruct.Instructions(words=("run", "ball", "happy"),
                                random_sentence="The sun was shining and the birds were singing.")
  assert instruct_eval.automatic_checks(given, STORY) == {"words_present": True,
                                                          "sentence_present": True}
  assert instruct_eval.automatic_checks(given, STORY.replace("ball", "kite").replace(
      "shining", "out")) == {"words_present": False, "sentence_present": False}
  assert instruct_eval.automatic_checks(
      instruct.Instructions(words=("swim",)), "They swam all day.")["words_present"]
  assert instruct_eval.automatic_checks(instruct.Instructions(summary="x"), STORY) == {}


def test_describe_names_every_instruction():
  text = instruct_eval.describe(instruct.Instructions(
      features=("Dialogue",), words=("a", "b"), summary="S.", random_sentence="R."))
  assert "a, b" in text and '"R."' in text and "dialogue" in text and "S." in text


def test_grade_with_the_instruct_rubric(server, fake, tmp_path):
  del fake
  rows = []
  for i, item in enumerate(evalsets.load_eval_set("instruct")[:8]):
    given = item["instructions"]
    follows = i % 2 == 0
    parts = ["Once upon a time there was a girl."]
    if follows and given["words"]:
      parts.append("She would " + " and ".join(given["words"]) + " all day.")
    if follows and given["random_sentence"]:
      parts.append(given["random_sentence"])
    rows.append({"id": item["id"], "prompt": item["prompt"], "completion": " ".join(parts),
                 "model": "instruct-model"})
  path = write_jsonl(tmp_path / "c.jsonl", rows)
  out = tmp_path / "out"
  result = run_grade([f"--completions={path}", f"--output_dir={out}", "--rubric=instruct",
                      f"--base_url={server.base_url}", "--backoff=0.01"])
  assert result.returncode == 0, result.stderr
  grades = read_rows(out / "grades.jsonl")
  assert all(g["status"] == "ok" and g["rubric"] == "instruct" for g in grades)
  assert all(set(g["scores"]) == set(INSTRUCT.score_names) and g["age_group"] is None
             for g in grades)
  for row, grade in zip(sorted(rows, key=lambda r: r["id"]), sorted(grades, key=lambda g: g["id"])):
    follows = int(row["id"].split("-")[1]) % 2 == 1  # ids count from 1, rows from 0.
    for passed in grade["auto_checks"].values():
      assert passed is follows
  summary = json.loads((out / "summary.json").read_text())
  checks = summary["models"]["instruct-model"]["auto_checks"]
  assert checks and all(c["total"] >= c["passed"] for c in checks.values())
  assert summary["rubric"] == "instruct"
  report = (out / "report.md").read_text()
  assert "Automatic instruction checks" in report and "instructions" in report

"""Reading completions files and cutting dataset stories into a reference set."""

import random

import pytest

from tinystories_jax.grading import completions

from .conftest import write_jsonl


def test_reads_rows_with_extra_fields(tmp_path):
  path = write_jsonl(tmp_path / "c.jsonl", [
      {"id": 1, "prompt": "A", "completion": "b", "model": "m", "sampler": {"t": 1}, "x": 2},
      {"id": "2", "prompt": "C", "completion": "d"}])
  rows = completions.read_completions([path])
  assert [r.id for r in rows] == ["1", "2"]
  assert rows[0].model == "m" and rows[0].sampler == {"t": 1}
  assert rows[1].model == "c"  # The file name stands in for a missing model.


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "A", "completion": "b"}], "no 'id' field"),
    ([{"id": 1, "prompt": "A"}], "no 'completion' field"),
    ([{"id": 1, "prompt": "A", "completion": "b"}, {"id": 1, "prompt": "A", "completion": "c"}],
     "repeats id '1'"),
])
def test_bad_rows_are_clear_errors(tmp_path, rows, message):
  path = write_jsonl(tmp_path / "c.jsonl", rows)
  with pytest.raises(completions.InputError, match=message) as info:
    completions.read_completions([path])
  assert "line" in str(info.value)


def test_not_json_and_missing_file(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text("{not json\n")
  with pytest.raises(completions.InputError, match="line 1 is not valid JSON"):
    completions.read_completions([str(path)])
  with pytest.raises(completions.InputError, match="does not exist"):
    completions.read_completions([str(tmp_path / "missing.jsonl")])


def test_same_model_and_id_in_two_files_is_an_error(tmp_path):
  row = {"id": 1, "prompt": "A", "completion": "b", "model": "m"}
  a = write_jsonl(tmp_path / "a.jsonl", [row])
  b = write_jsonl(tmp_path / "b.jsonl", [row])
  with pytest.raises(completions.InputError, match="its own model name"):
    completions.read_completions([a, b])


STORY = ("Tom had a big red ball. One day he kicked the ball over the high fence. He was sad "
         "and went to ask his mom for help. Mom smiled and they got the ball back together.")


def test_cut_mid_sentence_splits_inside_a_sentence():
  for seed in range(20):
    beginning, rest = completions.cut_mid_sentence(STORY, random.Random(seed))
    assert (beginning + " " + rest.strip()) == STORY
    assert not beginning.endswith((".", "!", "?"))
    assert beginning.count(".") >= 1  # At least one whole sentence of context.


def test_reference_completions_from_jsonl_and_txt(tmp_path):
  jsonl = write_jsonl(tmp_path / "s.jsonl", [{"text": STORY}, {"story": STORY + " Yay."}])
  txt = tmp_path / "s.txt"
  txt.write_text(STORY + "\n<|endoftext|>\n" + STORY + " The end.\n<|endoftext|>\n")
  assert len(list(completions.iter_story_texts([jsonl, str(txt)]))) == 4
  items = completions.reference_completions([jsonl, str(txt)], count=3, seed=1)
  assert len(items) == 3
  assert {i.model for i in items} == {completions.REFERENCE_MODEL}
  assert items == completions.reference_completions([jsonl, str(txt)], count=3, seed=1)


def test_reference_unknown_suffix_is_clear(tmp_path):
  path = tmp_path / "s.csv"
  path.write_text("x")
  with pytest.raises(completions.InputError, match=r"\.jsonl or \.txt"):
    list(completions.iter_story_texts([str(path)]))


def test_reference_cut_on_real_tinystories(shared_data):
  paths = [str(shared_data / "train.jsonl"), str(shared_data / "original_format_sample.txt")]
  items = completions.reference_completions(paths, count=200, seed=0)
  assert len(items) == 200
  for item in items:
    assert not item.prompt.endswith((".", "!", "?"))
    assert item.completion.startswith(" ") and len(item.completion.split()) >= 2

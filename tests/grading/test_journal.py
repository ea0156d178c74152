"""The append-only results file: keys, torn tails, resumption."""

from tinystories_jax.grading.journal import Journal, content_key, read_rows


def test_content_key_is_stable_and_sensitive():
  assert content_key("a", 1) == content_key("a", 1)
  assert content_key("a", 1) != content_key("a", 2)


def test_append_then_reopen_sees_rows_and_keys(tmp_path):
  path = str(tmp_path / "out" / "grades.jsonl")
  with Journal(path) as journal:
    journal.append({"key": "k1", "v": 1})
    journal.append({"key": "k2", "v": "é"})
  with Journal(path) as journal:
    assert journal.keys == {"k1", "k2"}
    assert [r["v"] for r in journal.rows] == [1, "é"]


def test_torn_last_line_is_cut_off_and_the_row_redone(tmp_path):
  path = tmp_path / "grades.jsonl"
  path.write_text('{"key": "k1"}\n{"key": "k2", "v"')
  with Journal(str(path)) as journal:
    assert journal.keys == {"k1"}
    journal.append({"key": "k2", "v": 2})
  assert [r["key"] for r in read_rows(str(path))] == ["k1", "k2"]
  assert path.read_text().count("\n") == 2


def test_file_without_any_newline_is_emptied(tmp_path):
  path = tmp_path / "grades.jsonl"
  path.write_text('{"key": "k1"')
  with Journal(str(path)) as journal:
    assert not journal.rows
  assert path.read_text() == ""

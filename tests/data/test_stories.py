"""Reading every input layout, and clear errors for broken input."""

import gzip
import json
import os
import tarfile

import pytest

from tinystories_jax.data import stories
from tinystories_jax.data.errors import DataError

A = "Once upon a time, a cat sat.\nThe end."
B = "Tom had a red ball. He kicked it far."


def _txt(stories_list):
  return "".join(s + "\n<|endoftext|>\n" for s in stories_list)


def _texts(spec):
  return [s.text.strip() for s in stories.iter_stories(stories.resolve(spec))]


def test_txt_jsonl_json_and_gzip(tmp_path):
  (tmp_path / "a.txt").write_text(_txt([A, B]))
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": A}) + "\n\n" + json.dumps({"story": B}) + "\n")
  (tmp_path / "c.json").write_text(json.dumps([{"story": A, "instruction": {}, "summary": "s",
                                                "source": "GPT-4"}, {"story": B}]))
  with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
    f.write(_txt([B]))
  with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
    f.write(json.dumps({"text": A}) + "\n")
  assert _texts(str(tmp_path / "a.txt")) == [A, B]
  assert _texts(str(tmp_path / "b.jsonl")) == [A, B]
  assert _texts(str(tmp_path / "c.json")) == [A, B]
  assert _texts(str(tmp_path / "d.txt.gz")) == [B]
  assert _texts(str(tmp_path / "e.jsonl.gz")) == [A]
  # A directory expands sorted; a glob too; a comma-separated mix keeps the order given.
  assert _texts(str(tmp_path)) == [A, B, A, B, A, B, B, A]
  assert _texts(str(tmp_path / "*.jsonl*")) == [A, B, A]
  assert _texts(f"{tmp_path / 'd.txt.gz'},{tmp_path / 'a.txt'}") == [B, A, B]


def test_txt_without_trailing_separator_keeps_last_story(tmp_path):
  (tmp_path / "a.txt").write_text(A + "\n<|endoftext|>\n" + B + "\n")
  assert _texts(str(tmp_path / "a.txt")) == [A, B]


def test_tarball_of_json_files(tmp_path):
  for i, s in enumerate([A, B]):
    (tmp_path / f"data{i:02d}.json").write_text(json.dumps([{"story": s}]))
  tar_path = tmp_path / "TinyStories_all_data.tar.gz"
  with tarfile.open(tar_path, "w:gz") as tar:
    for i in range(2):
      tar.add(tmp_path / f"data{i:02d}.json", arcname=f"data{i:02d}.json")
  assert _texts(str(tar_path)) == [A, B]
  where = [s.where for s in stories.read_file(tar_path)]
  assert where[0].endswith("data00.json[0]")


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    stories.resolve(str(tmp_path / "nope.txt"))


def test_unknown_format_and_empty_dir(tmp_path):
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(DataError, match="unknown format"):
    stories.resolve(str(tmp_path / "x.csv"))
  with pytest.raises(DataError, match="holds no story files"):
    stories.resolve(str(tmp_path))
  with pytest.raises(DataError, match="matches no story files"):
    stories.resolve(str(tmp_path / "*.txt"))


def test_corrupt_gzip(tmp_path):
  good = gzip.compress(_txt([A, B] * 200).encode())
  (tmp_path / "bad.txt.gz").write_bytes(good[: len(good) // 2])
  (tmp_path / "junk.jsonl.gz").write_bytes(b"this is not gzip at all")
  for name in ("bad.txt.gz", "junk.jsonl.gz"):
    with pytest.raises(DataError, match="gzip"):
      list(stories.read_file(tmp_path / name))


def test_malformed_json_line_names_the_line(tmp_path):
  (tmp_path / "a.jsonl").write_text(json.dumps({"text": A}) + "\n" + '{"text": "broken\n')
  with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
    list(stories.read_file(tmp_path / "a.jsonl"))
  (tmp_path / "b.jsonl").write_text(json.dumps({"title": "x"}) + "\n")
  with pytest.raises(DataError, match=r"b\.jsonl:1: .*no string 'text' or 'story'"):
    list(stories.read_file(tmp_path / "b.jsonl"))


def test_not_utf8(tmp_path):
  (tmp_path / "a.txt").write_bytes("caf\u00e9".encode("latin-1") + b"\n")
  with pytest.raises(DataError, match="not UTF-8"):
    list(stories.read_file(tmp_path / "a.txt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text(A)
  p.chmod(0)
  with pytest.raises(DataError, match="permission denied"):
    list(stories.read_file(p))


def test_hub_source_from_prefilled_cache(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  # The layout huggingface_hub keeps on disk: a snapshot per commit and refs/main naming it.
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "hub" / "datasets--roneneldan--TinyStories"
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  (snap / "TinyStories-valid.txt").write_text(_txt([A, B]))
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  import huggingface_hub.constants as hf_constants  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  assert _texts("hf://roneneldan/TinyStories/TinyStories-valid.txt") == [A, B]
  with pytest.raises(DataError, match="could not fetch"):
    stories.resolve("hf://roneneldan/TinyStories/missing.txt")
  with pytest.raises(DataError, match="not a hub file"):
    stories.resolve("hf://roneneldan")


def test_real_original_format(shared_data):
  texts = _texts(str(shared_data / "original_format_sample.txt"))
  assert len(texts) == 374
  assert all("<|endoftext|>" not in t for t in texts)


def test_real_jsonl(shared_data):
  texts = _texts(str(shared_data / "train.jsonl"))
  assert len(texts) == 3558

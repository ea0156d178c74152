"""`prepare` end to end: outputs, reuse, refusal to mix, atomicity and the CLI's errors."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tinystories_jax.data import preparation
from tinystories_jax.data import synthetic
from tinystories_jax.data import tokenizer as tokenizer_lib
from tinystories_jax.data.errors import DataError


def _opts(out, **kw):
  base = dict(inputs="synthetic", output_dir=str(out), vocab_size=512, synthetic_stories=1500,
              num_workers=1, valid_fraction=0.05)
  base.update(kw)
  return preparation.PrepareOptions(**base)


def _digest(directory: pathlib.Path) -> dict:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  out = tmp_path_factory.mktemp("prep") / "data"
  meta = preparation.prepare(_opts(out))
  return out, meta


def test_outputs(prepared):
  out, meta = prepared
  assert {"metadata.json", "tokenizer.model", "train.tokens", "train.offsets.npy", "valid.tokens",
          "valid.offsets.npy", "cleaning_stats.json"} <= set(os.listdir(out))
  assert not (out / "clean").exists()
  assert not list(out.glob("*.tmp*"))
  assert meta["vocab_size"] == 512 and meta["token_dtype"] == "uint16"
  tok = tokenizer_lib.Tokenizer(out / "tokenizer.model")
  assert meta["tokenizer"]["sha256"] == tok.sha256
  all_stories = set(synthetic.generate(1500, seed=0))
  total = 0
  for split in ("train", "valid"):
    info = meta["splits"][split]
    tokens = np.fromfile(out / info["tokens_file"], dtype=np.uint16)
    offsets = np.load(out / info["offsets_file"])
    assert len(tokens) == info["tokens"] == offsets[-1]
    assert len(offsets) == info["stories"] + 1
    for i in [0, len(offsets) // 2, len(offsets) - 2]:
      story = tokens[offsets[i]:offsets[i + 1]]
      assert story[0] == tok.bos_id and story[-1] == tok.eos_id
      assert tok.decode(story) in all_stories
    total += info["stories"]
  assert total == 1500
  assert 0 < meta["splits"]["valid"]["stories"] < 200
  assert meta["inputs"]["train"][0]["name"] == "synthetic"
  assert meta["cleaning"]["train"]["input"] == 1500


def test_rerun_reuses_everything(prepared):
  out, meta = prepared
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  again = preparation.prepare(_opts(out))
  assert again == meta
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_other_tokenizer_refused_and_nothing_damaged(prepared):
  out, _ = prepared
  before = _digest(out)
  with pytest.raises(DataError, match="another tokenizer.*--overwrite"):
    preparation.prepare(_opts(out, vocab_size=600))
  assert _digest(out) == before


def test_failed_overwrite_leaves_the_old_directory_usable(tmp_path):
  """--overwrite with a vocabulary the corpus cannot hold fails before any new tokenizer or
  shard is written: the old metadata and shards stay, and rerunning the old command reuses
  them."""
  out = tmp_path / "data"
  meta = preparation.prepare(_opts(out))
  before = _digest(out)
  with pytest.raises(DataError, match="more than this corpus supports"):
    preparation.prepare(_opts(out, vocab_size=30000, overwrite=True, seed=3))
  assert {k: v for k, v in _digest(out).items() if k != "clean"} == {
      k: v for k, v in before.items() if k != "clean"}
  assert preparation.prepare(_opts(out)) == meta


def test_given_tokenizer_needs_story_framing_and_pads_with_eos_without_pad(tmp_path):
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  stories = list(synthetic.generate(300, seed=2))

  def sp_model(path, **ids):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(stories), model_prefix=str(path),
                                   vocab_size=300, model_type="bpe", **ids)
    return str(path) + ".model"

  no_bos = sp_model(tmp_path / "nobos", bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0)
  with pytest.raises(DataError, match="no beginning- or end-of-story piece.*drop --tokenizer"):
    preparation.prepare(_opts(tmp_path / "a", tokenizer=no_bos, vocab_size=0))
  assert not (tmp_path / "a" / "metadata.json").exists()
  # llama2.c's layout: unk 0, bos 1, eos 2, no pad piece.
  no_pad = sp_model(tmp_path / "nopad", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
  meta = preparation.prepare(_opts(tmp_path / "b", tokenizer=no_pad, vocab_size=0))
  assert meta["pad_id"] == meta["eos_id"] == 2


def test_interrupted_run_resumes_from_finished_stages(tmp_path):
  out = tmp_path / "data"
  meta = preparation.prepare(_opts(out, keep_clean_text=True))
  # Simulate a run killed while writing the token files: no metadata, a half file left behind.
  (out / "metadata.json").unlink()
  (out / "valid.tokens").unlink()
  (out / "train.tokens.tmp").write_bytes(b"\x00" * 10)
  tok_mtime = (out / "tokenizer.model").stat().st_mtime_ns
  again = preparation.prepare(_opts(out, keep_clean_text=True))
  assert again == meta
  assert (out / "tokenizer.model").stat().st_mtime_ns == tok_mtime  # reused, not retrained
  assert not (out / "train.tokens.tmp").exists()


def test_given_tokenizer_and_file_inputs(tmp_path, prepared, monkeypatch):
  src, _ = prepared
  monkeypatch.setattr(preparation, "_POOL_MIN_BYTES", 0)  # use worker processes even for this
  story_file = tmp_path / "stories.jsonl"
  with open(story_file, "w") as f:
    for s in synthetic.generate(60, seed=5):
      f.write(json.dumps({"story": s}) + "\n")
  valid_file = tmp_path / "valid.txt"
  valid_file.write_text("".join(s + "\n<|endoftext|>\n" for s in synthetic.generate(5, seed=9)))
  meta = preparation.prepare(preparation.PrepareOptions(
      inputs=str(story_file), valid_inputs=str(valid_file), output_dir=str(tmp_path / "out"),
      tokenizer=str(src / "tokenizer.model"), num_workers=2))
  assert meta["tokenizer"]["trained_here"] is False
  assert meta["splits"]["train"]["stories"] == 60
  assert meta["splits"]["valid"]["stories"] == 5
  assert meta["inputs"]["train"][0]["sha256"] == hashlib.sha256(story_file.read_bytes()).hexdigest()
  with pytest.raises(DataError, match="disagrees with the tokenizer"):
    preparation.prepare(preparation.PrepareOptions(
        inputs=str(story_file), valid_inputs=str(valid_file), output_dir=str(tmp_path / "o2"),
        tokenizer=str(src / "tokenizer.model"), vocab_size=4096))


def test_empty_corpus(tmp_path):
  (tmp_path / "e.jsonl").write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": "hi"}))
  with pytest.raises(DataError, match="empty after cleaning"):
    preparation.prepare(_opts(tmp_path / "out", inputs=str(tmp_path / "e.jsonl")))


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tinystories_jax.prepare", *args],
                        capture_output=True, text=True, env=env, timeout=120)


def test_cli_errors_are_one_sentence(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"text": "ok story with words"}\n{oops\n')
  (tmp_path / "a_file").write_text("")
  cases = [
      ([f"--input={tmp_path / 'missing.txt'}", f"--output_dir={tmp_path / 'o'}"], "does not exist"),
      (["--input=synthetic", "--synthetic_stories=50", f"--output_dir={tmp_path / 'a_file'}"],
       "is a directory this user can write"),
      (["--input=synthetic", "--synthetic_stories=40", "--vocab_size=512",
        f"--output_dir={tmp_path / 'v'}"],
       "the validation split is empty (40 stories, --valid_fraction=0.01 held out none)"),
      ([f"--input={tmp_path / 'bad.jsonl'}", f"--output_dir={tmp_path / 'o'}"],
       "bad.jsonl:2: malformed JSON"),
  ]
  for args, expected in cases:
    result = _cli(*args)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("prepare: ")


def test_cli_real_samples(tmp_path, shared_data):
  result = _cli(f"--input={shared_data / 'train.jsonl'},{shared_data / 'dirty.jsonl'}",
                f"--valid_input={shared_data / 'valid.jsonl'}", f"--output_dir={tmp_path / 'o'}",
                "--vocab_size=2048")
  assert result.returncode == 0, result.stderr
  meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
  assert meta["cleaning"]["train"]["encoding_repaired"] >= 257
  assert meta["splits"]["train"]["stories"] > 3500
  tok = tokenizer_lib.Tokenizer(tmp_path / "o" / "tokenizer.model")
  tokens = np.fromfile(tmp_path / "o" / "train.tokens", dtype=np.uint16)
  text = tok.decode(tokens[:5000])
  assert "\u00e2\u20ac" not in text

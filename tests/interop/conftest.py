"""Fixtures for interop tests: a tiny SentencePiece model and small random transformers models."""

import random

import pytest


def _corpus():
  rng = random.Random(0)
  words = ("once upon a time there was a little girl named lily she liked to play with her ball "
           "in the park sun dog cat happy sad big small tree Tom said hi").split()
  lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(1500)]
  lines += ["Café naïve — “quotes” 123 😀", 'Tom said, "Hi!"', "ﬁ full-width ＡＢ ①"]
  return "\n".join(lines)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
  """A 320-piece BPE SentencePiece model with byte fallback (like `prepare` trains)."""
  import sentencepiece as spm  # noqa: PLC0415

  d = tmp_path_factory.mktemp("sp")
  (d / "corpus.txt").write_text(_corpus(), encoding="utf-8")
  spm.SentencePieceTrainer.train(
      input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=320,
      model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
      eos_id=2, pad_id=3, minloglevel=2)
  return d / "tok.model"

"""SentencePiece training: round trips, determinism, special ids, and vocab errors."""

import pytest

from tinystories_jax.data import synthetic
from tinystories_jax.data import tokenizer as tokenizer_lib
from tinystories_jax.data.errors import DataError


@pytest.fixture(scope="module")
def corpus():
  numbers = [f"Tom counted {n} stars and {n + 17} sheep." for n in range(100, 400)]
  return list(synthetic.generate(1500, seed=3)) + numbers


@pytest.fixture(scope="module")
def model(corpus):
  return tokenizer_lib.train_sentencepiece(corpus, vocab_size=600, num_threads=1)


def test_round_trip_and_specials(corpus, model):
  tok = tokenizer_lib.Tokenizer(model)
  assert tok.vocab_size == 600
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
  for text in corpus[:200] + ["Digits 2024 and \u00fcnicode \u2603 fall back to bytes.\nNew line."]:
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode("One.\nTwo.")
  assert "\n" in [tok.id_to_piece(i) for i in ids]
  digits = [tok.id_to_piece(i) for i in tok.encode("x 123")]
  assert [p for p in digits if p.strip("\u2581").isdigit()] == ["1", "2", "3"]
  framed = tok.frame(tok.encode("Hi."))
  assert framed[0] == tok.bos_id and framed[-1] == tok.eos_id
  assert tok.decode(framed) == "Hi."


def test_deterministic(corpus, model):
  assert tokenizer_lib.train_sentencepiece(corpus, vocab_size=600, num_threads=1) == model
  # The thread count is recorded in the model file, but the pieces do not depend on it.
  other = tokenizer_lib.Tokenizer(
      tokenizer_lib.train_sentencepiece(corpus, vocab_size=600, num_threads=2))
  tok = tokenizer_lib.Tokenizer(model)
  assert [other.id_to_piece(i) for i in range(600)] == [tok.id_to_piece(i) for i in range(600)]


def test_vocab_too_large_for_corpus(corpus):
  with pytest.raises(DataError, match=r"more than this corpus supports \(at most \d+"):
    tokenizer_lib.train_sentencepiece(corpus[:30], vocab_size=5000, num_threads=1)


def test_vocab_too_small():
  with pytest.raises(DataError, match="too small"):
    tokenizer_lib.train_sentencepiece(["a story"], vocab_size=100)


def test_not_a_model(tmp_path):
  (tmp_path / "t.model").write_bytes(b"garbage")
  with pytest.raises(DataError, match="not a SentencePiece model"):
    tokenizer_lib.Tokenizer(tmp_path / "t.model")

"""The packaged basic vocabulary, user word files, and word forms."""

import pytest

from tinystories_jax.datagen import vocabulary

from .conftest import write_words


def test_packaged_vocabulary_is_about_1500_basic_words():
  vocab = vocabulary.packaged()
  assert 1400 <= len(vocab) <= 1600
  assert len(vocab.nouns) > len(vocab.verbs) > 100 and len(vocab.adjectives) > 100
  assert "dog" in vocab.nouns and "run" in vocab.verbs and "happy" in vocab.adjectives
  for words in (vocab.nouns, vocab.verbs, vocab.adjectives):
    assert len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() for w in words)


@pytest.mark.parametrize("word,pos,form", [
    ("dog", "nouns", "dogs"), ("box", "nouns", "boxes"), ("puppy", "nouns", "puppies"),
    ("mouse", "nouns", "mice"), ("leaf", "nouns", "leaves"),
    ("run", "verbs", "ran"), ("run", "verbs", "running"), ("hop", "verbs", "hopped"),
    ("bake", "verbs", "baking"), ("cry", "verbs", "cried"), ("go", "verbs", "went"),
    ("big", "adjectives", "bigger"), ("happy", "adjectives", "happiest"),
    ("happy", "adjectives", "happily"), ("good", "adjectives", "best"),
])
def test_word_forms(word, pos, form):
  assert form in vocabulary.word_forms(word, pos)


def test_user_word_file(tmp_path):
  vocab = vocabulary.load(write_words(tmp_path / "w.txt", nouns=("cat", "hat"),
                                      verbs=("sit",), adjectives=("red",)))
  assert vocab.nouns == ("cat", "hat") and vocab.verbs == ("sit",)


@pytest.mark.parametrize("text,message", [
    ("cat\n[nouns]\n", "before any section"),
    ("[animals]\ncat\n", "unknown section"),
    ("[nouns]\ncat\n[verbs]\nsit\n", "no adjectives"),
    ("[nouns]\ntwo words\n", "not a single word"),
])
def test_bad_word_files_are_clear(tmp_path, text, message):
  path = tmp_path / "w.txt"
  path.write_text(text)
  with pytest.raises(vocabulary.VocabularyError, match=message):
    vocabulary.load(str(path))
  with pytest.raises(vocabulary.VocabularyError, match="does not exist"):
    vocabulary.load(str(tmp_path / "missing.txt"))

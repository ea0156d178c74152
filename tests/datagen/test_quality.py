"""Rejection rules and corpus statistics."""

import pytest

from tinystories_jax.datagen import quality, vocabulary

GOOD = ("Once upon a time, there was a happy dog named Max. Max liked to play with his red "
        "ball in the park every day. One day, the ball rolled into a big puddle. Max was sad. "
        "His friend, a little bird, flew down and said, \"Do not be sad, Max. I will help you.\" "
        "Together they pushed the ball out of the puddle. Max was happy again, and they played "
        "until the sun went down.")
REQUIRED = {"verbs": "play", "nouns": "ball", "adjectives": "happy"}
LIMITS = quality.Limits(min_words=40, max_words=120)


@pytest.mark.parametrize("story,reason", [
    (GOOD, None),
    ("I'm sorry, but I can't write that story.", "refusal"),
    ("As an AI, I cannot do that. " + GOOD, "refusal"),
    ("Sure! Here is a story for you:\n\n" + GOOD, "chatter"),
    ("Title: Max and the Ball\n\n" + GOOD, "chatter"),
    (GOOD + "\n\nI hope you enjoyed this story!", "chatter"),
    ("**Max and the Happy Ball**\n\n" + GOOD, "chatter"),
    ("__Max and the Ball__\n" + GOOD, "chatter"),
    ("Max and the Happy Ball\n\n" + GOOD, "chatter"),
    # Paragraphs and dialogue are not titles.
    (GOOD.replace("Max was sad. ", "Max was sad.\n\n"), None),
    ("\"Let's play!\" said Max.\n\n" + GOOD, None),
    ("Il était une fois un chien très heureux qui s'appelait Max. " * 6, "not_english"),
    ("Max was happy. He played with his ball.", "too_short"),
    (GOOD + " " + GOOD, "too_long"),
    (GOOD.replace("ball", "toy"), "missing_word"),
])
def test_check_story(story, reason):
  assert quality.check_story(story, REQUIRED, LIMITS, set()) == reason


def test_duplicates_ignore_case_and_spacing():
  seen = {quality.fingerprint(GOOD)}
  assert quality.check_story(GOOD.upper(), REQUIRED, LIMITS, seen) == "duplicate"
  assert quality.check_story(GOOD.replace(" ", "  "), REQUIRED, LIMITS, seen) == "duplicate"


def test_corpus_stats():
  vocab = vocabulary.packaged()
  stats = quality.corpus_stats([GOOD, GOOD], vocab)
  assert stats.stories == 2
  assert 0 < stats.distinct_ngram_ratio[3] <= 0.5  # Every trigram appears twice.
  assert 0 <= stats.out_of_vocabulary_share < 0.1
  varied = quality.corpus_stats([GOOD, "The zebra sang a quiet song under the moon."], vocab)
  assert varied.distinct_ngram_ratio[3] > stats.distinct_ngram_ratio[3]

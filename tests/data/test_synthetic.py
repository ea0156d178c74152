"""The offline stand-in corpus: distinct, seeded, story-shaped."""

from tinystories_jax.data import synthetic


def test_ten_thousand_distinct_and_seeded():
  stories = list(synthetic.generate(10_000, seed=7))
  assert len(set(stories)) == 10_000
  assert list(synthetic.generate(50, seed=7)) == stories[:50]
  assert list(synthetic.generate(50, seed=8)) != stories[:50]


def test_stories_look_like_stories():
  for text in synthetic.generate(300, seed=0):
    paragraphs = text.split("\n")
    assert 3 <= len(paragraphs) <= 5
    assert "{" not in text and "}" not in text
    assert text.rstrip()[-1] in '.!?"'
    assert " named " in paragraphs[0]
    assert 40 <= len(text.split()) <= 300

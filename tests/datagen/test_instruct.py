"""The TinyStoriesInstruct layout: render -> parse round trip."""

import itertools

import pytest

from tinystories_jax.datagen import instruct

STORY = ('Lily had a red ball. She said, "Let us play!"\n\nTom smiled. They played all day.')


@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=4)))
def test_render_parse_round_trip_for_every_subset(present):
  given = instruct.Instructions(
      features=("Dialogue", "Twist") if present[0] else None,
      words=("play", "ball", "red") if present[1] else None,
      summary="Lily and Tom play with a ball." if present[2] else None,
      random_sentence="Tom smiled." if present[3] else None)
  text = instruct.render(given, STORY)
  assert text.splitlines()[sum(present)] == "Story: "
  parsed, story = instruct.parse(text)
  assert parsed == given
  assert story == STORY


def test_layout_lines():
  text = instruct.render(instruct.Instructions(words=("a", "b", "c"), summary="S."), "Story.")
  assert text == "Words: a, b, c\nSummary: S.\nStory: \nStory."


def test_parse_rejects_text_without_story_line():
  with pytest.raises(ValueError, match="no 'Story:' line"):
    instruct.parse("Words: a, b")


def test_pick_sentence_is_a_sentence_of_the_story_and_seeded():
  picked = {instruct.pick_sentence(STORY, seed) for seed in range(40)}
  assert picked <= set(instruct.sentences(STORY))
  assert len(picked) > 1
  assert instruct.pick_sentence(STORY, 5) == instruct.pick_sentence(STORY, 5)

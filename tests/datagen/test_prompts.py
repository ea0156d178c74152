"""Seeded story plans and the prompts rendered from them."""

import pytest

from tinystories_jax.datagen import prompts, vocabulary


def test_prompt_contains_the_chosen_words_and_features():
  vocab = vocabulary.packaged()
  for index in range(50):
    plan = prompts.make_plan(3, index, vocab)
    text = prompts.render_prompt(plan)
    assert f'"{plan.verb}"' in text and f'"{plan.noun}"' in text
    assert f'"{plan.adjective}"' in text
    assert plan.verb in vocab.verbs and plan.noun in vocab.nouns
    assert plan.adjective in vocab.adjectives
    for feature in plan.features:
      assert prompts.FEATURES[feature] in text
    for feature in set(prompts.FEATURES) - set(plan.features):
      assert prompts.FEATURES[feature] not in text


def test_same_seed_same_prompts_other_seed_other_prompts():
  vocab = vocabulary.packaged()
  first = [prompts.render_prompt(prompts.make_plan(7, i, vocab)) for i in range(30)]
  again = [prompts.render_prompt(prompts.make_plan(7, i, vocab)) for i in range(30)]
  other = [prompts.render_prompt(prompts.make_plan(8, i, vocab)) for i in range(30)]
  assert first == again
  assert first != other
  assert len(set(first)) == 30


def test_features_are_a_random_subset_of_the_allowed_ones():
  vocab = vocabulary.packaged()
  plans = [prompts.make_plan(0, i, vocab, ("Dialogue", "MoralValue")) for i in range(200)]
  seen = {f for p in plans for f in p.features}
  assert seen == {"Dialogue", "MoralValue"}
  assert {len(p.features) for p in plans} == {0, 1, 2}


def test_parse_features():
  assert prompts.parse_features("") == tuple(prompts.FEATURES)
  assert prompts.parse_features("dialogue, moral,Twist") == ("Dialogue", "MoralValue", "Twist")
  with pytest.raises(ValueError, match="choose from Dialogue"):
    prompts.parse_features("sparkles")

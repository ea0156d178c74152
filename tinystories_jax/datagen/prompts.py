"""Story prompts as the TinyStories paper built them, in our own words.

Each prompt asks for a short story in very simple words that uses one verb, one noun and one
adjective drawn at random from the basic vocabulary, plus a random subset of story features.
Plan `i` of a run depends only on (seed, i), so the same seed gives the same prompts whatever the
concurrency, and a resumed run redoes exactly the plans it lost.
"""

from __future__ import annotations

import dataclasses
import random

from tinystories_jax.datagen.vocabulary import Vocabulary

PROMPT_VERSION = "1"

# Feature name (as in the TinyStoriesInstruct `Features:` line) -> what the prompt asks for.
FEATURES = {
    "Dialogue": "at least one exchange of dialogue between characters, in quotation marks",
    "Twist": "a plot twist: something happens that the reader did not expect",
    "BadEnding": "a bad ending: things do not turn out well for the main character",
    "MoralValue": "a moral: the story teaches a simple lesson",
    "Foreshadowing": "foreshadowing: an early hint of something that happens later",
    "Conflict": "a conflict: a problem or disagreement the characters must face",
}
_FEATURE_ALIASES = {name.lower(): name for name in FEATURES} | {
    "dialog": "Dialogue", "plot_twist": "Twist", "plottwist": "Twist", "bad_ending": "BadEnding",
    "moral": "MoralValue", "moral_value": "MoralValue",
}


def parse_features(spec: str) -> tuple[str, ...]:
  """Feature names from a comma list (any case, aliases like `moral`); empty means all.

  Raises:
    ValueError: naming the known features, for an unknown one.
  """
  names = []
  for part in filter(None, (p.strip().lower() for p in spec.split(","))):
    if part not in _FEATURE_ALIASES:
      raise ValueError(f"Unknown story feature {part!r}; choose from {', '.join(FEATURES)}.")
    names.append(_FEATURE_ALIASES[part])
  return tuple(dict.fromkeys(names)) or tuple(FEATURES)


@dataclasses.dataclass(frozen=True)
class StoryPlan:
  """The random choices behind one story; recorded with the story.

  Attributes:
    index: position in the run; with the seed it fixes every choice.
    verb, noun, adjective: the words the story must use.
    features: the story features asked for.
    instruct_fields: for the Instruct layout, which instruction lines the rendered text keeps.
    sentence_seed: picks the `Random sentence:` once the story exists.
  """
  index: int
  verb: str
  noun: str
  adjective: str
  features: tuple[str, ...]
  instruct_fields: tuple[str, ...]
  sentence_seed: int

  @property
  def words(self) -> tuple[str, str, str]:
    return (self.verb, self.noun, self.adjective)


def make_plan(seed: int, index: int, vocabulary: Vocabulary,
              features: tuple[str, ...] = tuple(FEATURES),
              feature_probability: float = 0.35) -> StoryPlan:
  """The plan for story `index` of a run seeded with `seed` (deterministic)."""
  # A string seed hashes the same in every process (unlike hash() of a tuple).
  rng = random.Random(f"tinystories-datagen:{seed}:{index}")
  verb = rng.choice(vocabulary.verbs)
  noun = rng.choice(vocabulary.nouns)
  adjective = rng.choice(vocabulary.adjectives)
  chosen = tuple(f for f in features if rng.random() < feature_probability)
  # Each instruction line kept or dropped at random, so a model learns to follow any subset.
  fields = tuple(f for f in ("Features", "Words", "Summary", "Random sentence")
                 if rng.random() < 0.5)
  return StoryPlan(index, verb, noun, adjective, chosen, fields, rng.getrandbits(32))


def render_prompt(plan: StoryPlan) -> str:
  """The request sent to the storytelling model."""
  lines = [
      "Write a short story (3 to 5 paragraphs) that uses only very simple words, the kind a "
      "3 or 4 year old child would understand.",
      f'The story must use the verb "{plan.verb}", the noun "{plan.noun}" and the adjective '
      f'"{plan.adjective}".',
  ]
  if plan.features:
    lines.append("The story should also have these features:")
    lines += [f"- {FEATURES[name]}" for name in plan.features]
  lines.append("Remember to keep the words simple. Reply with the story only: no title, no "
               "comments before or after it.")
  return "\n".join(lines)


SUMMARY_PROMPT = (
    "Here is a short story for young children.\n\n{story}\n\n"
    "Summarize the story in one simple sentence. Reply with that sentence only.")

"""Which generated stories to keep, and what the kept corpus looks like.

`check_story` names the first reason to reject a story (or None): refusals, chatter around the
story, non-English text, too short or too long, a required word missing, a duplicate of a story
already kept. `corpus_stats` measures the kept stories: the share of words outside the basic
vocabulary and the distinct n-gram ratio (how repetitive the corpus is).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Iterable

from tinystories_jax.datagen.vocabulary import Vocabulary, word_forms

REASONS = ("refusal", "chatter", "not_english", "too_short", "too_long", "missing_word",
           "duplicate")

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, (but )?i|i can(no|')t|i'?m (not able|unable)|"
    r"i am (not able|unable)|as an ai|i won'?t be able)", re.IGNORECASE)
_CHATTER_START = re.compile(
    r"^\W*(sure\b|certainly\b|of course\b|here'?s\b|here is\b|okay\b|ok\b|absolutely\b|"
    r"title\s*:|story\s*:|#)", re.IGNORECASE)
_CHATTER_END = re.compile(
    r"(i hope (you|this|that)|let me know|hope you enjoy|feel free to|would you like)[^\n]*\W*$",
    re.IGNORECASE)
# A title line above the story: markdown bold or underscores ("**The Happy Ball**"), or a few
# words with no closing punctuation standing alone before a blank line ("The Happy Ball\n\n").
_TITLE = re.compile(r"\s*(\*\*|__)[^\n]{1,100}?(\*\*|__)[ \t]*(\n|$)"
                    r"|[^\n.!?\"'”’]{1,60}\n\s*\n")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")

# Words every story needs whatever its topic; not counted as outside the basic vocabulary.
FUNCTION_WORDS = frozenset("""
a an the and or but so if then than because when while after before until as of to in on at by
for with from into onto out up down over under off about around through again away back here
there now very too also not no yes just only even still all some any every each many much more
most few little lot lots one two three four five six seven eight nine ten first next last once
upon time day days i me my mine you your yours he him his she her hers it its we us our they them
their this that these those who what where why how which whose is am are was were be been being
do does did done have has had can could will would shall should may might must let's it's i'm
don't didn't can't won't isn't wasn't aren't weren't couldn't wouldn't shouldn't doesn't haven't
that's there's he's she's they're we're you're i'll we'll you'll he'd she'd they'd i've we've
oh wow hello hi bye goodbye please thank thanks okay ok mr mrs ms miss sir together always never
sometimes soon today tonight tomorrow yesterday ever anything something nothing everything
someone everyone anyone nobody somebody everybody own same other another such both either
neither really well maybe almost enough quite ready sure like said says say
""".split())


def normalized(story: str) -> str:
  return " ".join(story.lower().split())


def fingerprint(story: str) -> str:
  """Equal for stories that differ only in case and spacing."""
  return hashlib.sha1(normalized(story).encode("utf-8")).hexdigest()


def words_of(story: str) -> list[str]:
  return [w.lower() for w in _WORD.findall(story)]


def _looks_english(story: str) -> bool:
  letters = [c for c in story if c.isalpha()]
  if not letters:
    return False
  if sum(not c.isascii() for c in letters) / len(letters) > 0.02:
    return False
  tokens = words_of(story)
  return bool(tokens) and sum(t in FUNCTION_WORDS for t in tokens) / len(tokens) >= 0.2


@dataclasses.dataclass(frozen=True)
class Limits:
  """Length bounds in words."""
  min_words: int = 60
  max_words: int = 600


def check_story(story: str, required: dict[str, str], limits: Limits,
                seen: set[str]) -> str | None:
  """The first reason to reject `story`, or None to keep it.

  Args:
    story: the model's answer, stripped.
    required: part of speech ("verbs", "nouns", "adjectives") -> the word the story must use.
    limits: length bounds.
    seen: fingerprints of the stories already kept.
  """
  if _REFUSAL.search(story):
    return "refusal"
  first_line = story.split("\n", 1)[0]
  if (_CHATTER_START.search(first_line) or _CHATTER_END.search(story[-200:])
      or _TITLE.match(story)):
    return "chatter"
  if not _looks_english(story):
    return "not_english"
  count = len(story.split())
  if count < limits.min_words:
    return "too_short"
  if count > limits.max_words:
    return "too_long"
  tokens = set(words_of(story))
  for part_of_speech, word in required.items():
    if not word_forms(word, part_of_speech) & tokens:
      return "missing_word"
  if fingerprint(story) in seen:
    return "duplicate"
  return None


@dataclasses.dataclass
class CorpusStats:
  """What the kept corpus looks like."""
  stories: int
  words: int
  out_of_vocabulary_share: float
  distinct_ngram_ratio: dict[int, float]
  top_out_of_vocabulary: list[tuple[str, int]]


def corpus_stats(stories: Iterable[str], vocabulary: Vocabulary, *, ngram_sizes=(1, 2, 3),
                 max_stories: int = 100_000) -> CorpusStats:
  """Vocabulary share and n-gram diversity over (at most `max_stories` of) the kept stories.

  Out-of-vocabulary counts lowercase words that are neither a form of a basic word nor a function
  word; capitalised words (names, sentence starts) are left out so names do not count against it.
  """
  known = vocabulary.all_forms | FUNCTION_WORDS
  total_words = lower_words = outside = 0
  outside_counts: collections.Counter = collections.Counter()
  distinct = {n: set() for n in ngram_sizes}
  totals = dict.fromkeys(ngram_sizes, 0)
  count = 0
  for story in stories:
    if count >= max_stories:
      break
    count += 1
    raw = _WORD.findall(story)
    total_words += len(raw)
    for word in raw:
      if word[0].islower():
        lower_words += 1
        if word not in known:
          outside += 1
          outside_counts[word] += 1
    tokens = [w.lower() for w in raw]
    for n in ngram_sizes:
      grams = [hash(tuple(tokens[i:i + n])) for i in range(len(tokens) - n + 1)]
      distinct[n].update(grams)
      totals[n] += len(grams)
  return CorpusStats(
      stories=count, words=total_words,
      out_of_vocabulary_share=outside / lower_words if lower_words else 0.0,
      distinct_ngram_ratio={n: (len(distinct[n]) / totals[n] if totals[n] else 0.0)
                            for n in ngram_sizes},
      top_out_of_vocabulary=outside_counts.most_common(20))

"""The basic vocabulary the prompts draw from, and the word forms a story may use.

The packaged lists (`datagen/data/{nouns,verbs,adjectives}.txt`, see `data/VOCABULARY.md`) hold
about 1,500 words a three- or four-year-old understands. A story "uses" a required word when it
contains any ordinary form of it (dog/dogs, run/runs/ran/running, big/bigger/biggest).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import re

PARTS_OF_SPEECH = ("nouns", "verbs", "adjectives")

# Common irregular past forms of verbs in the basic lists; regular forms are generated.
_IRREGULAR = {
    "be": ("am", "is", "are", "was", "were", "been", "being"), "become": ("became",),
    "begin": ("began", "begun"), "bend": ("bent",), "bite": ("bit", "bitten"),
    "blow": ("blew", "blown"), "break": ("broke", "broken"), "bring": ("brought",),
    "build": ("built",), "buy": ("bought",), "catch": ("caught",), "choose": ("chose", "chosen"),
    "come": ("came",), "cut": ("cut",), "dig": ("dug",), "dive": ("dove", "dived"),
    "do": ("did", "done", "does"), "draw": ("drew", "drawn"), "dream": ("dreamt", "dreamed"),
    "drink": ("drank", "drunk"), "drive": ("drove", "driven"), "eat": ("ate", "eaten"),
    "fall": ("fell", "fallen"), "feed": ("fed",), "feel": ("felt",), "fight": ("fought",),
    "find": ("found",), "fly": ("flew", "flown"), "forget": ("forgot", "forgotten"),
    "forgive": ("forgave", "forgiven"), "freeze": ("froze", "frozen"), "get": ("got", "gotten"),
    "give": ("gave", "given"), "go": ("went", "gone", "goes"), "grow": ("grew", "grown"),
    "hang": ("hung",), "have": ("had", "has"), "hear": ("heard",), "hide": ("hid", "hidden"),
    "hit": ("hit",), "hold": ("held",), "hurt": ("hurt",), "keep": ("kept",),
    "kneel": ("knelt",), "know": ("knew", "known"), "lay": ("laid",), "lead": ("led",),
    "leap": ("leapt",), "leave": ("left",), "lend": ("lent",), "let": ("let",), "lie": ("lay",),
    "lose": ("lost",), "make": ("made",), "mean": ("meant",), "meet": ("met",), "pay": ("paid",),
    "put": ("put",), "quit": ("quit",), "read": ("read",), "ride": ("rode", "ridden"),
    "ring": ("rang", "rung"), "run": ("ran",), "say": ("said",), "see": ("saw", "seen"),
    "sell": ("sold",), "send": ("sent",), "shake": ("shook", "shaken"), "shine": ("shone",),
    "shut": ("shut",), "sing": ("sang", "sung"), "sink": ("sank", "sunk"), "sit": ("sat",),
    "sleep": ("slept",), "slide": ("slid",), "spin": ("spun",), "stand": ("stood",),
    "stick": ("stuck",), "sting": ("stung",), "sweep": ("swept",), "swim": ("swam", "swum"),
    "swing": ("swung",), "take": ("took", "taken"), "teach": ("taught",), "tear": ("tore", "torn"),
    "tell": ("told",), "think": ("thought",), "throw": ("threw", "thrown"),
    "understand": ("understood",), "wake": ("woke", "woken"), "wear": ("wore", "worn"),
    "win": ("won",), "write": ("wrote", "written"),
}
_VOWELS = set("aeiou")


class VocabularyError(ValueError):
  """A vocabulary file the user must fix; the text says how."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Word lists by part of speech."""
  nouns: tuple[str, ...]
  verbs: tuple[str, ...]
  adjectives: tuple[str, ...]

  def __post_init__(self):
    for name in PARTS_OF_SPEECH:
      if not getattr(self, name):
        raise VocabularyError(f"The vocabulary has no {name}; every list needs at least one word.")

  @functools.cached_property
  def all_forms(self) -> frozenset[str]:
    """Every form of every word, for the out-of-vocabulary share."""
    forms = set()
    for name in PARTS_OF_SPEECH:
      for word in getattr(self, name):
        forms.update(word_forms(word, name))
    return frozenset(forms)

  def __len__(self) -> int:
    return len(self.nouns) + len(self.verbs) + len(self.adjectives)


def _read_list(path: str) -> tuple[str, ...]:
  with open(path, encoding="utf-8") as f:
    return tuple(dict.fromkeys(w.strip().lower() for w in f if w.strip() and
                               not w.startswith("#")))


@functools.cache
def packaged() -> Vocabulary:
  """The team's ~1,500-word basic vocabulary."""
  data = importlib.resources.files("tinystories_jax.datagen") / "data"
  return Vocabulary(*(_read_list(str(data / f"{name}.txt")) for name in PARTS_OF_SPEECH))


def load(path: str | None) -> Vocabulary:
  """The packaged vocabulary, or a user file with `[nouns]`, `[verbs]`, `[adjectives]` sections."""
  if not path:
    return packaged()
  if not os.path.isfile(path):
    raise VocabularyError(f"Word file {path} does not exist; check --words.")
  sections: dict[str, list[str]] = {name: [] for name in PARTS_OF_SPEECH}
  current = None
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip().lower()
      if not line:
        continue
      header = re.fullmatch(r"\[(\w+)\]", line)
      if header:
        current = header.group(1)
        if current not in sections:
          raise VocabularyError(
              f"{path} line {line_number}: unknown section [{current}]; use [nouns], [verbs] "
              "and [adjectives].")
        continue
      if current is None:
        raise VocabularyError(
            f"{path} line {line_number}: a word before any section; start the file with "
            "[nouns], [verbs] or [adjectives].")
      if not re.fullmatch(r"[a-z][a-z'-]*", line):
        raise VocabularyError(f"{path} line {line_number}: {line!r} is not a single word.")
      sections[current].append(line)
  try:
    return Vocabulary(*(tuple(dict.fromkeys(sections[name])) for name in PARTS_OF_SPEECH))
  except VocabularyError as e:
    raise VocabularyError(f"{path}: {e}") from None


def _consonant_doubled(word: str) -> bool:
  # hop -> hopping, big -> bigger: short words ending consonant-vowel-consonant.
  return (len(word) >= 3 and word[-1] not in _VOWELS | set("wxy") and word[-2] in _VOWELS
          and word[-3] not in _VOWELS and len(word) <= 4)


def word_forms(word: str, part_of_speech: str) -> set[str]:
  """Ordinary inflected forms of a basic word (a superset is fine; it only widens a match)."""
  forms = {word}
  stem = word[:-1] if word.endswith("e") else word
  doubled = word + word[-1] if _consonant_doubled(word) else word
  if word.endswith("y") and len(word) > 2 and word[-2] not in _VOWELS:
    plural, ed, er = word[:-1] + "ies", word[:-1] + "ied", word[:-1] + "ier"
  elif word.endswith(("s", "x", "z", "ch", "sh")):
    plural, ed, er = word + "es", doubled + "ed", doubled + "er"
  else:
    plural, ed, er = word + "s", (word + "d" if word.endswith("e") else doubled + "ed"), (
        word + "r" if word.endswith("e") else doubled + "er")
  if part_of_speech == "nouns":
    forms |= {plural, word + "'s"}
    if word.endswith("f"):
      forms.add(word[:-1] + "ves")
    if word.endswith("fe"):
      forms.add(word[:-2] + "ves")
    forms |= {"mice"} if word == "mouse" else set()
    forms |= {"teeth"} if word == "tooth" else set()
    forms |= {"feet"} if word == "foot" else set()
    forms |= {"children"} if word == "child" else set()
    forms |= {"people"} if word == "person" else set()
  elif part_of_speech == "verbs":
    ing = (stem if word.endswith("e") and not word.endswith(("ee", "ye", "oe")) else doubled)
    forms |= {plural, ed, ing + "ing", word + "ing"}
    forms |= set(_IRREGULAR.get(word, ()))
  else:
    forms |= {er, er[:-1] + "st" if er.endswith("r") else er + "st", word + "ly",
              (word[:-1] + "ily") if word.endswith("y") else word + "ly"}
    forms |= {"better", "best"} if word == "good" else set()
    forms |= {"worse", "worst"} if word == "bad" else set()
  return forms

"""A procedural generator of simple children's stories: the offline stand-in corpus.

The project cannot ship TinyStories text, so the offline demo and the tests train on stories made
here from the team's own word lists and story patterns: a character with a want meets a problem,
talks about it, gets help or does not, and the story ends (sometimes with a moral, sometimes badly).
It is a stand-in with a small vocabulary and a handful of plots, **not** TinyStories: models trained
on it learn its patterns, not the breadth of the real dataset.

``generate(n, seed)`` yields ``n`` distinct stories, the same ones for the same seed; with the
default lists one seed gives far more than 10,000 distinct stories.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

# Bump when the output for a seed changes, so prepared directories are not silently reused.
GENERATOR_VERSION = 1

# (kind, pronoun set) — "she", "he" or "it" stories need the right words.
_KINDS = [
    ("girl", "she"), ("boy", "he"), ("puppy", "he"), ("kitten", "she"), ("bunny", "she"),
    ("bear", "he"), ("bird", "she"), ("duck", "he"), ("frog", "he"), ("mouse", "she"),
    ("fox", "he"), ("pig", "she"), ("lamb", "she"), ("turtle", "he"), ("squirrel", "she"),
]
_NAMES = {
    "she": ["Lily", "Mia", "Zoe", "Anna", "Ella", "Rosa", "Nora", "Ruby", "Lucy", "Emma", "Sara",
            "Ivy", "Maya", "Amy", "Daisy", "Hannah", "Kim", "Pia", "Tess", "June"],
    "he": ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Finn", "Kai", "Tim", "Joe", "Noah", "Luke",
           "Omar", "Ravi", "Eli", "Jake", "Bobby", "Dan", "Hugo", "Pete"],
}
_PRONOUNS = {
    "she": {"subj": "she", "obj": "her", "pos": "her", "Subj": "She", "Pos": "Her"},
    "he": {"subj": "he", "obj": "him", "pos": "his", "Subj": "He", "Pos": "His"},
}
_TRAITS = ["little", "kind", "shy", "brave", "curious", "happy", "silly", "gentle", "busy",
           "clever", "sleepy", "cheerful", "small", "friendly", "playful"]
# (place, where one lives near it, a thing found there)
_PLACES = [
    ("park", "near a big park", "a tall slide"), ("garden", "next to a sunny garden", "red roses"),
    ("forest", "at the edge of a green forest", "an old log"), ("beach", "by the sea", "soft sand"),
    ("farm", "on a busy farm", "a red barn"), ("pond", "near a quiet pond", "lily pads"),
    ("hill", "at the top of a hill", "a big rock"), ("meadow", "beside a wide meadow",
                                                     "yellow flowers"),
    ("backyard", "in a house with a big backyard", "a swing"), ("school", "close to a small school",
                                                                "a sandbox"),
    ("river", "by a slow river", "smooth stones"), ("zoo", "near the zoo", "a tall giraffe"),
]
# (object, adjective, verb phrase for playing with it)
_OBJECTS = [
    ("ball", "red", "kick the ball"), ("kite", "blue", "fly the kite"),
    ("boat", "little", "sail the boat"), ("teddy bear", "soft", "hug the teddy bear"),
    ("drum", "loud", "play the drum"), ("book", "shiny", "read the book"),
    ("hat", "yellow", "wear the hat"), ("car", "fast", "race the car"),
    ("doll", "pretty", "dress the doll"), ("stone", "smooth", "hold the stone"),
    ("balloon", "big", "bounce the balloon"), ("cookie", "sweet", "eat the cookie"),
    ("shell", "pink", "listen to the shell"), ("crayon", "green", "draw with the crayon"),
    ("puzzle", "new", "finish the puzzle"), ("bell", "tiny", "ring the bell"),
    ("scarf", "warm", "wear the scarf"), ("bucket", "orange", "fill the bucket"),
]
_HELPERS = ["mom", "dad", "grandma", "grandpa", "big sister", "big brother", "teacher",
            "best friend", "neighbor"]
_FRIEND_KINDS = ["cat", "dog", "owl", "duck", "rabbit", "bear", "bird", "frog", "goat", "horse"]
_FEELINGS_GOOD = ["happy", "proud", "glad", "excited", "warm inside", "very happy"]
_FEELINGS_BAD = ["sad", "upset", "scared", "worried", "grumpy", "lonely"]
_WEATHER = ["The sun was shining.", "It was a windy day.", "The sky was blue and clear.",
            "It was a warm spring morning.", "Little clouds moved across the sky.",
            "It was a cold but bright day."]
_OPENINGS = ["Once upon a time, there was", "One day, there was", "Once there was",
             "A long time ago, there was"]
_MORALS = [
    "From that day on, {name} knew that sharing makes everyone happy.",
    "{Name} learned that it is good to ask for help.",
    "{Name} learned to be careful and to listen.",
    "{Name} learned that friends make hard things easy.",
    "{Name} learned that being patient is worth it.",
    "And {name} learned that being kind is the best thing of all.",
]


def _a(word: str) -> str:
  return ("an " if word[0] in "aeiou" else "a ") + word


@dataclasses.dataclass
class _Cast:
  name: str
  kind: str
  trait: str
  p: dict
  place: tuple
  obj: tuple
  helper: str
  friend_name: str
  friend_kind: str
  weather: str

  def fmt(self, text: str) -> str:
    return text.format(
        name=self.name, Name=self.name, kind=self.kind, trait=self.trait, subj=self.p["subj"],
        Subj=self.p["Subj"], obj=self.p["obj"], pos=self.p["pos"], Pos=self.p["Pos"],
        place=self.place[0], thing=self.place[2], o=self.obj[0], oadj=self.obj[1],
        a_oadj=_a(self.obj[1]),
        oplay=self.obj[2], helper=self.helper, friend=self.friend_name, fkind=self.friend_kind)


def _cast(rng: random.Random) -> _Cast:
  kind, pron = rng.choice(_KINDS)
  name = rng.choice(_NAMES[pron])
  friend_pron = rng.choice(["she", "he"])
  friend = rng.choice([n for n in _NAMES[friend_pron] if n != name])
  return _Cast(name=name, kind=kind, trait=rng.choice(_TRAITS), p=_PRONOUNS[pron],
               place=rng.choice(_PLACES), obj=rng.choice(_OBJECTS), helper=rng.choice(_HELPERS),
               friend_name=friend, friend_kind=rng.choice(_FRIEND_KINDS),
               weather=rng.choice(_WEATHER))


def _intro(c: _Cast, rng: random.Random) -> str:
  opening = rng.choice(_OPENINGS)
  lines = [f"{opening} {_a(c.trait)} {c.kind} named {c.name}.",
           c.fmt("{Subj} lived " + c.place[1] + ".")]
  lines.append(rng.choice([
      c.fmt("{Name} had {a_oadj} {o} and loved to {oplay} every day."),
      c.fmt("{Pos} favorite toy was {a_oadj} {o}."),
      c.fmt("{Name} liked to play at the {place} with {pos} {oadj} {o}."),
  ]))
  return " ".join(lines)


def _lost_and_found(c: _Cast, rng: random.Random) -> list[str]:
  spots = rng.sample(["under the bed", "behind the door", "in the toy box", "near "
                      + c.place[2], "under a bush", "in the kitchen"], 2)
  p2 = c.fmt(c.weather + " {Name} went to the {place} to {oplay}. "
             "But when {subj} looked down, the {o} was gone! {Name} felt very " +
             rng.choice(_FEELINGS_BAD) + ".")
  p3 = c.fmt('"Where is my {o}?" {name} asked. {Pos} {helper} said, "Let us look for it '
             'together." They looked ' + spots[0] + '. It was not there. Then they looked '
             + spots[1] + ".")
  p4 = c.fmt("At last {name} saw something {oadj}. It was the {o}! "
             '"I found it!" {name} shouted. {Subj} hugged {pos} {helper} and said, "Thank you '
             'for helping me."')
  ending = rng.choice([c.fmt("{Name} held the {o} tight all the way home. {Subj} felt " +
                             rng.choice(_FEELINGS_GOOD) + "."),
                       c.fmt(rng.choice(_MORALS))])
  return [p2, p3, p4 + " " + ending]


def _sharing(c: _Cast, rng: random.Random) -> list[str]:
  p2 = c.fmt(c.weather + " At the {place}, {name} met {friend}, a " + c.friend_kind +
             " who looked at the {o} with big eyes. " + '"Can I play with it too?" {friend} asked.')
  if rng.random() < 0.7:
    p3 = c.fmt('At first {name} did not want to share. "It is mine," {subj} said. {friend} '
               "looked " + rng.choice(_FEELINGS_BAD) + " and walked away slowly.")
    p4 = c.fmt("Then {name} thought about it. {Subj} ran after {friend} and said, "
               '"Wait! We can play together." They took turns to {oplay} and laughed a lot.')
    return [p2, p3, p4 + " " + c.fmt(rng.choice(_MORALS[:1] + _MORALS[3:4] + _MORALS[5:]))]
  p3 = c.fmt('"Yes, you can," said {name}. They took turns to {oplay}. {friend} was so glad.')
  p4 = c.fmt("When the sun went down, {friend} said, \"You are a good friend, {name}.\" {Name} "
             "smiled. {Subj} felt " + rng.choice(_FEELINGS_GOOD) + ".")
  return [p2, p3, p4]


def _fear(c: _Cast, rng: random.Random) -> list[str]:
  fear = rng.choice(["the dark", "the big slide", "the deep water", "the loud thunder",
                     "the tall tree", "the big dog next door"])
  p2 = c.fmt("{Name} was afraid of " + fear + ". Every time {subj} saw it, {subj} wanted to "
             "hide. " + '"I am too small," {subj} said.')
  p3 = c.fmt('One day, {pos} {helper} sat next to {obj}. "Being brave does not mean you are not '
             'scared," {pos} {helper} said. "It means you try, even when you are scared."')
  if rng.random() < 0.8:
    p4 = c.fmt("{Name} took a deep breath. {Subj} held {pos} {o} and tried. It was not so bad! "
               '"I did it!" {subj} said. {Pos} {helper} clapped, and {name} felt ' +
               rng.choice(_FEELINGS_GOOD) + ".")
    return [p2, p3, p4]
  p4 = c.fmt("{Name} tried, but {subj} was still too scared. {Subj} ran back inside and cried. "
             "Maybe next time {subj} will be brave. The {o} stayed on the floor all night.")
  return [p2, p3, p4]


def _bad_choice(c: _Cast, rng: random.Random) -> list[str]:
  danger = rng.choice([("the road", "a car came fast"), ("the pond", "the water was cold and deep"),
                       ("the old fence", "the fence broke"), ("the roof", "the wind was strong")])
  p2 = c.fmt(c.weather + " {Name} wanted to {oplay} near " + danger[0] + '. "No, {name}," said '
             '{pos} {helper}. "It is not safe there."')
  p3 = c.fmt("But {name} did not listen. {Subj} went to " + danger[0] + " anyway. Then "
             + danger[1] + ", and the {o} was lost.")
  if rng.random() < 0.5:
    p4 = c.fmt("{Name} cried and cried. {Pos} {o} was gone, and {subj} could not get it back. "
               "{Subj} wished {subj} had listened.")
  else:
    p4 = c.fmt("{Pos} {helper} came and held {obj}. \"I am sorry, {name},\" {pos} {helper} said. \"Next "
               'time, please listen." {Name} nodded. ' + rng.choice(_MORALS[2:3]))
  return [p2, p3, p4]


def _adventure(c: _Cast, rng: random.Random) -> list[str]:
  found = rng.choice(["a small door in a tree", "a map with a big red X", "a tiny lost bird",
                      "a box full of old toys", "a path nobody had seen", "a glowing stone"])
  p2 = c.fmt(c.weather + " {Name} and {friend} the " + c.friend_kind + " went to the {place}. "
             "Near " + c.place[2] + ", they found " + found + ".")
  p3 = c.fmt('"What is this?" {friend} asked. "Let us find out!" said {name}. They were a little '
             "scared, but they were brave together.")
  twist = rng.random() < 0.4
  if twist:
    p4 = c.fmt("Then something surprising happened. It was not a secret at all. It was a "
               "present from {pos} {helper}, who was hiding behind a tree and laughing! "
               "Everyone laughed too.")
  else:
    p4 = c.fmt("They followed it and found a quiet, pretty spot full of " + rng.choice(
        ["flowers", "butterflies", "berries", "soft grass"]) + ". They played there until it "
               "was time to go home. " + rng.choice(_MORALS[3:4] + [
                   "It was the best day ever."]))
  return [p2, p3, p4]


_PLOTS = [_lost_and_found, _sharing, _fear, _bad_choice, _adventure]


def story(rng: random.Random) -> str:
  """One story drawn with ``rng``: 3 to 5 short paragraphs separated by newlines."""
  c = _cast(rng)
  plot = rng.choice(_PLOTS)
  paragraphs = [_intro(c, rng)] + plot(c, rng)
  return "\n".join(paragraphs)


def generate(n: int, seed: int = 0) -> Iterator[str]:
  """Yields ``n`` distinct stories, always the same ones (in the same order) for a seed."""
  rng = random.Random(seed)
  seen: set[str] = set()
  misses = 0
  while len(seen) < n:
    text = story(rng)
    if text in seen:
      misses += 1
      if misses > 100 * n + 1000:
        raise ValueError(f"cannot make {n} distinct stories: the word lists are too small.")
      continue
    seen.add(text)
    yield text

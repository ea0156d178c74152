"""Cleaning raw stories: repair encoding damage, normalise, drop junk and exact duplicates.

Every change is counted by reason so `prepare` can report what it did to the corpus:

* ``encoding_repaired``: mojibake fixed by ftfy (the hub's early copy is full of ``â€™``, ``â€œ``,
  ``Ã©``: UTF-8 bytes decoded as Windows-1252). One damage ftfy cannot undo alone is also handled:
  that copy lost the byte 0x9D of every closing quote ``”`` (its UTF-8 bytes are E2 80 9D and 0x9D
  has no Windows-1252 character), leaving a bare ``â€``; it is restored before ftfy runs.
* ``unicode_normalized``: NFC normalisation changed the text.
* ``whitespace_normalized``: trailing spaces on lines, runs of spaces or tabs, CR line ends, more
  than one blank line between paragraphs. Paragraph breaks (``\\n`` and ``\\n\\n``) are kept.
* ``dropped_empty``, ``dropped_degenerate`` (fewer than ``min_words`` words, or mostly not letters),
  ``dropped_duplicate`` (the same text, after cleaning, already kept).

Text without such damage passes through the encoding repair unchanged.
This module imports neither jax nor numpy.
"""

from __future__ import annotations

import collections
import hashlib
import re
import unicodedata

import ftfy

_FTFY_CONFIG = ftfy.TextFixerConfig(
    # Curly quotes are real characters of the GPT-4 stories, not damage: keep them.
    uncurl_quotes=False,
    # Full-width forms and ligatures are not in these corpora; leave any that appear alone.
    fix_character_width=False,
    fix_latin_ligatures=False,
    normalization="NFC",
    explain=False,
)

# Characters that bytes 0x80-0xBF become under Windows-1252 (the continuation bytes of UTF-8).
_CP1252_CONTINUATIONS = "".join(
    bytes([b]).decode("cp1252") for b in range(0x80, 0xC0) if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D))
_BARE_QUOTE_MOJIBAKE = re.compile("\u00e2\u20ac(?![" + re.escape(_CP1252_CONTINUATIONS) + "])")
_SUSPECT = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e"
                      "\u0192\u02c6\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030"
                      "\u2039\u203a\u20ac\u2122]")
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_LINE_EDGES = re.compile(r" *\n *")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_WHITESPACE = re.compile(r"\s+")
_NOT_LETTER = re.compile(r"[\W\d_]+")

# Bump when cleaning changes what it outputs, so prepared directories are not silently reused.
CLEAN_VERSION = 1
REASONS = ("encoding_repaired", "unicode_normalized", "whitespace_normalized", "dropped_empty",
           "dropped_degenerate", "dropped_duplicate")


def repair_encoding(text: str) -> str:
  """Undoes mojibake; returns ``text`` itself when it shows no sign of damage."""
  if not _SUSPECT.search(text):
    # The common case: nothing that looks like mis-decoded UTF-8, so do not touch the text.
    return text
  text = _BARE_QUOTE_MOJIBAKE.sub("\u201d", text)
  return ftfy.fix_text(text, config=_FTFY_CONFIG)


def normalize_whitespace(text: str) -> str:
  """Collapses horizontal whitespace and blank lines; keeps single and double line breaks."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  text = _SPACES.sub(" ", text)
  text = _LINE_EDGES.sub("\n", text)
  text = _MANY_BLANK_LINES.sub("\n\n", text)
  return text.strip()


def is_degenerate(text: str, min_words: int) -> bool:
  """True for text too short to be a story or made mostly of non-letters."""
  if len(text.split()) < min_words:
    return True
  visible = len(_WHITESPACE.sub("", text))
  letters = len(_NOT_LETTER.sub("", text))
  return letters < 0.5 * visible


def has_mojibake(text: str) -> bool:
  """True where the text still holds a sequence typical of UTF-8 read as Windows-1252."""
  return bool(_SUSPECT.search(text)) or "\u00e2\u20ac" in text


class Cleaner:
  """Cleans a stream of stories, remembering what it kept to drop exact duplicates.

  One Cleaner should see every split of a corpus, train first, so that a validation story that
  also appears in the training split is dropped from validation (no leakage).
  """

  def __init__(self, *, min_words: int = 5, dedupe: bool = True):
    self.min_words = min_words
    self.dedupe = dedupe
    self.counts: collections.Counter[str] = collections.Counter()
    self._seen: set[bytes] = set()

  def clean_text(self, text: str) -> tuple[str | None, tuple[str, ...]]:
    """Cleans one story without touching the duplicate memory.

    Returns:
      (cleaned text or None if dropped, the reasons that applied).
    """
    reasons = []
    repaired = repair_encoding(text)
    if repaired != text:
      reasons.append("encoding_repaired")
    normalized = unicodedata.normalize("NFC", repaired)
    if normalized != repaired:
      reasons.append("unicode_normalized")
    spaced = normalize_whitespace(normalized)
    if spaced != normalized.strip():  # Stripping the ends alone is not worth counting.
      reasons.append("whitespace_normalized")
    if not spaced:
      return None, tuple(reasons) + ("dropped_empty",)
    if is_degenerate(spaced, self.min_words):
      return None, tuple(reasons) + ("dropped_degenerate",)
    return spaced, tuple(reasons)

  def admit(self, text: str | None, reasons: tuple[str, ...]) -> str | None:
    """Counts a cleaned story and applies the duplicate check; returns it or None."""
    self.counts["input"] += 1
    self.counts.update(reasons)
    if text is None:
      return None
    if self.dedupe:
      key = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
      if key in self._seen:
        self.counts["dropped_duplicate"] += 1
        return None
      self._seen.add(key)
    self.counts["kept"] += 1
    return text

  def __call__(self, text: str) -> str | None:
    return self.admit(*self.clean_text(text))

  def stats(self) -> dict[str, int]:
    """The counts so far, with every reason present (zero where it never applied)."""
    out = {"input": self.counts["input"], "kept": self.counts["kept"]}
    for reason in REASONS:
      out[reason] = self.counts[reason]
    return out

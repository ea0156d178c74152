"""Encoding repair, normalisation and the counts of what cleaning did."""

import json

from tinystories_jax.data import clean


def _mojibake(text: str) -> str:
  """UTF-8 bytes read as Windows-1252: the damage in the hub's early copy."""
  return text.encode("utf-8").decode("cp1252", errors="ignore")


def test_repairs_mojibake_exactly():
  text = "\u201cI\u2019m here,\u201d said Zo\u00eb \u2014 caf\u00e9 time."
  broken = _mojibake(text)
  assert "\u00e2\u20ac" in broken
  assert clean.repair_encoding(broken) == text


def test_restores_closing_quote_that_lost_its_last_byte():
  # The byte 0x9D of U+201D has no Windows-1252 character; the damaged copy dropped it.
  broken = 'she said, \u00e2\u20ac\u0153no!\u00e2\u20ac\n\nthen she left,\u00e2\u20ac said tom.'
  fixed = clean.repair_encoding(broken)
  assert fixed == 'she said, \u201cno!\u201d\n\nthen she left,\u201d said tom.'
  assert not clean.has_mojibake(fixed)


def test_clean_text_untouched_by_repair():
  for text in ["Plain ASCII story.", "\u201cCurly\u201d quotes stay \u2019curly\u2019.",
               "Se\u00f1or Jos\u00e9 said \u00a1hola! \u2026 and left \u2013 fast."]:
    assert clean.repair_encoding(text) == text


def test_whitespace_keeps_paragraphs():
  text = "  Line one.  \r\nLine\ttwo.\n\n\n\nNew  paragraph. \n"
  assert clean.normalize_whitespace(text) == "Line one.\nLine two.\n\nNew paragraph."


def test_cleaner_counts_and_dedupes():
  c = clean.Cleaner(min_words=3)
  outs = [c(t) for t in ["A good long story here.", "A good long story here.  ", "", "  \n ",
                         "Too short", "1234 5678 !!!! ???? ....", _mojibake("It\u2019s a dog, ok.")]]
  assert outs == ["A good long story here.", None, None, None, None, None, "It\u2019s a dog, ok."]
  stats = c.stats()
  assert stats["input"] == 7 and stats["kept"] == 2
  assert stats["dropped_duplicate"] == 1
  assert stats["dropped_empty"] == 2
  assert stats["dropped_degenerate"] == 2
  assert stats["encoding_repaired"] == 1
  assert stats["whitespace_normalized"] == 0  # stripping the ends alone is not counted


def test_dirty_sample_has_no_mojibake_after_cleaning(shared_data):
  c = clean.Cleaner()
  rows = [json.loads(line)["text"] for line in open(shared_data / "dirty.jsonl", encoding="utf-8")]
  assert sum(clean.has_mojibake(t) for t in rows) > 200
  out = [c(t) for t in rows]
  assert all(t is not None for t in out)
  assert not any(clean.has_mojibake(t) for t in out)
  assert not any("\u2020" in t for t in out)  # ftfy alone would turn a damaged quote into a dagger
  assert c.stats()["encoding_repaired"] == len(rows)


def test_real_clean_text_passes_through(shared_data):
  c = clean.Cleaner(dedupe=False)
  rows = [json.loads(line)["text"] for line in open(shared_data / "train.jsonl", encoding="utf-8")]
  for text in rows:
    out, reasons = c.clean_text(text)
    assert "encoding_repaired" not in reasons
    assert out is not None and out.split() == text.split()

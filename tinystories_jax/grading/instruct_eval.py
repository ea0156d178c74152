"""The instruction-following evaluation (the paper's second evaluation, for Instruct models).

A prompt is a TinyStoriesInstruct prefix (`Features:`, `Words:`, `Summary:`, `Random sentence:`
lines, then `Story:`); the model writes the story. The `instruct` rubric asks the grader how well
the story follows the instructions, and two checks need no grader at all: every required word is
used (in any ordinary form) and the required sentence appears word for word.
"""

from __future__ import annotations

from typing import Any

from tinystories_jax.datagen import instruct
from tinystories_jax.datagen import prompts
from tinystories_jax.datagen import quality
from tinystories_jax.datagen import vocabulary


def instructions_of(prompt: str) -> instruct.Instructions:
  """The instructions in an Instruct prompt (an empty set if it has no `Story:` line)."""
  try:
    return instruct.parse(prompt)[0]
  except ValueError:
    return instruct.Instructions()


def describe(instructions: instruct.Instructions) -> str:
  """The instructions as plain sentences for the grader."""
  lines = []
  if instructions.words:
    lines.append("- Use these words (any form of them is fine): "
                 + ", ".join(instructions.words) + ".")
  if instructions.random_sentence:
    lines.append(f"- Include this sentence word for word: \"{instructions.random_sentence}\"")
  if instructions.features:
    wanted = [prompts.FEATURES.get(name, name) for name in instructions.features]
    lines.append("- The story should have: " + "; ".join(wanted) + ".")
  if instructions.summary:
    lines.append(f"- The story should match this summary: {instructions.summary}")
  return "\n".join(lines) or "- (no instructions: any simple story will do)"


def _uses(word: str, tokens: set[str]) -> bool:
  forms = set()
  for part_of_speech in vocabulary.PARTS_OF_SPEECH:
    forms |= vocabulary.word_forms(word.lower(), part_of_speech)
  return bool(forms & tokens)


def automatic_checks(instructions: instruct.Instructions, story: str) -> dict[str, Any]:
  """The checks that need no grader, for the instructions that were given."""
  checks: dict[str, Any] = {}
  if instructions.words:
    tokens = set(quality.words_of(story))
    checks["words_present"] = all(_uses(w, tokens) for w in instructions.words)
  if instructions.random_sentence:
    checks["sentence_present"] = (quality.normalized(instructions.random_sentence)
                                  in quality.normalized(story))
  return checks

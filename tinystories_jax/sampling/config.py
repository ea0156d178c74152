"""`SamplerConfig`: how to continue a story, checked once at the boundary.

The defaults write one whole story: nucleus sampling at temperature 0.8 (greedy decoding of small
models falls into loops), up to 512 new tokens (TinyStories stories run 150-400 tokens, so several
paragraphs fit), stopping at the end-of-story token the trainer puts after every story. The
paper's authors showed greedy search with 5 beams: `SamplerConfig(temperature=0, num_beams=5)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class SamplerError(ValueError):
  """A sampler setting or prompt that cannot be served; the text names the fix."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Decoding settings.

  Attributes:
    max_new_tokens: most tokens to add to each prompt (the end-of-story token not counted).
    min_new_tokens: the end-of-story token is forbidden before this many new tokens.
    temperature: divides the logits; 0 means greedy (always the most likely token).
    top_k: sample among the k most likely tokens only; 0 means no limit.
    top_p: sample from the smallest set of tokens whose probability reaches top_p (nucleus);
      1.0 means no limit.
    num_beams: beam search with this many beams when > 1 (deterministic; ignores temperature,
      top_k and top_p).
    length_penalty: beam scores are log-probability sums divided by length ** length_penalty;
      larger values favour longer stories.
    stop: strings that end a completion; the returned text stops just before the first one.
    seed: with the same seed, prompts and settings, sampling gives the same text every time,
      whatever else shares the batch.
  """

  max_new_tokens: int = 512
  min_new_tokens: int = 0
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 0.95
  num_beams: int = 1
  length_penalty: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int = 0

  def __post_init__(self):
    def fail(msg):
      raise SamplerError(msg)

    def is_int(x):
      return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x):
      return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
      fail(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
    if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
      fail(f"min_new_tokens must be an integer from 0 to max_new_tokens ({self.max_new_tokens}), "
           f"got {self.min_new_tokens!r}.")
    if not is_num(self.temperature) or not 0 <= self.temperature <= 100:
      fail(f"temperature must be a number from 0 to 100, got {self.temperature!r}.")
    if not is_int(self.top_k) or self.top_k < 0:
      fail(f"top_k must be 0 (no limit) or a positive integer, got {self.top_k!r}.")
    if not is_num(self.top_p) or not 0 < self.top_p <= 1:
      fail(f"top_p must be a number in (0, 1], got {self.top_p!r}.")
    if not is_int(self.num_beams) or not 1 <= self.num_beams <= 64:
      fail(f"num_beams must be an integer from 1 to 64, got {self.num_beams!r}.")
    if not is_num(self.length_penalty):
      fail(f"length_penalty must be a number, got {self.length_penalty!r}.")
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
    if any(not isinstance(s, str) or not s for s in stop):
      fail(f"stop must be non-empty strings, got {self.stop!r}.")
    if not is_int(self.seed):
      fail(f"seed must be an integer, got {self.seed!r}.")
    object.__setattr__(self, "stop", stop)
    object.__setattr__(self, "temperature", float(self.temperature))
    object.__setattr__(self, "top_p", float(self.top_p))
    object.__setattr__(self, "length_penalty", float(self.length_penalty))

  @property
  def greedy(self) -> bool:
    """Always the most likely token: temperature 0 or top_k 1 (beam search aside)."""
    return self.num_beams == 1 and (self.temperature == 0 or self.top_k == 1)

  def decode_key(self) -> tuple:
    """The settings that shape the compiled decode loop; requests equal here share a batch."""
    if self.num_beams > 1:
      return ("beam", self.num_beams, self.length_penalty, self.min_new_tokens)
    if self.greedy:
      return ("greedy", self.min_new_tokens)
    return ("sample", self.temperature, self.top_k, self.top_p, self.min_new_tokens)

  def to_dict(self) -> dict[str, Any]:
    """JSON-able settings (what completions files record as `sampler`)."""
    d = dataclasses.asdict(self)
    d["stop"] = list(self.stop)
    return d

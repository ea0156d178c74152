"""Story beginnings in, stories out: tokenizing, framing, stop strings and streamed text.

    writer = StoryWriter(sampling.load("runs/quickstart"))
    [[story]] = writer.complete(["Once upon a time"], SamplerConfig())
    story.text, story.finish_reason

A prompt is encoded and prefixed with BOS, as the trainer frames every story (BOS ... EOS), so the
model continues a story's beginning and its EOS marks the story's end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from tinystories_jax.sampling.config import SamplerConfig
from tinystories_jax.sampling.sampler import Sampler
from tinystories_jax.sampling.workdir import LoadedModel

# Receives, between decode chunks, the new text of each row since the previous call.
OnText = Callable[[list[str]], None]


@dataclasses.dataclass
class StoryCompletion:
  """One continuation of a prompt."""
  text: str
  finish_reason: str  # "stop" or "length"
  prompt_tokens: int
  completion_tokens: int


class StoryWriter:
  """Text-level sampling over a loaded workdir (thread-compatible, not thread-safe)."""

  def __init__(self, loaded: LoadedModel, *, stream_chunk: int = 16,
               matmul_dtype: str | None = None):
    self.loaded = loaded
    self.tokenizer = loaded.tokenizer
    self.sampler = Sampler(loaded.model, eos_id=self.tokenizer.eos_id, stream_chunk=stream_chunk,
                           matmul_dtype=matmul_dtype)

  def encode_prompt(self, prompt: str) -> list[int]:
    """BOS followed by the prompt's tokens."""
    return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

  def max_prompt_tokens(self, max_new_tokens: int) -> int:
    """The longest prompt (BOS included) that leaves room for `max_new_tokens`."""
    return self.sampler.max_sequence() - max_new_tokens

  def complete(self, prompts: Sequence[str], config: SamplerConfig, *,
               streams: Sequence[int] | None = None, limits: Sequence[int] | None = None,
               seeds: Sequence[int] | None = None,
               stops: Sequence[Sequence[str]] | None = None, on_text: OnText | None = None,
               num_return: int = 1, encoded: Sequence[list[int]] | None = None
               ) -> list[list[StoryCompletion]]:
    """Continues each prompt; see `Sampler.generate` for `streams`, `limits`, `seeds` and
    `num_return`. `stops` gives each row its own stop strings (default `config.stop`).

    `on_text` streams text as it is written (sampling and greedy; beam search returns at the
    end). Text is held back while it might be the start of a stop string, so streamed pieces
    always join to the final text. `encoded` passes prompts already encoded by `encode_prompt`.
    """
    ids = list(encoded) if encoded is not None else [self.encode_prompt(p) for p in prompts]
    heads = [self.tokenizer.decode(x) for x in ids]
    stops = [tuple(config.stop)] * len(ids) if stops is None else [tuple(x) for x in stops]
    hold = max((len(s) for row in stops for s in row), default=1) - 1
    emitted = [0] * len(ids)
    cut: list[int | None] = [None] * len(ids)

    def row_text(i: int, new: list[int]) -> str:
      text = self._continuation(ids[i], heads[i], new)
      for s in stops[i]:
        at = text.find(s)
        if at >= 0:
          cut[i] = at if cut[i] is None else min(cut[i], at)
      return text if cut[i] is None else text[:cut[i]]

    def on_update(rows: list[list[int]], done: list[bool]):
      pieces = []
      for i, new in enumerate(rows):
        text = row_text(i, new)
        stopped = cut[i] is not None
        end = len(text) if (done[i] or stopped) else max(emitted[i], len(text) - hold)
        # A token may end inside a multi-byte character; wait for the rest of it.
        while end > emitted[i] and text[end - 1] == "\ufffd" and not done[i]:
          end -= 1
        pieces.append(text[emitted[i]:end])
        emitted[i] = max(emitted[i], end)
      if on_text is not None:
        on_text(pieces)
      return [c is not None for c in cut]

    need_updates = (on_text is not None or any(stops)) and config.num_beams == 1
    results = self.sampler.generate(ids, config, streams=streams, limits=limits, seeds=seeds,
                                    on_update=on_update if need_updates else None,
                                    num_return=num_return)
    out = []
    for i, row in enumerate(results):
      stories = []
      for c in row:
        cut[i] = None
        text = row_text(i, c.tokens)
        stopped = cut[i] is not None
        stories.append(StoryCompletion(text, "stop" if stopped else c.finish_reason,
                                       len(ids[i]), len(c.tokens)))
      out.append(stories)
    if on_text is not None:
      on_text([row[0].text[emitted[i]:] for i, row in enumerate(out)])
    return out

  def _continuation(self, prompt_ids: list[int], head: str, new: list[int]) -> str:
    """The text `new` adds after the prompt (decoded together, so word spacing is right)."""
    if not new:
      return ""
    whole = self.tokenizer.decode(prompt_ids + new)
    if whole.startswith(head):
      return whole[len(head):]
    return self.tokenizer.decode(new)

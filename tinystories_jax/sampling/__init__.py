"""KV-cached story sampling: greedy, temperature, top-k, top-p and beam search.

    loaded = sampling.load("runs/quickstart")       # config.json + latest params + tokenizer
    writer = sampling.StoryWriter(loaded)
    [[story]] = writer.complete(["Once upon a time"], sampling.SamplerConfig())

Token-level: `Sampler(model, eos_id=...).generate(prompt_ids, config)`. See docs/sampling.md.
"""

from tinystories_jax.sampling.config import SamplerConfig, SamplerError
from tinystories_jax.sampling.sampler import Completion, Sampler
from tinystories_jax.sampling.text import StoryCompletion, StoryWriter
from tinystories_jax.sampling.workdir import LoadedModel, load

__all__ = [
    "Completion", "LoadedModel", "SamplerConfig", "SamplerError", "Sampler", "StoryCompletion",
    "StoryWriter", "load",
]

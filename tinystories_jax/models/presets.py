"""Named model configurations: the paper's seven GPT-Neo models and llama2.c's shapes.

    presets.gpt_neo("33m", vocab_size=50257)       # TinyStories-33M, loads the released weights
    presets.llama("15m", vocab_size=4096, dtype="bfloat16")

Any `ModelConfig` field can be overridden by keyword. The config files in `configs/` call these.
"""

from __future__ import annotations

from typing import Any

from tinystories_jax.models.config import ModelConfig

# name: (layers, d_model, attention layers). All have 16 heads, window 256, 2048 positions.
GPT_NEO = {
    "1m": (8, 64, ("global", "local") * 4),
    "3m": (8, 128, ("global", "local") * 4),
    "8m": (8, 256, ("global", "local") * 4),
    "28m": (8, 512, ("global", "local") * 4),
    "33m": (4, 768, ("global", "local") * 2),
    "1layer-21m": (1, 1024, ("global",)),
    "2layers-33m": (2, 1024, ("global", "local")),
}

# name: d_model, layers, heads, kv heads, context, multiple_of, default vocab (None: from data).
# 260k uses multiple_of 4 as llama2.c's stories260K does (260,032 parameters at vocab 512).
LLAMA = {
    "260k": dict(d_model=64, num_layers=5, num_heads=8, num_kv_heads=4, max_positions=512,
                 multiple_of=4, vocab_size=512),
    "15m": dict(d_model=288, num_layers=6, num_heads=6, num_kv_heads=6, max_positions=256,
                multiple_of=32, vocab_size=None),
    "42m": dict(d_model=512, num_layers=8, num_heads=8, num_kv_heads=8, max_positions=1024,
                multiple_of=32, vocab_size=None),
    "110m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, max_positions=1024,
                 multiple_of=32, vocab_size=None),
}


def _unknown(family: str, name: str, names) -> ValueError:
  return ValueError(f"No {family} preset named {name!r}; choose one of {sorted(names)}.")


def gpt_neo(name: str, *, vocab_size: int, **overrides: Any) -> ModelConfig:
  """One of the paper's GPT-Neo models ("1m" ... "2layers-33m"); vocab 50257 loads the released
  checkpoints, otherwise pass the prepared data's SentencePiece vocab size."""
  if name not in GPT_NEO:
    raise _unknown("GPT-Neo", name, GPT_NEO)
  layers, d, kinds = GPT_NEO[name]
  base = dict(family="gpt_neo", vocab_size=vocab_size, d_model=d, num_layers=layers,
              num_heads=16, max_positions=2048, attention_layers=kinds, window=256,
              norm_eps=1e-5, tie_embeddings=True)
  base.update(overrides)
  return ModelConfig(**base)


def llama(name: str, *, vocab_size: int | None = None, **overrides: Any) -> ModelConfig:
  """One of llama2.c's shapes ("260k", "15m", "42m", "110m"); vocab from the data unless the
  preset fixes one (260k: 512)."""
  if name not in LLAMA:
    raise _unknown("llama", name, LLAMA)
  base = dict(LLAMA[name])
  if vocab_size is not None:
    base["vocab_size"] = vocab_size
  if base["vocab_size"] is None:
    raise ValueError(f"llama preset {name!r} takes its vocab from the data: pass vocab_size.")
  base.update(family="llama", norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True)
  base.update(overrides)
  return ModelConfig(**base)


def get(family: str, name: str, **kwargs: Any) -> ModelConfig:
  """`gpt_neo(name, ...)` or `llama(name, ...)` by family name."""
  if family == "gpt_neo":
    return gpt_neo(name, **kwargs)
  if family == "llama":
    return llama(name, **kwargs)
  raise ValueError(f"Unknown model family {family!r}; choose 'gpt_neo' or 'llama'.")


def names(family: str) -> list[str]:
  """The preset names of a family."""
  return list({"gpt_neo": GPT_NEO, "llama": LLAMA}[family])

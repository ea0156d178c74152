"""Tiny models and workdirs for the sampling and serving tests (random weights, CPU)."""

from __future__ import annotations

import pathlib
import random

from flax import nnx

from tinystories_jax import models
from tinystories_jax.data import synthetic
from tinystories_jax.data.tokenizer import Tokenizer, train_sentencepiece
from tinystories_jax.interop import workdir as interop_workdir
from tinystories_jax.interop.workdir import model_params
from tinystories_jax.models.config import ModelConfig


def tiny_config(family: str, **overrides) -> ModelConfig:
  """Two layers, one global and one local with a window of 4 (shorter than the test sequences).

  A wide initialiser makes the logits far apart, so argmax never hinges on rounding.
  """
  base = dict(family=family, vocab_size=61, d_model=32, num_layers=2, num_heads=4,
              max_positions=96, window=4, attention_layers=("global", "local"),
              attention_impl="auto", init_std=0.2)
  if family == "llama":
    base.update(num_kv_heads=2, multiple_of=8)
  base.update(overrides)
  return ModelConfig(**base)


def tiny_model(family: str, seed: int = 0, **overrides):
  return models.build(tiny_config(family, **overrides), nnx.Rngs(seed))


def tokenizer_file(directory: pathlib.Path, vocab_size: int = 512) -> pathlib.Path:
  """A SentencePiece model trained on a few hundred synthetic stories."""
  rng = random.Random(0)
  stories = [synthetic.story(rng) for _ in range(300)]
  path = directory / "tokenizer.model"
  path.write_bytes(train_sentencepiece(stories, vocab_size=vocab_size, num_threads=1))
  return path


def write_tiny_workdir(workdir: pathlib.Path, tokenizer: pathlib.Path, *, family="llama",
                       step: int = 7, seed: int = 0) -> pathlib.Path:
  """An interop-style workdir: config.json, one params-only checkpoint, tokenizer.model."""
  vocab = Tokenizer(tokenizer).vocab_size
  cfg = tiny_config(family, vocab_size=vocab, init_std=0.05, max_positions=160)
  model = models.build(cfg, nnx.Rngs(seed))
  return interop_workdir.write_workdir(
      workdir, cfg, model_params(model), step=step,
      tokenizer={"kind": "sentencepiece", "path": "tokenizer.model"},
      files={"tokenizer.model": str(tokenizer)})

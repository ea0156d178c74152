"""GPT-Neo as in the released TinyStories checkpoints (transformers' `GPTNeoForCausalLM`).

Learned absolute positions (table of `max_positions`, 2048 for the released models), LayerNorm,
gelu_new MLP with biases, q/k/v projections without bias and the output projection with bias,
layers alternating global and local (window 256) attention, no 1/sqrt(head_dim) score scaling,
tied input and output embeddings. The shared pieces live in `layers.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tinystories_jax.models import layers
from tinystories_jax.models.config import ModelConfig


class GPTNeo(layers.CausalLM):
  """GPT-Neo decoder; parameters: embedding [vocab, embed], position_embedding
  [positions, embed], blocks[i].{norm1, attn, norm2, mlp}, final_norm."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.family != "gpt_neo":
      raise ValueError(f"GPTNeo needs family 'gpt_neo', got {cfg.family!r}.")
    super().__init__(cfg, rngs)
    self.position_embedding = layers.param(
        rngs, layers.normal(cfg.init_std), (cfg.max_positions, cfg.d_model),
        ("positions", "embed"), jnp.dtype(cfg.param_dtype))

  def embed_positions(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
    pos = jnp.take(self.position_embedding[...], positions_bt, axis=0)
    return x_btd + pos.astype(x_btd.dtype)

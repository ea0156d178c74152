"""llama2.c-shaped decoder (transformers' `LlamaForCausalLM` with tied embeddings).

RMSNorm, rotary embeddings (theta 10000, rotate-half layout), SwiGLU MLP whose width is rounded to
`multiple_of`, optional grouped-query attention, no biases. Positions enter only through rotary,
so `max_positions` bounds nothing at run time; it is what exports record as the context.
"""

from __future__ import annotations

from flax import nnx

from tinystories_jax.models import layers
from tinystories_jax.models.config import ModelConfig


class Llama(layers.CausalLM):
  """llama decoder; parameters: embedding [vocab, embed], blocks[i].{norm1, attn, norm2, mlp},
  final_norm, and lm_head [vocab, embed] only when embeddings are untied."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.family != "llama":
      raise ValueError(f"Llama needs family 'llama', got {cfg.family!r}.")
    super().__init__(cfg, rngs)

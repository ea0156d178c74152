"""Models: GPT-Neo (the TinyStories paper's) and llama2.c-shaped decoders in Flax NNX.

    cfg = presets.gpt_neo("33m", vocab_size=50257)
    model = build(cfg, nnx.Rngs(0))
    logits_btv = model(tokens_bt)                 # float32
    h_btd = model.hidden(tokens_bt)              # compute dtype, after the final norm
    w_vd = model.output_embedding()              # for a chunked loss

See docs/models.md.
"""

from __future__ import annotations

import jax
from flax import nnx

from tinystories_jax.models import attention, layers, presets
from tinystories_jax.models.config import ModelConfig, count_flops_per_token, count_params
from tinystories_jax.models.gpt_neo import GPTNeo
from tinystories_jax.models.layers import CausalLM
from tinystories_jax.models.llama import Llama

__all__ = [
    "CausalLM", "GPTNeo", "Llama", "ModelConfig", "attention", "build", "count_flops_per_token",
    "count_params", "presets",
]


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> CausalLM:
  """The model `cfg` describes, with freshly initialised parameters.

  Outside a mesh, parameters are plain arrays that carry their logical axis names as metadata.
  Under `jax.set_mesh(mesh)`, flax shards them as it creates them ("eager sharding"), which needs
  the logical names mapped to mesh axes: wrap the call in `nnx.logical_axis_rules(rules)` (see
  `tinystories_jax.parallel`) or in `nnx.use_eager_sharding(False)` and shard afterwards.
  """
  cls = GPTNeo if cfg.family == "gpt_neo" else Llama
  with layers.grouped_normal_draws():  # the same values, a fraction of the compile time
    if jax.sharding.get_abstract_mesh().empty:
      with nnx.use_eager_sharding(False):  # there is no mesh to shard onto
        return cls(cfg, rngs)
    return cls(cfg, rngs)

"""Running the blocks as one `lax.scan` instead of a Python loop (`ModelConfig.scan_layers`).

The parameters keep their per-block layout (`blocks[i]....`), so checkpoints, the Hugging Face
interop and the sampler see the same tree whether a model scans or not: the blocks' states are
stacked along a new leading axis inside the traced function, scanned over, and the gradient flows
back through the stack to each block. The compiler then sees one block body instead of
`num_layers` copies, which shortens compilation for deep models; the stack is one extra copy of
the block parameters per step.

Layers that differ (GPT-Neo alternates global and local attention) scan in groups: the smallest
repeating period of `attention_layers` (2 for global, local, global, local) becomes one scan
step holding that many blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def layer_period(kinds: Sequence[str]) -> int:
  """The smallest p dividing len(kinds) with kinds[i] == kinds[i % p] for every i."""
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return n


def scan_blocks(blocks: Sequence[nnx.Module], kinds: Sequence[str], x_btd: jax.Array,
                positions_bt: jax.Array, segment_ids_bt: jax.Array | None, *, remat: bool,
                deferred: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Applies `blocks` in order, as a scan over groups of one period of `kinds`; returns
  (x, None), or with `deferred` (`Block.deferred`, the norm kernels) the last block's
  (x, mlp output), whose sum the final norm forms. The deferred carry is (x, delta), its first
  delta zeros, since a scan's carry keeps one type."""
  period = layer_period(kinds)
  split = [nnx.split(block) for block in blocks]
  graphdefs = [graphdef for graphdef, _ in split[:period]]
  # stacked[j]: the states of blocks j, j + period, j + 2 period, ... stacked on a new axis 0.
  stacked = [jax.tree.map(lambda *leaves: jnp.stack(leaves), *[s for _, s in split[j::period]])
             for j in range(period)]

  def group(carry, states):
    for graphdef, state in zip(graphdefs, states):
      block = nnx.merge(graphdef, state)
      carry = (block.deferred(*carry, positions_bt, segment_ids_bt) if deferred
               else block(carry, positions_bt, segment_ids_bt))
    return carry, None

  if remat:
    group = jax.checkpoint(group)
  carry, _ = jax.lax.scan(group, (x_btd, jnp.zeros_like(x_btd)) if deferred else x_btd, stacked)
  return carry if deferred else (carry, None)

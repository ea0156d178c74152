"""Output projection + cross-entropy, plain or chunked over the sequence.

Both take the final hidden states `h_btd` and the output embedding `w_vd` and return sums (not
means) so that gradient accumulation and multi-device reductions stay exact: the caller divides by
the total number of unmasked targets once.

The chunked form scans over blocks of positions and recomputes each block's logits in the backward
pass (`jax.checkpoint`), so float32 logits never exist for more than `[B, chunk, V]` at a time. At
vocab 32000 and batch 128x256 the plain form would hold 4 GB of float32 logits (plus their
gradient); the chunked one holds a few tens of MB.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LOSS_IMPLS = ("plain", "chunked")


class LossSums(NamedTuple):
  """Per-batch sums over unmasked targets."""
  nll: jax.Array     # sum of -log p(target), float32
  z: jax.Array       # sum of logsumexp(logits)^2, float32 (the z-loss term, before its weight)
  count: jax.Array   # number of unmasked targets, float32


def _block_sums(h_bcd, w_vd, targets_bc, mask_bc) -> LossSums:
  logits_bcv = jnp.einsum("bcd,vd->bcv", h_bcd, w_vd.astype(h_bcd.dtype),
                          preferred_element_type=jnp.float32)
  lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
  target_logit_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
  mask_bc = mask_bc.astype(jnp.float32)
  return LossSums(nll=jnp.sum((lse_bc - target_logit_bc) * mask_bc),
                  z=jnp.sum(jnp.square(lse_bc) * mask_bc),
                  count=jnp.sum(mask_bc))


def plain_loss_sums(h_btd, w_vd, targets_bt, mask_bt) -> LossSums:
  """Materialises all `[B, T, V]` float32 logits; the reference for `chunked_loss_sums`."""
  return _block_sums(h_btd, w_vd, targets_bt, mask_bt)


def chunk_length(seq_len: int, chunk: int) -> int:
  """The largest divisor of `seq_len` that is at most `chunk` (so blocks tile the sequence)."""
  chunk = max(1, min(chunk, seq_len))
  while seq_len % chunk:
    chunk -= 1
  return chunk


def chunked_loss_sums(h_btd, w_vd, targets_bt, mask_bt, *, chunk: int = 128) -> LossSums:
  """Same sums as `plain_loss_sums`, computed `chunk` positions at a time."""
  b, t, d = h_btd.shape
  c = chunk_length(t, chunk)
  n = t // c
  if n == 1:
    return plain_loss_sums(h_btd, w_vd, targets_bt, mask_bt)
  # [B, T, ...] -> [n, B, c, ...]: scan over the leading block axis; the batch axis keeps its
  # sharding because only the (unsharded) sequence axis is split.
  h_nbcd = jnp.moveaxis(h_btd.reshape(b, n, c, d), 1, 0)
  tgt_nbc = jnp.moveaxis(targets_bt.reshape(b, n, c), 1, 0)
  mask_nbc = jnp.moveaxis(mask_bt.reshape(b, n, c), 1, 0)
  block = jax.checkpoint(_block_sums)

  def body(acc, xs):
    h_bcd, tgt_bc, mask_bc = xs
    s = block(h_bcd, w_vd, tgt_bc, mask_bc)
    return LossSums(*(a + x for a, x in zip(acc, s))), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, LossSums(zero, zero, zero), (h_nbcd, tgt_nbc, mask_nbc))
  return sums


def loss_sums(h_btd, w_vd, targets_bt, mask_bt, *, impl: str, chunk: int) -> LossSums:
  """Dispatches to the configured implementation (`"plain"` or `"chunked"`)."""
  if impl == "plain":
    return plain_loss_sums(h_btd, w_vd, targets_bt, mask_bt)
  if impl == "chunked":
    return chunked_loss_sums(h_btd, w_vd, targets_bt, mask_bt, chunk=chunk)
  raise ValueError(f"Unknown loss implementation {impl!r}; use one of {LOSS_IMPLS}.")

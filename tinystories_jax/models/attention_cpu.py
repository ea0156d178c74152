"""`cpu`: attention computed in query blocks that skip the keys a block cannot see.

XLA's CPU backend is memory-bound on attention at small head_dim: with D = 8 the [B, H, T, S]
score tensor costs far more to write and read than the dot products cost to compute. Three
changes, each measured (docs/models.md has the figures), make that traffic smaller:
- static query blocks, each given only the keys its causal (and window) mask can reach: about
  half the score tensor for causal attention, all but the window for local attention;
- a [B, K, T, G, S] score layout, so both matmuls are plain batched GEMMs with no transposes of
  the big tensor (q is transposed once, up front);
- normalising after the value matmul (divide the [.., D] output by the row sums instead of the
  [.., S] probabilities), one pass fewer over the scores forward and backward.
Same signature and semantics as `attention.reference_attention`; float32 inside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinystories_jax.models import attention as attn_lib


def default_block(t: int) -> int:
  """Query rows per block: 32 up to T = 256 (measured best of 16/32/64/128 at T = 256), then
  T / 8, which keeps the number of blocks (and compile time) bounded."""
  return 32 if t <= 256 else -(-t // 8)


def cpu_attention(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt, kv_segment_ids_bs,
                  scale, block: int | None = None):
  """Block-skipping exact attention (see module docstring)."""
  b, t, h, d = q_bthd.shape
  s, kh = k_bskd.shape[1], k_bskd.shape[2]
  g = h // kh
  block = block or default_block(t)
  offset = s - t  # queries are the last t of the s positions
  q = q_bthd.astype(jnp.float32).reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4)  # b k t g d
  k = k_bskd.astype(jnp.float32).transpose(0, 2, 1, 3)  # b k s d
  v = v_bskd.astype(jnp.float32).transpose(0, 2, 1, 3)
  neg = jnp.finfo(jnp.float32).min
  outs = []
  for q0 in range(0, t, block):
    q1 = min(q0 + block, t)
    k1 = min(s, q1 + offset) if causal else s
    k0 = max(0, q0 + offset - window + 1) if window is not None else 0
    logits = jnp.einsum("bktgd,bksd->bktgs", q[:, :, q0:q1], k[:, :, k0:k1]) * scale
    mask = None
    if causal:
      q_pos = jnp.arange(q0, q1, dtype=jnp.int32)[:, None] + offset
      k_pos = jnp.arange(k0, k1, dtype=jnp.int32)[None, :]
      mask = k_pos <= q_pos
      if window is not None:
        mask &= q_pos - k_pos < window
      mask = mask[None]  # 1 t s
    if q_segment_ids_bt is not None:
      qs = q_segment_ids_bt[:, q0:q1]
      seg = (qs[:, :, None] == kv_segment_ids_bs[:, None, k0:k1]) & (qs != 0)[:, :, None]
      mask = seg if mask is None else mask & seg
    if mask is not None:
      logits = jnp.where(mask[:, None, :, None, :], logits, neg)
    # Softmax is shift-invariant, so the max needs no gradient.
    top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
    e = jnp.exp(logits - top)  # masked entries: exp(min - top) == 0
    o = jnp.einsum("bktgs,bksd->bktgd", e, v[:, :, k0:k1]) / e.sum(-1, keepdims=True)
    if mask is not None:  # rows that see no key: exact zeros, like the reference
      seen = mask.any(-1)[:, None, :, None, None]  # b|1, 1, t, 1, 1
      o = jnp.where(seen, o, 0.0)
    outs.append(o)
  o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return o.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d).astype(q_bthd.dtype)


attn_lib.register_attention("cpu", cpu_attention)

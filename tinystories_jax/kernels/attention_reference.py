"""Plain-jnp attention with the flash kernels' signature: the oracle they are tested against.

Layouts: q [B, T, H, D], k and v [B, S, K, D] with K dividing H (query head h reads kv head
h // (H // K)), output [B, T, H, D] in q's dtype. The masks are those of
`tinystories_jax.models.attention`: causal is bottom-right aligned (query row i sits at key
position i + S - T, so with T == S query i sees keys j <= i), a window of W keys also needs
j > i + S - T - W, and with segment ids query i sees key j only where the ids are equal and
non-zero (0 marks padding, whose rows come out as zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so masked scores never turn into inf - inf = NaN in a max-subtracted softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_attention_args(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt,
                         kv_segment_ids_bs):
  """Validates shapes and options shared by every attention implementation.

  Raises:
    ValueError: with one sentence naming the problem.
  """
  if q_bthd.ndim != 4 or k_bskd.ndim != 4 or v_bskd.ndim != 4:
    raise ValueError("attention expects q [B, T, H, D] and k, v [B, S, K, D]; got shapes "
                     f"{q_bthd.shape}, {k_bskd.shape}, {v_bskd.shape}.")
  b, _, h, d = q_bthd.shape
  if k_bskd.shape != v_bskd.shape or k_bskd.shape[0] != b or k_bskd.shape[3] != d:
    raise ValueError(f"k {k_bskd.shape} and v {v_bskd.shape} must share [B, S, K, D] with q "
                     f"{q_bthd.shape}.")
  if h % k_bskd.shape[2]:
    raise ValueError(f"the number of kv heads ({k_bskd.shape[2]}) must divide the number of "
                     f"query heads ({h}).")
  if window is not None:
    if not causal:
      raise ValueError("window is only defined for causal attention; pass causal=True.")
    if int(window) < 1:
      raise ValueError(f"window must be a positive number of keys, got {window}.")
  if (q_segment_ids_bt is None) != (kv_segment_ids_bs is None):
    raise ValueError("pass both q_segment_ids_bt and kv_segment_ids_bs, or neither.")
  if q_segment_ids_bt is not None:
    if q_segment_ids_bt.shape != q_bthd.shape[:2]:
      raise ValueError(f"q_segment_ids_bt must be [B, T] = {q_bthd.shape[:2]}, got "
                       f"{q_segment_ids_bt.shape}.")
    if kv_segment_ids_bs.shape != k_bskd.shape[:2]:
      raise ValueError(f"kv_segment_ids_bs must be [B, S] = {k_bskd.shape[:2]}, got "
                       f"{kv_segment_ids_bs.shape}.")


def attention_mask(t, s, *, causal, window, q_segment_ids_bt=None, kv_segment_ids_bs=None):
  """Boolean mask [B or 1, T, S]: True where query i may attend key j."""
  q_pos = jnp.arange(t)[:, None] + (s - t)
  k_pos = jnp.arange(s)[None, :]
  mask_ts = jnp.ones((t, s), dtype=bool)
  if causal:
    mask_ts &= k_pos <= q_pos
  if window is not None:
    mask_ts &= k_pos > q_pos - window
  mask_bts = mask_ts[None]
  if q_segment_ids_bt is not None:
    same_bts = q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]
    mask_bts = mask_bts & same_bts & (q_segment_ids_bt != 0)[:, :, None]
  return mask_bts


def flash_attention_reference(q_bthd, k_bskd, v_bskd, *, causal=True, window=None,
                              q_segment_ids_bt=None, kv_segment_ids_bs=None, scale=None,
                              interpret=None, block_sizes=None):
  """Softmax attention in float32, materialising the full [B, K, G, T, S] score tensor.

  Args:
    q_bthd: queries [B, T, H, D].
    k_bskd: keys [B, S, K, D], K dividing H.
    v_bskd: values [B, S, K, D].
    causal: query i sees only keys j <= i + S - T.
    window: if set (causal only), query i also needs j > i + S - T - window.
    q_segment_ids_bt: int32 [B, T]; query i sees key j only where the ids are equal and
      non-zero.
    kv_segment_ids_bs: int32 [B, S], given together with q_segment_ids_bt.
    scale: multiplies q.k; None means 1 / sqrt(D).
    interpret: ignored; accepted so the reference is a drop-in for the kernel.
    block_sizes: ignored, likewise.

  Returns:
    o_bthd [B, T, H, D] in q's dtype; rows that see no key are zeros.
  """
  del interpret, block_sizes
  check_attention_args(q_bthd, k_bskd, v_bskd, causal=causal, window=window,
                       q_segment_ids_bt=q_segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs)
  b, t, h, d = q_bthd.shape
  s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
  group = h // kv_heads
  scale = d**-0.5 if scale is None else scale
  q_btkgd = q_bthd.astype(jnp.float32).reshape(b, t, kv_heads, group, d)
  scores_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST) * scale
  mask_bts = attention_mask(t, s, causal=causal, window=window,
                            q_segment_ids_bt=q_segment_ids_bt,
                            kv_segment_ids_bs=kv_segment_ids_bs)
  mask_b11ts = mask_bts[:, None, None]
  scores_bkgts = jnp.where(mask_b11ts, scores_bkgts, MASK_VALUE)
  max_bkgt1 = jax.lax.stop_gradient(scores_bkgts.max(axis=-1, keepdims=True))
  # Zeroing masked probabilities (instead of relying on exp underflow) keeps rows with no
  # visible key at exactly zero rather than a uniform average of the values.
  p_bkgts = jnp.where(mask_b11ts, jnp.exp(scores_bkgts - max_bkgt1), 0.0)
  denom_bkgt1 = p_bkgts.sum(axis=-1, keepdims=True)
  p_bkgts = p_bkgts / jnp.where(denom_bkgt1 == 0.0, 1.0, denom_bkgt1)
  o_btkgd = jnp.einsum("bkgts,bskd->btkgd", p_bkgts, v_bskd.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
  return o_btkgd.reshape(b, t, h, d).astype(q_bthd.dtype)

"""`cpu`: attention computed in query blocks that skip the keys a block cannot see.

XLA's CPU backend is memory-bound on attention at small head_dim: with D = 8 the [B, H, T, S]
score tensor costs far more to write and read than the dot products cost to compute. Each of
these changes was measured (docs/models.md and docs/training.md have the figures):
- static query blocks, each given only the keys its causal (and window) mask can reach: about
  half the score tensor for causal attention, all but the window for local attention;
- a [B, K, T, G, S] score layout, so every matmul is a plain batched GEMM over contiguous
  [T*G, S] tiles and only [.., D]-sized operands are ever transposed;
- normalising after the value matmul (scale the [.., D] output by 1 / row sum instead of the
  [.., S] probabilities);
- a hand-written backward (`jax.custom_vjp`) that keeps the forward's unnormalised
  probabilities instead of differentiating through the softmax: dS = E * (dP - rowsum(dO * O))
  / rowsum(E), the dV and dK matmuls written as [D, S] = [D, T*G] x [T*G, S] so no score-sized
  tensor is transposed, and dP = dO V^T at D <= 16 as D broadcast multiply-adds that fuse into
  the dS expression (XLA:CPU's GEMM is slow at a contraction of 8);
- the causal / window mask as an additive constant (0 or float32 min), which XLA fuses into the
  logits matmul; segment ids (data-dependent) use a select.
Same signature and semantics as `attention.reference_attention`; float32 inside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tinystories_jax.models import attention as attn_lib

_NEG = float(np.finfo(np.float32).min)
# At or below this head_dim, dO V^T in the backward is D fused multiply-adds instead of a GEMM.
_ELEMENTWISE_MAX_D = 16


def default_block(t: int) -> int:
  """Query rows per block: 32 up to T = 256, then T / 8, which keeps the number of blocks (and
  compile time) bounded. At T = 256, 16 measured 3-12% faster than 32 on a shared machine but
  compiles twice as many pieces (docs/models.md); 64 and 128 were slower."""
  return 32 if t <= 256 else -(-t // 8)


def _spans(t: int, s: int, block: int, causal: bool, window: int | None):
  """Static (q0, q1, k0, k1) per query block: rows [q0, q1) read keys [k0, k1)."""
  offset = s - t  # queries are the last t of the s positions
  spans = []
  for q0 in range(0, t, block):
    q1 = min(q0 + block, t)
    k1 = min(s, q1 + offset) if causal else s
    k0 = max(0, q0 + offset - window + 1) if window is not None else 0
    spans.append((q0, q1, k0, max(k0, k1)))
  return spans


def _structural(span, t: int, s: int, causal: bool, window: int | None) -> np.ndarray | None:
  """The [tb, kb] causal / window mask of a block as a numpy constant; None when all visible."""
  if not causal:
    return None
  q0, q1, k0, k1 = span
  q_pos = np.arange(q0, q1)[:, None] + (s - t)
  k_pos = np.arange(k0, k1)[None, :]
  mask = k_pos <= q_pos
  if window is not None:
    mask &= q_pos - k_pos < window
  return None if mask.all() else mask


def _block_mask(span, t, s, causal, window, qseg, kseg):
  """(additive bias or None, boolean mask or None, rows-that-see-a-key or None) of a block.

  Broadcastable against the [b, k, tb, g, kb] scores / [b, k, tb, g] rows.
  """
  q0, q1, k0, k1 = span
  structural = _structural(span, t, s, causal, window)
  if qseg is None:
    if structural is None:
      return None, None, None
    bias = np.where(structural, 0.0, _NEG).astype(np.float32)[None, None, :, None, :]
    seen = structural.any(-1)
    return bias, None, None if seen.all() else seen[None, None, :, None]
  qs = qseg[:, q0:q1]
  mask = (qs[:, :, None] == kseg[:, None, k0:k1]) & (qs != 0)[:, :, None]  # b tb kb
  if structural is not None:
    mask &= structural[None]
  return None, mask[:, None, :, None, :], mask.any(-1)[:, None, :, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attend(q, k, v, qseg, kseg, causal, window, block):
  return _attend_fwd(q, k, v, qseg, kseg, causal, window, block)[0]


def _attend_fwd(q, k, v, qseg, kseg, causal, window, block):
  """q [b, kh, t, g, d] (already scaled), k / v [b, kh, s, d] -> o [b, kh, t, g, d]."""
  b, kh, t, g, d = q.shape
  s = k.shape[2]
  k_t = k.swapaxes(-1, -2)  # b kh d s: the logits matmul is then [T*G, D] x [D, S]
  spans = _spans(t, s, block, causal, window)
  masks = [_block_mask(span, t, s, causal, window, qseg, kseg) for span in spans]
  # Every layer builds the same bias constants. Shared, XLA would materialise their [b, k, tb,
  # g, kb] broadcasts once for all layers and stream them in; tied to this call's q by a
  # barrier, each layer's broadcast fuses into its logits matmul instead (measured faster).
  biases = [None if m[0] is None else jnp.asarray(m[0]) for m in masks]
  biases, q = jax.lax.optimization_barrier((biases, q))
  outs, probs, inv_sums = [], [], []
  for span, (_, mask, seen), bias in zip(spans, masks, biases):
    q0, q1, k0, k1 = span
    tb, kb = q1 - q0, k1 - k0
    if kb == 0:  # nothing visible (queries before the first key): zeros, like the reference
      outs.append(jnp.zeros((b, kh, tb, g, d), jnp.float32))
      probs.append(None)
      inv_sums.append(None)
      continue
    qb = q[:, :, q0:q1].reshape(b, kh, tb * g, d)
    logits = jnp.einsum("bkmd,bkds->bkms", qb, k_t[..., k0:k1]).reshape(b, kh, tb, g, kb)
    if bias is not None:
      logits = logits + bias
    if mask is not None:
      logits = jnp.where(mask, logits, _NEG)
    # Softmax is shift-invariant, so the max needs no gradient (the backward never uses it).
    e = jnp.exp(logits - logits.max(-1, keepdims=True))  # masked entries: exp(min - top) == 0
    inv = 1.0 / e.sum(-1)
    if seen is not None:  # rows that see no key: exact zeros, like the reference
      inv = jnp.where(seen, inv, 0.0)
    o = jnp.einsum("bkms,bksd->bkmd", e.reshape(b, kh, tb * g, kb), v[:, :, k0:k1])
    outs.append(o.reshape(b, kh, tb, g, d) * inv[..., None])
    probs.append(e)
    inv_sums.append(inv)
  o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return o, (q, k, v, qseg, kseg, o, probs, inv_sums)


def _attend_bwd(causal, window, block, res, do):
  q, k, v, qseg, kseg, o, probs, inv_sums = res
  b, kh, t, g, d = q.shape
  s = k.shape[2]
  v_t = v.swapaxes(-1, -2)  # b kh d s
  q_t = q.reshape(b, kh, t * g, d).swapaxes(-1, -2)  # b kh d t*g
  delta = jnp.sum(do * o, -1)  # rowsum(dO * O): b kh t g
  dqs = []
  dk_t = jnp.zeros((b, kh, d, s), jnp.float32)
  dv_t = jnp.zeros((b, kh, d, s), jnp.float32)
  for span, e, inv in zip(_spans(t, s, block, causal, window), probs, inv_sums):
    q0, q1, k0, k1 = span
    tb, kb = q1 - q0, k1 - k0
    if e is None:
      dqs.append(jnp.zeros((b, kh, tb, g, d), jnp.float32))
      continue
    dob = do[:, :, q0:q1] * inv[..., None]  # dO / rowsum(E): b kh tb g d
    if d <= _ELEMENTWISE_MAX_D:
      vb = v_t[..., k0:k1]
      dp = sum(dob[..., i, None] * vb[:, :, i, None, None, :] for i in range(d))
    else:
      dp = jnp.einsum("bkmd,bkds->bkms", dob.reshape(b, kh, tb * g, d),
                      v_t[..., k0:k1]).reshape(b, kh, tb, g, kb)
    ds = e * (dp - (delta[:, :, q0:q1] * inv)[..., None])  # b kh tb g kb
    ds = ds.reshape(b, kh, tb * g, kb)
    e = e.reshape(b, kh, tb * g, kb)
    dob_t = dob.reshape(b, kh, tb * g, d).swapaxes(-1, -2)  # b kh d tb*g
    dv_t = dv_t.at[..., k0:k1].add(jnp.einsum("bkdm,bkms->bkds", dob_t, e))
    dk_t = dk_t.at[..., k0:k1].add(jnp.einsum("bkdm,bkms->bkds", q_t[..., q0 * g:q1 * g], ds))
    dqs.append(jnp.einsum("bkms,bksd->bkmd", ds, k[:, :, k0:k1]).reshape(b, kh, tb, g, d))
  dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=2)
  return dq, dk_t.swapaxes(-1, -2), dv_t.swapaxes(-1, -2), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def cpu_attention(q_bthd, k_bskd, v_bskd, *, causal, window, q_segment_ids_bt, kv_segment_ids_bs,
                  scale, block: int | None = None):
  """Block-skipping exact attention (see module docstring)."""
  b, t, h, d = q_bthd.shape
  s, kh = k_bskd.shape[1], k_bskd.shape[2]
  g = h // kh
  block = block or default_block(t)
  # The scale goes into q once ([.., D]) instead of into every score.
  q = (q_bthd.astype(jnp.float32) * scale).reshape(b, t, kh, g, d).transpose(0, 2, 1, 3, 4)
  k = k_bskd.astype(jnp.float32).transpose(0, 2, 1, 3)  # b k s d
  v = v_bskd.astype(jnp.float32).transpose(0, 2, 1, 3)
  o = _attend(q, k, v, q_segment_ids_bt, kv_segment_ids_bs, causal, window, block)
  return o.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d).astype(q_bthd.dtype)


attn_lib.register_attention("cpu", cpu_attention)

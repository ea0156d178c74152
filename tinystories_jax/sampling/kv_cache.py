"""The KV cache and the two cached forward passes: prefill a prompt batch, decode one token.

Both passes are built from the model's own pieces (`norm1`, `attn.qkv / rotate / attend / out`,
`norm2`, `mlp`, `final_norm`, `embed_positions`, `logits`), so a cached decode is the same network
as `model(tokens)`, only evaluated incrementally.

Layout. Prompts of different lengths share one batch **left-padded** to a common length P: row b
starts with `pad_b[b]` padding slots, then its prompt. Slot s of row b therefore holds position
`s - pad_b[b]`, and every row writes its next token into the same slot, so the cache update is one
`dynamic_update_slice` at a scalar index (in place inside the jitted loop).

Each layer keeps `k_bkld` / `v_bkld` of shape [B, K, L, D] (after rotary; heads before slots so
the decode's attention dots need no transposed copy of the cache), used as a ring: slot s
lives at ring index `s % L`. Global layers get L = the whole sequence (prompt + new tokens), so the
ring never wraps; sliding-window layers get L = min(window, sequence), so their cache is bounded
by the window however long the story grows. With `cur` the newest slot written, ring index j holds
slot `a = cur - ((cur - j) mod L)` — the latest slot congruent to j — and a key is visible iff
`a >= pad_b` (not padding). Because a > cur - L >= cur - window, the window needs no extra mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinystories_jax.models.config import ModelConfig


class KVCache(NamedTuple):
  """Per-layer keys and values plus the bookkeeping every layer shares.

  Attributes:
    k: per layer, k_bkld [B, K, L_layer, D] in the compute dtype, rotary already applied.
    v: per layer, v_bkld [B, K, L_layer, D].
    pad_b: int32 [B], left-padding slots of each row.
    cur: int32 scalar, the newest slot written (P - 1 right after prefill).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  pad_b: jax.Array
  cur: jax.Array


def layer_lengths(cfg: ModelConfig, seq_len: int) -> tuple[int, ...]:
  """Cache slots per layer for sequences of `seq_len` (prompt slots + new tokens)."""
  return tuple(seq_len if kind == "global" else min(cfg.window, seq_len)
               for kind in cfg.attention_layers)


def cache_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
  """Bytes the cache of `batch` rows of `seq_len` slots takes."""
  per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  return batch * per_slot * sum(layer_lengths(cfg, seq_len))


def _ring_slots(cur: jax.Array, length: int) -> jax.Array:
  """int32 [L]: the slot each ring index holds when `cur` is the newest slot written."""
  j = jnp.arange(length, dtype=jnp.int32)
  return cur - jnp.mod(cur - j, length)


def _positions(pad_b: jax.Array, slots: jax.Array) -> jax.Array:
  """Positions of `slots` in each row (padding slots clamp to 0; they are never attended)."""
  return jnp.maximum(slots[None, :] - pad_b[:, None], 0).astype(jnp.int32)


def prefill(model, tokens_bp: jax.Array, pad_b: jax.Array, seq_len: int,
            *, all_logits: bool = False) -> tuple[jax.Array, KVCache]:
  """Runs the left-padded prompts through the model and fills a cache of `seq_len` slots.

  Args:
    model: a `CausalLM` (or the merged module inside a jitted function).
    tokens_bp: int32 [B, P], prompts left-padded (the padding id does not matter).
    pad_b: int32 [B], padding slots per row; every row needs at least one real token.
    seq_len: slots the cache holds, P + the most new tokens to decode.
    all_logits: return logits at every slot [B, P, V] instead of the last [B, V].

  Returns:
    (float32 logits of the last slot [B, V] (or all slots), the filled cache).
  """
  cfg: ModelConfig = model.cfg
  b, p = tokens_bp.shape
  if seq_len < p:
    raise ValueError(f"the cache needs at least the prompt's {p} slots, got seq_len={seq_len}.")
  slots = jnp.arange(p, dtype=jnp.int32)
  positions_bp = _positions(pad_b, slots)
  # Segment 1 = prompt, 0 = padding: the model's attention then masks padding keys, and causal
  # plus window masks count in slots, which equal positions within a row.
  seg_bp = (slots[None, :] >= pad_b[:, None]).astype(jnp.int32)
  dt = jnp.dtype(cfg.dtype)
  x = jnp.take(model.embedding[...], tokens_bp, axis=0).astype(dt)
  x = model.embed_positions(x, positions_bp)
  ks, vs = [], []
  for block, length in zip(model.blocks, layer_lengths(cfg, seq_len)):
    q, k, v = block.attn.qkv(block.norm1(x))
    q, k = block.attn.rotate(q, k, positions_bp, positions_bp)
    o = block.attn.attend(q, k, v, q_segment_ids_bt=seg_bp, kv_segment_ids_bs=seg_bp)
    x = x + block.attn.out(o)
    x = x + block.mlp(block.norm2(x))
    ks.append(_fill_ring(k, length))
    vs.append(_fill_ring(v, length))
  h = model.final_norm(x if all_logits else x[:, -1:])
  logits = model.logits(h)
  cache = KVCache(tuple(ks), tuple(vs), pad_b.astype(jnp.int32), jnp.asarray(p - 1, jnp.int32))
  return (logits if all_logits else logits[:, 0]), cache


def _fill_ring(x_bpkd: jax.Array, length: int) -> jax.Array:
  """x_bkld: the ring of `length` slots holding the latest of the P prompt slots (zeros
  elsewhere)."""
  p = x_bpkd.shape[1]
  x_bkpd = jnp.swapaxes(x_bpkd, 1, 2)
  if length >= p:
    return jnp.pad(x_bkpd, ((0, 0), (0, 0), (0, length - p), (0, 0)))
  held = _ring_slots(jnp.asarray(p - 1, jnp.int32), length)  # all >= 0 since length < p
  return jnp.take(x_bkpd, held, axis=2)


def decode_step(model, cache: KVCache, token_b: jax.Array) -> tuple[jax.Array, KVCache]:
  """Feeds one token per row at slot `cache.cur + 1`; returns float32 logits [B, V] and the cache.

  The cache arrays are updated with `dynamic_update_slice`, which XLA performs in place when the
  caller donates the cache (or runs this inside a `while_loop`).
  """
  cfg: ModelConfig = model.cfg
  cur = cache.cur + 1
  positions_b1 = (cur - cache.pad_b)[:, None].astype(jnp.int32)
  dt = jnp.dtype(cfg.dtype)
  x = jnp.take(model.embedding[...], token_b[:, None], axis=0).astype(dt)
  x = model.embed_positions(x, positions_b1)
  ks, vs = [], []
  for block, k_cache, v_cache in zip(model.blocks, cache.k, cache.v):
    length = k_cache.shape[2]
    q, k, v = block.attn.qkv(block.norm1(x))
    q, k = block.attn.rotate(q, k, positions_b1, positions_b1)
    index = jnp.mod(cur, length)
    zero = jnp.zeros((), jnp.int32)
    k_cache = jax.lax.dynamic_update_slice(k_cache, jnp.swapaxes(k, 1, 2).astype(k_cache.dtype),
                                           (zero, zero, index, zero))
    v_cache = jax.lax.dynamic_update_slice(v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype),
                                           (zero, zero, index, zero))
    visible_bl = _ring_slots(cur, length)[None, :] >= cache.pad_b[:, None]
    o = cached_attention(q, k_cache, v_cache, visible_bl, scale=block.attn.scale)
    x = x + block.attn.out(o)
    x = x + block.mlp(block.norm2(x))
    ks.append(k_cache)
    vs.append(v_cache)
  logits = model.logits(model.final_norm(x))[:, 0]
  return logits, KVCache(tuple(ks), tuple(vs), cache.pad_b, cur)


def cached_attention(q_b1hd: jax.Array, k_bkld: jax.Array, v_bkld: jax.Array,
                     visible_bl: jax.Array, *, scale: float | None) -> jax.Array:
  """One query per row against its cache (grouped-query), float32 softmax; o_b1hd in q's dtype.

  `scale=None` means 1/sqrt(D) (the model's own convention; GPT-Neo passes 1.0).
  """
  b, _, h, d = q_b1hd.shape
  kh = k_bkld.shape[1]
  scale = d ** -0.5 if scale is None else scale
  q = q_b1hd.reshape(b, kh, h // kh, d)
  scores = jnp.einsum("bkgd,bkld->bkgl", q, k_bkld,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(visible_bl[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  o = jnp.einsum("bkgl,bkld->bkgd", probs.astype(v_bkld.dtype), v_bkld,
                 preferred_element_type=jnp.float32)
  return o.reshape(b, 1, h, d).astype(q_b1hd.dtype)

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

# XLA options for the jitted loops that call `decode_step`. On the CPU, region-based copy
# insertion lets the cache updates inside a `while_loop` happen in place; without it XLA copied
# every layer's cache once or twice a step. It is a CPU option; other backends ignore it.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


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


def decode_step(model, cache: KVCache, token_b: jax.Array,
                out_dv: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """Feeds one token per row at slot `cache.cur + 1`; returns float32 logits [B, V] and the cache.

  The cache arrays are updated with `dynamic_update_slice`, which XLA performs in place when the
  caller donates the cache (or runs this inside a `while_loop`). `out_dv`, when given, is the
  model's output projection transposed to [D, V] in the compute dtype (`output_projection`):
  the same logits, and XLA's CPU matmul was faster with that layout at batch 64 (8.5 against
  11 ms a step for the llama 15m shape's 32000-token vocabulary).
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
    k_bk1d = jnp.swapaxes(k, 1, 2).astype(k_cache.dtype)
    v_bk1d = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)
    # Attend to the cache as it was plus the new key, so nothing reads the updated cache in this
    # step and the update below can stay in place (with DECODE_COMPILER_OPTIONS). The ring index
    # about to be overwritten holds slot cur - L, which has left the window (or, in a global
    # layer, nothing yet): it is masked.
    slots_l = _ring_slots(cur, length)
    visible_bl = (slots_l[None, :] >= cache.pad_b[:, None]) & (slots_l != cur)[None, :]
    o = cached_attention(q, k_cache, v_cache, visible_bl, k_bk1d, v_bk1d,
                         scale=block.attn.scale)
    index = jnp.mod(cur, length)
    zero = jnp.zeros((), jnp.int32)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_bk1d, (zero, zero, index, zero))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_bk1d, (zero, zero, index, zero))
    x = x + block.attn.out(o)
    x = x + block.mlp(block.norm2(x))
    ks.append(k_cache)
    vs.append(v_cache)
  h = model.final_norm(x)
  if out_dv is None:
    logits = model.logits(h)[:, 0]
  else:
    logits = jnp.einsum("btd,dv->bv", h, out_dv.astype(h.dtype),
                        preferred_element_type=jnp.float32)
  return logits, KVCache(tuple(ks), tuple(vs), cache.pad_b, cur)


def output_projection(model) -> jax.Array:
  """w_dv [D, V]: the model's output projection, transposed and cast to the compute dtype once,
  for `decode_step`'s `out_dv`."""
  return jnp.transpose(model.output_embedding()).astype(jnp.dtype(model.cfg.dtype))


def cached_attention(q_b1hd: jax.Array, k_bkld: jax.Array, v_bkld: jax.Array,
                     visible_bl: jax.Array, k_new_bk1d: jax.Array, v_new_bk1d: jax.Array, *,
                     scale: float | None) -> jax.Array:
  """One query per row against its cache and its own new key (grouped-query), float32 softmax;
  o_b1hd in q's dtype.

  `visible_bl` masks the cache's L slots; `k_new_bk1d` / `v_new_bk1d` are the key and value of
  the token being fed, which every row sees, kept apart from the cache so that the caller may
  update the cache in place afterwards. `scale=None` means 1/sqrt(D) (the model's own
  convention; GPT-Neo passes 1.0).
  """
  b, _, h, d = q_b1hd.shape
  kh = k_bkld.shape[1]
  scale = d ** -0.5 if scale is None else scale
  q = q_b1hd.reshape(b, kh, h // kh, d)
  scores = jnp.einsum("bkgd,bkld->bkgl", q, k_bkld,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(visible_bl[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  new = jnp.einsum("bkgd,bkd->bkg", q, k_new_bk1d[:, :, 0],
                   preferred_element_type=jnp.float32)[..., None] * scale
  top = jnp.maximum(scores.max(-1, keepdims=True), new)
  e_cache, e_new = jnp.exp(scores - top), jnp.exp(new - top)
  denom = e_cache.sum(-1, keepdims=True) + e_new
  o = jnp.einsum("bkgl,bkld->bkgd", e_cache.astype(v_bkld.dtype), v_bkld,
                 preferred_element_type=jnp.float32)
  o = (o + e_new * v_new_bk1d.astype(jnp.float32)) / denom
  return o.reshape(b, 1, h, d).astype(q_b1hd.dtype)

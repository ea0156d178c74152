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

Chunks. A layer's L slots are held as a few separate arrays of consecutive ring indices
(`chunk_sizes`: 64 slots each, at most 8 chunks), and a decode step attends only to the chunks
that hold a written slot (a `lax.cond` per chunk, merged with the online-softmax rule). Attention
over the cache is a large part of a batched CPU step, and its cost grows with the slots it reads:
a story's cache is on average half empty, so this reads about half as much (docs/sampling.md).
Separate arrays, not slices of one, so that no chunk is copied to be read. `prefill(...,
chunked=False)` keeps each layer's cache whole instead: one array, every slot attended under the
mask, no `lax.cond`. The sampler does that off the CPU, where reading a few hundred cached slots is
cheap next to a conditional that XLA may run by copying its predicate to the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tinystories_jax.models import layers
from tinystories_jax.models.config import ModelConfig

# XLA options for the jitted loops that call `decode_step`. On the CPU, region-based copy
# insertion lets the cache updates inside a `while_loop` happen in place; without it XLA copied
# every layer's cache once or twice a step. It is a CPU option; other backends ignore it.
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


# A layer's cache is split into chunks of CACHE_CHUNK slots, or into MAX_CHUNKS chunks when that
# gives larger ones (a long cache would otherwise compile into many small attention pieces).
CACHE_CHUNK = 64
MAX_CHUNKS = 8


def chunk_sizes(length: int, chunked: bool = True) -> tuple[int, ...]:
  """Slots of each chunk of a `length`-slot layer cache (consecutive ring indices); one chunk of
  `length` slots when not `chunked`."""
  if not chunked:
    return (length,)
  size = max(CACHE_CHUNK, -(-length // MAX_CHUNKS))
  return tuple(min(size, length - start) for start in range(0, length, size))


class KVCache(NamedTuple):
  """Per-layer keys and values plus the bookkeeping every layer shares.

  Attributes:
    k: per layer, the chunks (`chunk_sizes`) of k_bkld [B, K, L_layer, D] in the compute dtype,
      rotary already applied: chunk c holds ring indices [sum of earlier sizes, + its size).
    v: per layer, the chunks of v_bkld [B, K, L_layer, D].
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
            *, all_logits: bool = False, chunked: bool = True) -> tuple[jax.Array, KVCache]:
  """Runs the left-padded prompts through the model and fills a cache of `seq_len` slots.

  Args:
    model: a `CausalLM` (or the merged module inside a jitted function).
    tokens_bp: int32 [B, P], prompts left-padded (the padding id does not matter).
    pad_b: int32 [B], padding slots per row; every row needs at least one real token.
    seq_len: slots the cache holds, P + the most new tokens to decode.
    all_logits: return logits at every slot [B, P, V] instead of the last [B, V].
    chunked: hold each layer's cache in `chunk_sizes` chunks (decode steps skip the empty ones)
      rather than as one array; `decode_step` follows whichever layout the cache has.

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
    ks.append(_split(_fill_ring(k, length), chunked))
    vs.append(_split(_fill_ring(v, length), chunked))
  h = model.final_norm(x if all_logits else x[:, -1:])
  logits = model.logits(h)
  cache = KVCache(tuple(ks), tuple(vs), pad_b.astype(jnp.int32), jnp.asarray(p - 1, jnp.int32))
  return (logits if all_logits else logits[:, 0]), cache


def _split(x_bkld: jax.Array, chunked: bool) -> tuple[jax.Array, ...]:
  starts = _chunk_starts(chunk_sizes(x_bkld.shape[2], chunked))
  return tuple(x_bkld[:, :, a:b] for a, b in zip(starts[:-1], starts[1:]))


def _chunk_starts(sizes) -> list[int]:
  starts = [0]
  for n in sizes:
    starts.append(starts[-1] + n)
  return starts


def _fill_ring(x_bpkd: jax.Array, length: int) -> jax.Array:
  """x_bkld: the ring of `length` slots holding the latest of the P prompt slots (zeros
  elsewhere)."""
  p = x_bpkd.shape[1]
  x_bkpd = jnp.swapaxes(x_bpkd, 1, 2)
  if length >= p:
    return jnp.pad(x_bkpd, ((0, 0), (0, 0), (0, length - p), (0, 0)))
  held = _ring_slots(jnp.asarray(p - 1, jnp.int32), length)  # all >= 0 since length < p
  return jnp.take(x_bkpd, held, axis=2)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("out", "qkv", "o", "up", "down"), meta_fields=("rows",))
@dataclasses.dataclass(frozen=True)
class DecodeWeights:
  """The model's matrices laid out for one-token steps (`decode_weights`).

  Every matrix is stored as [in, out] ("columns"), or as [out, in] when `rows` is set. Per layer:
  `qkv` is wq | wk | wv side by side, one matmul instead of three; `o` is wo as [H * hd, D];
  `up` is SwiGLU's w_gate | w_up side by side (or GPT-Neo's w_in), `down` its w_down (w_out).
  `out` is the output projection. A one-token step streams every weight from memory once, and
  fewer, wider matmuls stream faster on the CPU (docs/sampling.md).

  Columns suit XLA:CPU's matrix-matrix products (batch > 1; [D, V] ran the 15m shape's output
  layer at 8.5 against 11 ms a step at batch 64). Rows suit its matrix-vector products (batch 1)
  on 16-bit weights: XLA then converts each weight to the compute dtype inside the product, so
  the step streams half the bytes (docs/sampling.md, "bfloat16 matmuls").
  """
  out: jax.Array
  qkv: tuple[jax.Array, ...]
  o: tuple[jax.Array, ...]
  up: tuple[jax.Array, ...]
  down: tuple[jax.Array, ...]
  rows: bool = False


def decode_weights(model, *, rows: bool = False, dtype=None) -> DecodeWeights:
  """Packs `model`'s weights for `decode_step` (a copy; the model is unchanged).

  Args:
    model: a `CausalLM`.
    rows: store matrices as [out, in] (for batch-1 steps on 16-bit weights), else [in, out].
    dtype: the storage dtype (default: the model's compute dtype). The step computes in the
      compute dtype either way.
  """
  dt = jnp.dtype(dtype or model.cfg.dtype)

  def lay(w_io):
    return (jnp.transpose(w_io) if rows else w_io).astype(dt)

  qkv, o, up, down = [], [], [], []
  for block in model.blocks:
    a, mlp = block.attn, block.mlp
    d = a.wq.shape[0]
    qkv.append(lay(jnp.concatenate([w[...].reshape(d, -1) for w in (a.wq, a.wk, a.wv)], axis=1)))
    o.append(lay(a.wo[...].reshape(-1, d)))
    if isinstance(mlp, layers.SwiGLU):
      up.append(lay(jnp.concatenate([mlp.w_gate[...], mlp.w_up[...]], axis=1)))
      down.append(lay(mlp.w_down[...]))
    else:
      up.append(lay(mlp.w_in[...]))
      down.append(lay(mlp.w_out[...]))
  out = model.output_embedding()  # [V, D]
  out = (out if rows else jnp.transpose(out)).astype(dt)
  return DecodeWeights(out, tuple(qkv), tuple(o), tuple(up), tuple(down), rows)


def _linear(x_btk: jax.Array, w: jax.Array, rows: bool,
            dtype: jnp.dtype | None = None) -> jax.Array:
  """x @ w for a one-token step, returned in `dtype` (default x's); w laid out as
  `DecodeWeights` says.

  16-bit weights: x is rounded to w's dtype and the products accumulate in float32 (XLA:CPU
  ran [64, 288] x [288, 32000] so at about twice its float32 rate, and 6x faster than with a
  16-bit result). Otherwise everything computes in `dtype`.
  """
  dt = jnp.dtype(dtype or x_btk.dtype)
  if w.dtype.itemsize != 2:
    x_btk, w = x_btk.astype(dt), w.astype(dt)
    if rows:
      return (x_btk[:, 0] @ w.T)[:, None]
    return jnp.einsum("btk,kn->btn", x_btk, w)
  x_btk = x_btk.astype(w.dtype)
  if not rows:
    return jnp.einsum("btk,kn->btn", x_btk, w, preferred_element_type=jnp.float32).astype(dt)
  # The barrier keeps the conversion of w inside the loop body, fused into the matrix-vector
  # product (the same products as above: 16-bit values are exact in float32): XLA would
  # otherwise hoist a float32 copy of every weight out of the loop and stream that, the very
  # bytes the 16-bit storage saves.
  x_btk, w = jax.lax.optimization_barrier((x_btk, w))
  y_bn = x_btk[:, 0].astype(jnp.float32) @ w.astype(jnp.float32).T
  return y_bn[:, None].astype(dt)


def decode_step(model, cache: KVCache, token_b: jax.Array,
                weights: DecodeWeights | None = None) -> tuple[jax.Array, KVCache]:
  """Feeds one token per row at slot `cache.cur + 1`; returns float32 logits [B, V] and the cache.

  The cache arrays are updated with `dynamic_update_slice`, which XLA performs in place when the
  caller donates the cache (or runs this inside a `while_loop`). `weights`, when given, are the
  model's matrices packed by `decode_weights` (the same network, fewer and wider matmuls);
  otherwise the model's own modules compute every piece.
  """
  cfg: ModelConfig = model.cfg
  cur = cache.cur + 1
  positions_b1 = (cur - cache.pad_b)[:, None].astype(jnp.int32)
  dt = jnp.dtype(cfg.dtype)
  b = token_b.shape[0]
  x = jnp.take(model.embedding[...], token_b[:, None], axis=0).astype(dt)
  x = model.embed_positions(x, positions_b1)
  ks, vs = [], []
  for i, (block, k_chunks, v_chunks) in enumerate(zip(model.blocks, cache.k, cache.v)):
    attn, mlp = block.attn, block.mlp
    length = sum(c.shape[2] for c in k_chunks)
    if weights is None:
      q, k, v = attn.qkv(block.norm1(x))
    else:
      h, kh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
      y = _linear(block.norm1(x), weights.qkv[i], weights.rows, dt)
      q, k, v = jnp.split(y, [h * hd, (h + kh) * hd], axis=-1)
      q, k, v = q.reshape(b, 1, h, hd), k.reshape(b, 1, kh, hd), v.reshape(b, 1, kh, hd)
    q, k = attn.rotate(q, k, positions_b1, positions_b1)
    k_bk1d = jnp.swapaxes(k, 1, 2).astype(k_chunks[0].dtype)
    v_bk1d = jnp.swapaxes(v, 1, 2).astype(v_chunks[0].dtype)
    # Attend to the cache as it was plus the new key, so nothing reads the updated cache in this
    # step and the update below can stay in place (with DECODE_COMPILER_OPTIONS). The ring index
    # about to be overwritten holds slot cur - L, which has left the window (or, in a global
    # layer, nothing yet): it is masked.
    slots_l = _ring_slots(cur, length)
    visible_bl = (slots_l[None, :] >= cache.pad_b[:, None]) & (slots_l != cur)[None, :]
    o = cached_attention(q, k_chunks, v_chunks, visible_bl, k_bk1d, v_bk1d, cur,
                         scale=attn.scale)
    index = jnp.mod(cur, length)
    k_chunks = _write(k_chunks, k_bk1d, index)
    v_chunks = _write(v_chunks, v_bk1d, index)
    if weights is None:
      x = x + attn.out(o)
      x = x + mlp(block.norm2(x))
    else:
      y = _linear(o.reshape(b, 1, -1), weights.o[i], weights.rows, dt)
      x = x + (y if attn.bo is None else y + attn.bo[...].astype(dt))
      y = _linear(block.norm2(x), weights.up[i], weights.rows, dt)
      if isinstance(mlp, layers.SwiGLU):
        gate, up = jnp.split(y, 2, axis=-1)
        y = _linear(jax.nn.silu(gate) * up, weights.down[i], weights.rows, dt)
      else:
        y = jax.nn.gelu(y + mlp.b_in[...].astype(dt), approximate=True)
        y = _linear(y, weights.down[i], weights.rows, dt) + mlp.b_out[...].astype(dt)
      x = x + y
    ks.append(k_chunks)
    vs.append(v_chunks)
  h = model.final_norm(x)
  if weights is None:
    logits = model.logits(h)[:, 0]
  else:
    logits = _linear(h, weights.out, weights.rows, jnp.float32)[:, 0]
  return logits, KVCache(tuple(ks), tuple(vs), cache.pad_b, cur)


def _write(chunks: tuple[jax.Array, ...], x_bk1d: jax.Array,
           index: jax.Array) -> tuple[jax.Array, ...]:
  """Writes x at ring index `index`: into the chunk holding it; every other chunk rewrites one of
  its own slots unchanged, so each update stays a one-slot `dynamic_update_slice` in place."""
  starts = _chunk_starts(c.shape[2] for c in chunks)
  out = []
  for c, start in zip(chunks, starts):
    n = c.shape[2]
    if len(chunks) == 1:
      out.append(jax.lax.dynamic_update_slice_in_dim(c, x_bk1d, index, axis=2))
      continue
    offset = jnp.clip(index - start, 0, n - 1)
    hit = (index >= start) & (index < start + n)
    old = jax.lax.dynamic_slice_in_dim(c, offset, 1, axis=2)
    out.append(jax.lax.dynamic_update_slice_in_dim(c, jnp.where(hit, x_bk1d, old), offset,
                                                   axis=2))
  return tuple(out)


def cached_attention(q_b1hd: jax.Array, k_chunks: tuple[jax.Array, ...],
                     v_chunks: tuple[jax.Array, ...], visible_bl: jax.Array,
                     k_new_bk1d: jax.Array, v_new_bk1d: jax.Array, cur: jax.Array, *,
                     scale: float | None) -> jax.Array:
  """One query per row against its cache and its own new key (grouped-query), float32 softmax;
  o_b1hd in q's dtype.

  `k_chunks` / `v_chunks` are a layer's cache chunks [B, K, L_c, D]; `visible_bl` masks the
  layer's L slots. `k_new_bk1d` / `v_new_bk1d` are the key and value of the token being fed at
  slot `cur`, which every row sees, kept apart from the cache so that the caller may update the
  cache in place afterwards. A chunk whose first ring index is not below `cur` holds no written
  slot yet and is skipped. `scale=None` means 1/sqrt(D) (the model's own convention; GPT-Neo
  passes 1.0).
  """
  b, _, h, d = q_b1hd.shape
  kh = k_chunks[0].shape[1]
  g = h // kh
  scale = d ** -0.5 if scale is None else scale
  q = q_b1hd.reshape(b, kh, g, d)
  lowest = jnp.finfo(jnp.float32).min

  def part(q, k_bkld, v_bkld, visible_bl):
    scores = jnp.einsum("bkgd,bkld->bkgl", q, k_bkld,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible_bl[:, None, None, :], scores, lowest)
    top = scores.max(-1)
    e = jnp.exp(scores - top[..., None])
    o = jnp.einsum("bkgl,bkld->bkgd", e.astype(v_bkld.dtype), v_bkld,
                   preferred_element_type=jnp.float32)
    return top, e.sum(-1), o

  def empty(q, k_bkld, v_bkld, visible_bl):
    del q, k_bkld, v_bkld, visible_bl
    return (jnp.full((b, kh, g), lowest), jnp.zeros((b, kh, g), jnp.float32),
            jnp.zeros((b, kh, g, d), jnp.float32))

  parts = []
  starts = _chunk_starts(c.shape[2] for c in k_chunks)
  for k_bkld, v_bkld, start, end in zip(k_chunks, v_chunks, starts[:-1], starts[1:]):
    args = (q, k_bkld, v_bkld, visible_bl[:, start:end])
    # Chunk 0 always holds a written slot (cur >= 1 in a decode step).
    parts.append(part(*args) if start == 0 else jax.lax.cond(start < cur, part, empty, *args))
  new = jnp.einsum("bkgd,bkd->bkg", q, k_new_bk1d[:, :, 0],
                   preferred_element_type=jnp.float32) * scale
  # The new key is always visible, so `top` is finite and skipped or fully masked chunks
  # (top = lowest) get weight exp(lowest - top) = 0.
  top = functools.reduce(jnp.maximum, [m for m, _, _ in parts], new)
  e_new = jnp.exp(new - top)
  denom, o = e_new, e_new[..., None] * v_new_bk1d.astype(jnp.float32)
  for m, l, o_part in parts:
    w = jnp.exp(m - top)
    denom = denom + l * w
    o = o + o_part * w[..., None]
  o = o / denom[..., None]
  return o.reshape(b, 1, h, d).astype(q_b1hd.dtype)

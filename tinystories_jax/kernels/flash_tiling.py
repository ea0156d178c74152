"""Block sizes and the block-skipping arithmetic shared by the GPU and TPU flash kernels.

A query block [q_first, q_first + block_q) and a key block [k_first, k_first + block_k) fall in
one of three cases under the causal / window / padding / segment masks: empty (skipped, never
loaded), full (every pair visible: no mask is computed) or partial (the mask is applied). The
range helpers return, for one block on the outer axis, the inner-axis block indices
`lo <= full_lo <= full_hi <= hi`: blocks in [lo, full_lo) and [full_hi, hi) are partial, blocks in
[full_lo, full_hi) are full and everything outside [lo, hi) is empty. That is what makes a
window-256 layer at T = 2048 cost a fraction of full causal attention.

All arithmetic is on int32 scalars that may be traced (program ids), so it uses lax.div on
non-negative operands rather than `//`, which some Pallas backends do not lower.
"""

from __future__ import annotations

import dataclasses

from jax import lax
import jax.numpy as jnp


# Segment ids the wrapper gives to query padding (and to queries with id 0) and to key padding:
# no real token has them and they differ, so padding matches nothing.
Q_PAD_ID = -(2**31)
KV_PAD_ID = -(2**31) + 1
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the forward and the two backward kernels (powers of two, at least 16), and
  optionally the GPU compiler's warps and stages, how the GPU kernels tile the head dim and
  how they take exponentials.

  Attributes:
    block_q: query rows per forward program.
    block_k: keys per inner step of the forward loop.
    block_q_dq: query rows per dQ program.
    block_k_dq: keys per inner step of the dQ loop.
    block_q_dkv: query rows per inner step of the dK/dV loop.
    block_k_dkv: keys per dK/dV program.
    num_warps: GPU only: warps per program of all three kernels; None picks by head dim.
    num_stages: GPU only: software-pipelining stages of all three kernels; None picks per
      kernel (the TPU kernels ignore both).
    split_head_dim: GPU only: a head dim that is not a power of two is read as power-of-two
      column tiles (48 as 32 + 16), every product taken tile by tile, instead of as one tile
      padded to the next power of two (48 as 64, a quarter of each product on zero columns).
      A power-of-two head dim is one tile either way.
    fast_exp2: GPU only: each softmax exponent, exp2(c·s - m), is one fused multiply-add and
      one flush-to-zero `ex2` (inline PTX), where jnp's form is a multiply, a subtract and an
      `ex2` that also rescales subnormal results (three more instructions on an H200: a
      compare and two multiplies around each exponential). Results below 2^-126 become 0.
      The Pallas interpreter, and an AMD GPU (no PTX), always run jnp's form.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int | None = None
  num_stages: int | None = None
  split_head_dim: bool = False
  fast_exp2: bool = True

  def __post_init__(self):
    for name in self.names():
      value = getattr(self, name)
      if value < 16 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {value}.")
    if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"BlockSizes.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}.")
    if self.num_stages is not None and not 1 <= self.num_stages <= 8:
      raise ValueError(f"BlockSizes.num_stages must be 1 to 8, got {self.num_stages}.")
    for name in ("split_head_dim", "fast_exp2"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"BlockSizes.{name} must be True or False, got "
                         f"{getattr(self, name)!r}.")

  @staticmethod
  def names() -> tuple[str, ...]:
    """The six tile sizes (not the GPU compiler settings)."""
    return tuple(f.name for f in dataclasses.fields(BlockSizes) if f.name.startswith("block_"))

  @property
  def q_multiple(self) -> int:
    """Queries are padded to a multiple of this (all are powers of two)."""
    return max(self.block_q, self.block_q_dq, self.block_q_dkv)

  @property
  def k_multiple(self) -> int:
    """Keys are padded to a multiple of this."""
    return max(self.block_k, self.block_k_dq, self.block_k_dkv)


def split_head_dim_widths(head_dim: int) -> tuple[int, ...]:
  """The column tiles `BlockSizes.split_head_dim` reads a head dim as: the head dim rounded up
  to 16, as descending powers of two (48: (32, 16); 64: (64,), one tile as without it)."""
  widths, rest = [], -(-head_dim // 16) * 16
  while rest:
    widths.append(1 << (rest.bit_length() - 1))
    rest -= widths[-1]
  return tuple(widths)


def pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two dividing `n`, at most `cap` (a tile size for `n` rows: Triton
  tiles are powers of two; the loss and norm kernels use it too)."""
  block = 1
  while block < cap and n % (2 * block) == 0:
    block *= 2
  return block


def _i32(x):
  return jnp.asarray(x, dtype=jnp.int32)


def _div(a, b: int):
  """Floor division of a non-negative int32 scalar by a positive Python int."""
  return lax.div(_i32(a), _i32(b))


def _cdiv(a, b: int):
  return _div(_i32(a) + (b - 1), b)


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_block_range(q_first, *, block_q: int, block_k: int, kv_len: int, causal: bool,
                   window: int | None, has_segments: bool, q_offset: int = 0):
  """Key-block ranges (lo, full_lo, full_hi, hi) for the query block starting at row q_first.

  Args:
    q_first: int32 scalar, row index of the block's first query.
    block_q: queries in the block.
    block_k: keys per key block.
    kv_len: real (unpadded) number of keys; blocks past it are empty.
    causal: query row r, at position r + q_offset, sees keys j <= r + q_offset.
    window: if set, that query also needs j > r + q_offset - window.
    has_segments: segment ids may hide any pair, so no block is full.
    q_offset: position of query row 0 on the key axis (S - T: queries are the last T positions).

  Returns:
    Four int32 scalars, see the module docstring.
  """
  q_first = _i32(q_first) + q_offset
  q_last = q_first + (block_q - 1)
  hi = _i32(-(-kv_len // block_k))
  full_hi = _i32(kv_len // block_k)
  if causal:
    hi = jnp.minimum(hi, _cdiv(jnp.maximum(q_last + 1, 0), block_k))
    full_hi = jnp.minimum(full_hi, _div(jnp.maximum(q_first + 1, 0), block_k))
  lo = _i32(0)
  full_lo = _i32(0)
  if window is not None:
    lo = _div(jnp.maximum(q_first - (window - 1), 0), block_k)
    full_lo = _cdiv(jnp.maximum(q_last - (window - 1), 0), block_k)
  lo = jnp.minimum(lo, hi)
  if has_segments:
    full_lo = hi
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def q_block_range(k_first, *, block_q: int, block_k: int, num_q_blocks: int, kv_len: int,
                  causal: bool, window: int | None, has_segments: bool, q_offset: int = 0):
  """Query-block ranges (lo, full_lo, full_hi, hi) for the key block starting at k_first.

  The transpose of `kv_block_range`, used by the dK/dV kernels. Padded queries (past the real
  length) are included: their inputs and cotangents are zeros, so they contribute nothing.

  Returns:
    Four int32 scalars, see the module docstring.
  """
  # Work in query rows: key position p is seen from row p - q_offset on (causal).
  k_first = _i32(k_first)
  k_last = k_first + (block_k - 1)
  lo = _i32(0)
  full_lo = _i32(0)
  hi = _i32(num_q_blocks)
  full_hi = _i32(num_q_blocks)
  if causal:
    lo = _div(jnp.maximum(k_first - q_offset, 0), block_q)
    full_lo = _cdiv(jnp.maximum(k_last - q_offset, 0), block_q)
  if window is not None:
    hi = jnp.minimum(hi, _cdiv(jnp.maximum(k_last + window - q_offset, 0), block_q))
    full_hi = jnp.minimum(full_hi, _div(jnp.maximum(k_first + window - q_offset, 0), block_q))
  # A key block made only of padding is seen by nobody.
  hi = jnp.where(k_first >= kv_len, 0, hi)
  lo = jnp.minimum(lo, hi)
  if has_segments:
    full_lo = hi
  else:
    full_lo = jnp.where(k_last >= kv_len, hi, full_lo)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def block_mask(q_row, k_pos, *, causal: bool, window: int | None, kv_len: int,
               kv_padded: bool, q_offset: int = 0, q_seg=None, kv_seg=None):
  """Visibility of one tile from query rows, key positions and segment ids that broadcast.

  The same function serves [block_q, block_k] tiles (q_row [bq, 1], k_pos [1, bk]) and their
  transposes in the dK/dV kernels (q_row [1, bq], k_pos [bk, 1]). Query row r sits at key
  position r + q_offset. Query segment ids are already remapped so padding matches nothing.
  """
  shape = jnp.broadcast_shapes(q_row.shape, k_pos.shape)
  q_pos = q_row + q_offset
  mask = jnp.ones(shape, dtype=bool) if not (kv_padded or causal or window or
                                             q_seg is not None) else None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if kv_padded:
    mask = _and(mask, k_pos < kv_len)
  if causal:
    mask = _and(mask, k_pos <= q_pos)
  if window is not None:
    mask = _and(mask, k_pos > q_pos - window)
  if q_seg is not None:
    mask = _and(mask, q_seg == kv_seg)
  return jnp.broadcast_to(mask, shape)


def segment_span(ids, pad_id: int):
  """(min, max) of a tile's real segment ids; a tile of padding only gives max < min.

  Used to skip tiles whose query and key segments cannot meet: with packed rows (each story a
  contiguous run of ids) most causally visible tiles of another story are skipped this way.
  """
  return jnp.min(jnp.where(ids == pad_id, _INT32_MAX, ids)), jnp.max(ids)


def spans_overlap(span_a, span_b):
  """Whether two (min, max) segment spans can share an id (conservative: ranges intersect)."""
  return jnp.logical_and(span_a[1] >= span_b[0], span_b[1] >= span_a[0])


def visible_pairs(t: int, s: int, *, causal: bool, window: int | None) -> int:
  """Number of (query, key) pairs the causal/window mask leaves, for FLOP counts."""
  total = 0
  for i in range(s - t, s):
    hi = min(s, i + 1) if causal else s
    lo = max(0, i - window + 1) if window is not None else 0
    total += max(0, hi - lo)
  return total


"""Flash attention kernels for GPUs, written in Pallas for its Triton backend.

Three kernels, FlashAttention-2 style: the forward pass (one program per query block, looping over
key blocks with an online softmax), dQ (one program per query block) and dK/dV (one program per
key block, looping over query blocks). Each loop is split into the partial / full ranges of
`flash_tiling`, so empty blocks are never loaded and full blocks never build a mask.

Inputs arrive with the sequence lengths padded to the block multiples by `flash_attention`. The
head dim is not padded in memory: Triton tiles must be powers of two, so a head dim such as 48 is
read through 64-wide tiles with masked loads (the extra columns read as zeros) and masked stores,
or, with `BlockSizes.split_head_dim`, as power-of-two column tiles (32 + 16) whose products are
taken tile by tile, so no product runs over zero columns.
Exponentials are base 2 with log2(e) folded into the scale; the log-sum-exp residual is kept in
that base between the passes. Compiled for an NVIDIA GPU, each exponent exp2(c·s - m) is one
fused multiply-add and one flush-to-zero `ex2` in inline PTX (`BlockSizes.fast_exp2`; not on
ROCm, see `ptx_available`); the forward takes its running maximum over the unscaled scores, so
the scale is applied per row, not per score.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from tinystories_jax.kernels import flash_tiling
from tinystories_jax.kernels.attention_reference import MASK_VALUE
from tinystories_jax.kernels.flash_tiling import KV_PAD_ID
from tinystories_jax.kernels.flash_tiling import Q_PAD_ID

# Log-sum-exp stored for a query row that sees no key: exp2(s - LSE_EMPTY) is exactly 0.
LSE_EMPTY = -MASK_VALUE
_F32 = jnp.float32


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler parameters (shared with the other GPU kernels)."""
  # The class was renamed across jax releases; accept either spelling.
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _spec(block_shape, index_map):
  return pl.BlockSpec(block_shape=block_shape, index_map=index_map)


def _head_mask(head_dim: int, block_d: int):
  """[1, block_d] mask of the real head dims, or None when the tile has no padding columns."""
  if head_dim == block_d:
    return None
  return (jnp.arange(block_d, dtype=jnp.int32) < head_dim)[None, :]


def _load(ref, head_mask, index=None):
  """Loads a tile; columns past the real head dim read as zeros (the array has none there)."""
  view = ref if index is None else ref.at[index, :]
  if head_mask is None:
    return view[...]
  return plgpu.load(view, mask=head_mask, other=0.0)


def _store(ref, value, head_mask):
  if head_mask is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=head_mask)


def _half_tile(head_dim: int) -> int:
  """Tile width of one rotary half (D/2 columns, rounded up to a power of two, at least 16)."""
  return max(16, 1 << (head_dim // 2 - 1).bit_length())


def _column_parts(head_dim: int, block_d: int, split: bool):
  """How a kernel reads the head dim: [(column offset, tile width, mask)]. Unsplit, one entry:
  the whole block_d-wide tile (offset None), columns past the head dim masked. Split, the head
  dim rounded up to 16 as descending powers of two (48: 32 + 16; 80: 64 + 16; 40: 32 + 16 with
  the last 8 columns masked), each its own tile."""
  if not split:
    return ((None, block_d, _head_mask(head_dim, block_d)),)
  parts, offset = [], 0
  for width in flash_tiling.split_head_dim_widths(head_dim):
    parts.append((offset, width, _head_mask(min(head_dim - offset, width), width)))
    offset += width
  return tuple(parts)


def _parts(head_dim: int, block_d: int, rotary: bool, split: bool):
  """How a kernel reads q and k: as `_column_parts`, or with rotary two entries for its halves
  (columns [0, D/2) and [D/2, D), each its own tile, so products and gradients can be taken per
  half and rotated without moving data between lanes)."""
  if not rotary:
    return _column_parts(head_dim, block_d, split)
  half, tile = head_dim // 2, _half_tile(head_dim)
  return ((0, tile, _head_mask(half, tile)), (half, tile, _head_mask(half, tile)))


def _load_parts(ref, parts, index=None):
  """The tile (or its halves) as a tuple; columns past the real head dim read as zeros."""
  out = []
  for offset, width, mask in parts:
    if offset is None:
      out.append(_load(ref, mask, index))
      continue
    view = ref.at[slice(None) if index is None else index, pl.ds(offset, width)]
    out.append(view[...] if mask is None else plgpu.load(view, mask=mask, other=0.0))
  return tuple(out)


def _store_parts(ref, values, parts, slot=None):
  """Stores a tile (or its halves); `slot` indexes a two-slot block's middle axis (Triton takes
  one indexer per access, so the slot and the columns are indexed together)."""
  for (offset, width, mask), value in zip(parts, values):
    cols = slice(None) if offset is None else pl.ds(offset, width)
    if slot is None and offset is None:
      _store(ref, value, mask)
    else:
      _store(ref.at[(slice(None), cols) if slot is None else (slice(None), slot, cols)], value,
             mask)


def _dot_parts(a_parts, b_parts, *, precision):
  """sum over parts of a @ b.T: q.k^T taken half by half is the same product."""
  total = None
  for a, b in zip(a_parts, b_parts):
    term = _dot(a, b, contract_b=1, precision=precision)
    total = term if total is None else total + term
  return total


def _unrotate(grad_parts, cos_ref, sin_ref):
  """The gradient of rotary's input from the gradient of its output, half by half (rotary
  turns (lo, hi) into (lo·cos - hi·sin, hi·cos + lo·sin); this applies the transpose)."""
  lo, hi = grad_parts
  cos, sin = cos_ref[...], sin_ref[...]
  return lo * cos + hi * sin, hi * cos - lo * sin


# Inline PTX (compiled kernels on NVIDIA GPUs only; the interpreter and ROCm run the jnp forms;
# the loss kernels use them too). jnp.exp2 lowers to a plain `ex2.approx.f32`, which ptxas wraps
# in a compare and two multiplies to keep subnormal results; the flush-to-zero form is the bare
# instruction. Multiplies and subtracts reach PTX with explicit rounding (`mul.rn`, `sub.rn`),
# which ptxas never fuses, so the fused multiply-add is written out (ptxas folds the negation
# into it).
_EXP2_ASM = "ex2.approx.ftz.f32 $0, $1;"
_EXP2_AFFINE_ASM = ("{ .reg .f32 t; neg.f32 t, $3; fma.rn.f32 t, $1, $2, t; "
                    "ex2.approx.ftz.f32 $0, t; }")


@functools.cache
def ptx_available() -> bool:
  """Whether the inline PTX can run here: not on AMD GPUs (ROCm), whose Triton takes none. A
  CPU (tests, compiling for an NVIDIA GPU without one) counts as NVIDIA's. This asks the host's
  default backend, not the platform being lowered for: lowering for ROCm from another host
  would still emit PTX."""
  try:
    device = jax.local_devices()[0]
    return not (device.platform == "gpu"
                and "rocm" in str(device.client.platform_version).lower())
  except Exception:  # noqa: BLE001 - no backend to ask: compile for CUDA
    return True


def asm_f32(asm, *args):
  """Elementwise inline PTX over float32 operands broadcast to the first one's shape."""
  shape = args[0].shape
  args = [jnp.broadcast_to(jnp.asarray(a, _F32), shape) for a in args]
  [out] = plgpu.elementwise_inline_asm(
      asm, args=args, constraints=",".join(["=f"] + ["f"] * len(args)), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, _F32)])
  return out


def exp2(x, fast: bool):
  """2^x (float32); `fast`: the inline PTX form (compiled kernels only)."""
  return asm_f32(_EXP2_ASM, x) if fast else jnp.exp2(x)


def exp2_affine(s, c: float, m, fast: bool):
  """2^(c·s - m) for float32 scores s, a Python float c and m broadcast against s."""
  return asm_f32(_EXP2_AFFINE_ASM, s, c, m) if fast else jnp.exp2(s * c - m)


def _reversed_program_id(num_q_blocks: int):
  # Causal query blocks get more work the later they are; launching them last-first keeps the
  # tail of the grid made of short programs.
  return num_q_blocks - 1 - pl.program_id(0)


def _skip_other_segments(step, outer_span, inner_span):
  """Wraps a loop step so tiles whose segment spans cannot meet cost no matmul."""
  def guarded(i, carry):
    return lax.cond(flash_tiling.spans_overlap(outer_span, inner_span(i)),
                    lambda c: step(i, c), lambda c: c, carry)
  return guarded


def _loop_three_ranges(ranges, step, carry, *, segment_guard=None):
  """Runs step over the partial, full and partial block ranges (see flash_tiling)."""
  lo, full_lo, full_hi, hi = ranges
  for start, stop, masked in ((lo, full_lo, True), (full_lo, full_hi, False),
                              (full_hi, hi, True)):
    body = functools.partial(step, masked=masked)
    if segment_guard is not None:
      body = segment_guard(body)
    carry = lax.fori_loop(start, stop, body, carry)
  return carry


def _dot(a, b, *, contract_b: int, precision):
  """a @ b (contract_b=0) or a @ b.T (contract_b=1), accumulated in float32."""
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                         preferred_element_type=_F32)


def _precision(dtype):
  # float32 inputs ask for full-precision products; bf16 uses the tensor cores' native path.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _fwd_kernel(*refs, has_segments, scale_log2, mask_kw, block_q, block_k, num_q_blocks,
                head_dim, split, precision, fast_exp2, rows_see_key_zero):
  if has_segments:
    q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
  else:
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    q_seg_ref = kv_seg_ref = None
  q_first = _reversed_program_id(num_q_blocks) * block_q
  parts = _column_parts(head_dim, q_ref.shape[-1], split)
  q = _load_parts(q_ref, parts)
  q_pos = q_first + jnp.arange(block_q, dtype=jnp.int32)[:, None]
  q_seg, guard = _query_segments(q_seg_ref, kv_seg_ref, block_k)
  ranges = flash_tiling.kv_block_range(
      q_first, block_q=block_q, block_k=block_k, has_segments=has_segments, **_range_kw(mask_kw))

  def step(j, carry, masked):
    acc, m, l = carry
    k_first = pl.multiple_of(j * block_k, block_k)
    k_slice = pl.ds(k_first, block_k)
    # Unscaled scores; the running maximum m is of scaled ones (c·s, c = scale_log2 > 0). It
    # starts at MASK_VALUE and so stays finite where c·MASK_VALUE overflows to -inf.
    s = _dot_parts(q, _load_parts(k_ref, parts, k_slice), precision=precision)
    if masked:
      k_pos = k_first + jnp.arange(block_k, dtype=jnp.int32)[None, :]
      kv_seg = kv_seg_ref[k_slice][None, :] if has_segments else None
      mask = flash_tiling.block_mask(q_pos, k_pos, q_seg=q_seg, kv_seg=kv_seg, **mask_kw)
      s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale_log2)
    alpha = exp2(m - m_new, fast_exp2)
    p = exp2_affine(s, scale_log2, m_new[:, None], fast_exp2)
    if masked and not rows_see_key_zero:
      # A row with no visible key yet may have m_new == c·MASK_VALUE (c <= 1), so exp2 gave 1s
      # that must not count. Where every row sees key 0, in the first block visited, m_new is
      # a real score's and the masked entries' exp2 is 0.
      p = jnp.where(mask, p, 0.0)
    v = _load_parts(v_ref, parts, k_slice)
    l = alpha * l + jnp.sum(p, axis=1)
    p = p.astype(v[0].dtype)
    acc = tuple(a * alpha[:, None] + _dot(p, vp, contract_b=0, precision=precision)
                for a, vp in zip(acc, v))
    return acc, m_new, l

  carry = (tuple(jnp.zeros(qp.shape, _F32) for qp in q),
           jnp.full((block_q,), MASK_VALUE, _F32), jnp.zeros((block_q,), _F32))
  acc, m, l = _loop_three_ranges(ranges, step, carry, segment_guard=guard)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  _store_parts(o_ref, tuple((a / l_safe[:, None]).astype(o_ref.dtype) for a in acc), parts)
  lse_ref[...] = jnp.where(empty, LSE_EMPTY, m + jnp.log2(l_safe))


def _dq_kernel(*refs, has_segments, rotary, scale, scale_log2, mask_kw, block_q, block_k,
               num_q_blocks, head_dim, split, precision, fast_exp2):
  q_ref, k_ref, v_ref, do_ref, lse_ref, o_ref, *refs = refs
  cos_ref = sin_ref = q_seg_ref = kv_seg_ref = None
  if rotary:
    cos_ref, sin_ref, *refs = refs
  if has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  dq_ref, delta_ref = refs
  q_first = _reversed_program_id(num_q_blocks) * block_q
  parts = _parts(head_dim, do_ref.shape[-1], rotary, split)
  columns = _column_parts(head_dim, do_ref.shape[-1], split)
  q = _load_parts(q_ref, parts)
  do = _load_parts(do_ref, columns)
  lse = lse_ref[...][:, None]
  # delta_i = sum_d o_id * do_id, the softmax-gradient correction, from the tiles this program
  # holds anyway (do) or reads once (o); written out for the dK/dV kernel.
  delta = sum(jnp.sum(op.astype(_F32) * dop.astype(_F32), axis=1)
              for op, dop in zip(_load_parts(o_ref, columns), do))
  delta_ref[...] = delta
  delta = delta[:, None]
  q_pos = q_first + jnp.arange(block_q, dtype=jnp.int32)[:, None]
  q_seg, guard = _query_segments(q_seg_ref, kv_seg_ref, block_k)
  ranges = flash_tiling.kv_block_range(
      q_first, block_q=block_q, block_k=block_k, has_segments=has_segments, **_range_kw(mask_kw))

  def step(j, dq, masked):
    k_first = pl.multiple_of(j * block_k, block_k)
    k_slice = pl.ds(k_first, block_k)
    k = _load_parts(k_ref, parts, k_slice)
    p = exp2_affine(_dot_parts(q, k, precision=precision), scale_log2, lse, fast_exp2)
    if masked:
      k_pos = k_first + jnp.arange(block_k, dtype=jnp.int32)[None, :]
      kv_seg = kv_seg_ref[k_slice][None, :] if has_segments else None
      mask = flash_tiling.block_mask(q_pos, k_pos, q_seg=q_seg, kv_seg=kv_seg, **mask_kw)
      p = jnp.where(mask, p, 0.0)
    dp = _dot_parts(do, _load_parts(v_ref, columns, k_slice), precision=precision)
    ds = (p * (dp - delta)).astype(k[0].dtype)
    return tuple(acc + _dot(ds, kp, contract_b=0, precision=precision)
                 for acc, kp in zip(dq, k))

  dq = _loop_three_ranges(ranges, step, tuple(jnp.zeros(qp.shape, _F32) for qp in q),
                          segment_guard=guard)
  if rotary:
    dq = _unrotate(dq, cos_ref, sin_ref)
  _store_parts(dq_ref, tuple((g * scale).astype(dq_ref.dtype) for g in dq), parts)


def _dkv_kernel(*refs, has_segments, rotary, kv_slots, scale, scale_log2, mask_kw, block_q,
                block_k, num_q_blocks, head_dim, split, precision, fast_exp2):
  k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs = refs
  cos_ref = sin_ref = kv_seg_ref = q_seg_ref = None
  if rotary:
    cos_ref, sin_ref, *refs = refs
  if has_segments:
    kv_seg_ref, q_seg_ref, *refs = refs
  if kv_slots:
    # The stacked gradient, aliased in and out: this program writes its key's and value's slots
    # (a traced index: the interpreter's masked store does not take a constant one).
    _, dk_ref = refs
    dv_ref = dk_ref
    k_slot = pl.program_id(0) * 0
    v_slot = k_slot + 1
  else:
    dk_ref, dv_ref = refs
    k_slot = v_slot = None
  k_first = pl.program_id(0) * block_k
  parts = _parts(head_dim, v_ref.shape[-1], rotary, split)
  columns = _column_parts(head_dim, v_ref.shape[-1], split)
  k = _load_parts(k_ref, parts)
  v = _load_parts(v_ref, columns)
  k_pos = k_first + jnp.arange(block_k, dtype=jnp.int32)[:, None]
  kv_seg, guard = None, None
  if has_segments:
    kv_seg_vec = kv_seg_ref[...]
    kv_seg = kv_seg_vec[:, None]
    guard = functools.partial(
        _skip_other_segments, outer_span=flash_tiling.segment_span(kv_seg_vec, KV_PAD_ID),
        inner_span=lambda i: flash_tiling.segment_span(
            q_seg_ref[pl.ds(pl.multiple_of(i * block_q, block_q), block_q)], Q_PAD_ID))
  ranges = flash_tiling.q_block_range(
      k_first, block_q=block_q, block_k=block_k, num_q_blocks=num_q_blocks,
      has_segments=has_segments, **_range_kw(mask_kw))

  def step(i, carry, masked):
    dk, dv = carry
    q_first = pl.multiple_of(i * block_q, block_q)
    q_slice = pl.ds(q_first, block_q)
    q = _load_parts(q_ref, parts, q_slice)
    do = _load_parts(do_ref, columns, q_slice)
    # Transposed tiles [block_k, block_q]: rows are keys, so the sums run over queries.
    p_t = exp2_affine(_dot_parts(k, q, precision=precision), scale_log2,
                      lse_ref[q_slice][None, :], fast_exp2)
    if masked:
      q_pos = q_first + jnp.arange(block_q, dtype=jnp.int32)[None, :]
      q_seg = q_seg_ref[q_slice][None, :] if has_segments else None
      mask = flash_tiling.block_mask(q_pos, k_pos, q_seg=q_seg, kv_seg=kv_seg, **mask_kw)
      p_t = jnp.where(mask, p_t, 0.0)
    p_c = p_t.astype(do[0].dtype)
    dv = tuple(acc + _dot(p_c, dop, contract_b=0, precision=precision)
               for acc, dop in zip(dv, do))
    dp_t = _dot_parts(v, do, precision=precision)
    ds_t = (p_t * (dp_t - delta_ref[q_slice][None, :])).astype(q[0].dtype)
    return tuple(acc + _dot(ds_t, qp, contract_b=0, precision=precision)
                 for acc, qp in zip(dk, q)), dv

  carry = (tuple(jnp.zeros(kp.shape, _F32) for kp in k),
           tuple(jnp.zeros(vp.shape, _F32) for vp in v))
  dk, dv = _loop_three_ranges(ranges, step, carry, segment_guard=guard)
  if rotary:
    dk = _unrotate(dk, cos_ref, sin_ref)
  _store_parts(dk_ref, tuple((g * scale).astype(dk_ref.dtype) for g in dk), parts, k_slot)
  _store_parts(dv_ref, tuple(g.astype(dv_ref.dtype) for g in dv), columns, v_slot)


def _query_segments(q_seg_ref, kv_seg_ref, block_k):
  """The query block's segment ids as a column, and the guard skipping key blocks of others."""
  if kv_seg_ref is None:
    return None, None
  q_seg_vec = q_seg_ref[...]
  guard = functools.partial(
      _skip_other_segments, outer_span=flash_tiling.segment_span(q_seg_vec, Q_PAD_ID),
      inner_span=lambda j: flash_tiling.segment_span(
          kv_seg_ref[pl.ds(pl.multiple_of(j * block_k, block_k), block_k)], KV_PAD_ID))
  return q_seg_vec[:, None], guard


def _range_kw(mask_kw):
  return {k: v for k, v in mask_kw.items() if k != "kv_padded"}


def _mask_kw(causal, window, kv_len, s, q_offset):
  return dict(causal=causal, window=window, kv_len=kv_len, kv_padded=kv_len < s,
              q_offset=q_offset)


def _block_d(head_dim: int, rotary: bool = False) -> int:
  """Tile width along the head dim: Triton tiles are powers of two (48 runs as 64). With rotary
  halves the upper half's tile, which starts at D/2, must also end inside the block."""
  d = max(16, 1 << (head_dim - 1).bit_length())
  return max(d, 1 << (head_dim // 2 + _half_tile(head_dim) - 1).bit_length()) if rotary else d


def _params(block_sizes, block_d: int, default_stages: int):
  """Compiler parameters: the block sizes' warps and stages where set, else by tile width."""
  warps = block_sizes.num_warps or (4 if block_d <= 64 else 8)
  return compiler_params(warps, block_sizes.num_stages or default_stages)


def forward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, *, scale, causal, window, kv_len,
            q_offset, block_sizes, interpret, v_stacked=False):
  """Runs the forward kernel on padded inputs.

  Args:
    q_bthd: [B, Tp, H, D], Tp a multiple of the query blocks.
    k_bskd: [B, Sp, K, D].
    v_bskd: [B, Sp, K, D], or with v_stacked the stacked projection [B, Sp, 2K + H, D] (kv
      head k's key at slot 2k, its value at 2k + 1, then the queries), whose value slots are
      read in place.
    q_seg_bt: int32 [B, Tp] or None.
    kv_seg_bs: int32 [B, Sp] or None.
    scale: softmax scale (already resolved from None).
    causal: see `flash_attention`.
    window: see `flash_attention`.
    kv_len: real number of keys; the rest of Sp is padding.
    q_offset: key position of query row 0 (real S - real T: bottom-right aligned causal).
    block_sizes: `flash_tiling.BlockSizes`.
    interpret: run the Pallas interpreter instead of compiling.
    v_stacked: see v_bskd.

  Returns:
    (o_bthd [B, Tp, H, D] in q's dtype, lse_bht float32 [B, H, Tp] in base 2).
  """
  b, t, h, head_dim = q_bthd.shape
  d = _block_d(head_dim)
  s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
  group = h // kv_heads
  bq, bk = min(block_sizes.block_q, t), min(block_sizes.block_k, s)
  has_segments = q_seg_bt is not None
  kernel = functools.partial(
      _fwd_kernel, has_segments=has_segments, scale_log2=scale * math.log2(math.e),
      mask_kw=_mask_kw(causal, window, kv_len, s, q_offset), block_q=bq, block_k=bk,
      num_q_blocks=t // bq, head_dim=head_dim, split=block_sizes.split_head_dim,
      precision=_precision(q_bthd.dtype),
      fast_exp2=block_sizes.fast_exp2 and not interpret and ptx_available(),
      # Every row sees key 0 (in the first block each program visits): no window, no segment
      # ids, and no query before the first key.
      rows_see_key_zero=window is None and not has_segments and (not causal or q_offset >= 0))
  last = t // bq - 1  # grid axis 0 runs over query blocks in reverse, see _reversed_program_id
  kv_head = lambda hi: lax.div(hi, jnp.int32(group))  # noqa: E731
  v_slot = (lambda hi: 2 * kv_head(hi) + 1) if v_stacked else kv_head  # noqa: E731
  in_specs = [
      _spec((None, bq, None, d), lambda i, bi, hi: (bi, last - i, hi, 0)),
      _spec((None, s, None, d), lambda i, bi, hi: (bi, 0, kv_head(hi), 0)),
      _spec((None, s, None, d), lambda i, bi, hi: (bi, 0, v_slot(hi), 0)),
  ]
  args = [q_bthd, k_bskd, v_bskd]
  if has_segments:
    in_specs += [_spec((None, bq), lambda i, bi, hi: (bi, last - i)),
                 _spec((None, s), lambda i, bi, hi: (bi, 0))]
    args += [q_seg_bt, kv_seg_bs]
  return pl.pallas_call(
      kernel,
      grid=(t // bq, b, h),
      in_specs=in_specs,
      out_specs=[_spec((None, bq, None, d), lambda i, bi, hi: (bi, last - i, hi, 0)),
                 _spec((None, None, bq), lambda i, bi, hi: (bi, hi, last - i))],
      out_shape=[jax.ShapeDtypeStruct(q_bthd.shape, q_bthd.dtype),
                 jax.ShapeDtypeStruct((b, h, t), _F32)],
      compiler_params=_params(block_sizes, d, 3 if d <= 64 else 2),
      interpret=interpret,
      name="flash_attention_fwd",
  )(*args)


def backward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, o_bthd, lse_bht, do_bthd, *, scale,
             causal, window, kv_len, q_offset, block_sizes, interpret):
  """Runs the dQ and dK/dV kernels on padded inputs; returns (dq, dk, dv) in the input dtypes."""
  return _backward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, o_bthd, lse_bht, do_bthd,
                   None, scale=scale, causal=causal, window=window, kv_len=kv_len,
                   q_offset=q_offset, block_sizes=block_sizes, interpret=interpret)


def backward_stacked(q_bthd, k_bskd, y_btnd, cos_btr, sin_btr, q_seg_bt, kv_seg_bs, o_bthd,
                     lse_bht, do_bthd, *, scale, causal, window, kv_len, q_offset, block_sizes,
                     interpret):
  """The backward of self-attention whose q and k are rotary(...) of the stacked projection's
  slots and whose v is read in place from it (`forward`'s v_stacked): returns the gradient of
  the stacked projection `y` [B, Tp, 2K + H, D] itself, written by the kernels slot by slot, with
  rotary's backward applied to each dQ / dK tile before it is stored (no stacking pass after).

  Args:
    q_bthd: the rotated queries [B, Tp, H, D].
    k_bskd: the rotated keys [B, Tp, K, D].
    y_btnd: the stacked projection (the values are read from it).
    cos_btr: float32 [B, Tp, R]: cos of the rotary angles, R = `rotary_table_width(D)` (the D/2
      real columns then zeros).
    sin_btr: the same for sin.
    q_seg_bt, kv_seg_bs, o_bthd, lse_bht, do_bthd and the keywords: as in `backward`.
  """
  return _backward(q_bthd, k_bskd, y_btnd, q_seg_bt, kv_seg_bs, o_bthd, lse_bht, do_bthd,
                   (cos_btr, sin_btr), scale=scale, causal=causal, window=window, kv_len=kv_len,
                   q_offset=q_offset, block_sizes=block_sizes, interpret=interpret)


def rotary_table_width(head_dim: int) -> int:
  """Columns of the cos / sin tables `backward_stacked` reads: one rotary half's tile."""
  return _half_tile(head_dim)


def _backward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, o_bthd, lse_bht, do_bthd, tables, *,
              scale, causal, window, kv_len, q_offset, block_sizes, interpret):
  b, t, h, head_dim = q_bthd.shape
  stacked = tables is not None
  d = _block_d(head_dim, rotary=stacked)
  s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
  group = h // kv_heads
  has_segments = q_seg_bt is not None
  params = _params(block_sizes, d, 2)
  kv_head = lambda hi: lax.div(hi, jnp.int32(group))  # noqa: E731
  v_slot = (lambda hi: 2 * kv_head(hi) + 1) if stacked else kv_head  # noqa: E731

  def common(bq, bk):
    return dict(has_segments=has_segments, rotary=stacked, scale=scale,
                scale_log2=scale * math.log2(math.e),
                mask_kw=_mask_kw(causal, window, kv_len, s, q_offset), block_q=bq, block_k=bk,
                head_dim=head_dim, split=block_sizes.split_head_dim,
                precision=_precision(q_bthd.dtype), num_q_blocks=t // bq,
                fast_exp2=block_sizes.fast_exp2 and not interpret and ptx_available())

  bq, bk = min(block_sizes.block_q_dq, t), min(block_sizes.block_k_dq, s)
  last = t // bq - 1  # dQ's grid axis 0 runs over query blocks in reverse
  q_blk = lambda i, bi, hi: (bi, last - i, hi, 0)  # noqa: E731
  row_blk = lambda i, bi, hi: (bi, hi, last - i)  # noqa: E731
  in_specs = [
      _spec((None, bq, None, d), q_blk),
      _spec((None, s, None, d), lambda i, bi, hi: (bi, 0, kv_head(hi), 0)),
      _spec((None, s, None, d), lambda i, bi, hi: (bi, 0, v_slot(hi), 0)),
      _spec((None, bq, None, d), q_blk),
      _spec((None, None, bq), row_blk),
      _spec((None, bq, None, d), q_blk),
  ]
  args = [q_bthd, k_bskd, v_bskd, do_bthd, lse_bht, o_bthd]
  if stacked:
    r = tables[0].shape[-1]
    in_specs += [_spec((None, bq, r), lambda i, bi, hi: (bi, last - i, 0))] * 2
    args += list(tables)
  if has_segments:
    in_specs += [_spec((None, bq), lambda i, bi, hi: (bi, last - i)),
                 _spec((None, s), lambda i, bi, hi: (bi, 0))]
    args += [q_seg_bt, kv_seg_bs]
  if stacked:
    # Each program writes its query head's slot; the key and value slots come next.
    out_spec = _spec((None, bq, None, d), lambda i, bi, hi: (bi, last - i, 2 * kv_heads + hi, 0))
    out_shape = jax.ShapeDtypeStruct(v_bskd.shape, v_bskd.dtype)
  else:
    out_spec = _spec((None, bq, None, d), q_blk)
    out_shape = jax.ShapeDtypeStruct(q_bthd.shape, q_bthd.dtype)
  dq, delta_bht = pl.pallas_call(
      functools.partial(_dq_kernel, **common(bq, bk)),
      grid=(t // bq, b, h),
      in_specs=in_specs,
      out_specs=[out_spec, _spec((None, None, bq), row_blk)],
      out_shape=[out_shape, jax.ShapeDtypeStruct((b, h, t), _F32)],
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_dq",
  )(*args)

  # One program per (key block, query head): with grouped heads each query head writes its own
  # partial dK/dV (float32) and the group is summed afterwards, which needs no atomics.
  bq, bk = min(block_sizes.block_q_dkv, t), min(block_sizes.block_k_dkv, s)
  kv_blk = lambda j, bi, hi: (bi, j, kv_head(hi), 0)  # noqa: E731
  q_all = lambda j, bi, hi: (bi, 0, hi, 0)  # noqa: E731
  in_specs = [
      _spec((None, bk, None, d), kv_blk),
      _spec((None, bk, None, d), lambda j, bi, hi: (bi, j, v_slot(hi), 0)),
      _spec((None, t, None, d), q_all),
      _spec((None, t, None, d), q_all),
      _spec((None, None, t), lambda j, bi, hi: (bi, hi, 0)),
      _spec((None, None, t), lambda j, bi, hi: (bi, hi, 0)),
  ]
  args = [k_bskd, v_bskd, q_bthd, do_bthd, lse_bht, delta_bht]
  if stacked:
    in_specs += [_spec((None, bk, r), lambda j, bi, hi: (bi, j, 0))] * 2
    args += list(tables)
  if has_segments:
    in_specs += [_spec((None, bk), lambda j, bi, hi: (bi, j)),
                 _spec((None, t), lambda j, bi, hi: (bi, 0))]
    args += [kv_seg_bs, q_seg_bt]
  kv_slots = stacked and group == 1
  extra = {}
  if kv_slots:
    # dQ's output goes back in and out again: each program fills its kv head's two slots.
    in_specs.append(_spec((None, bk, 2, d), lambda j, bi, hi: (bi, j, hi, 0)))
    args.append(dq)
    out_specs = _spec((None, bk, 2, d), lambda j, bi, hi: (bi, j, hi, 0))
    out_shape = jax.ShapeDtypeStruct(dq.shape, dq.dtype)
    extra["input_output_aliases"] = {len(args) - 1: 0}
  else:
    out_dtype = k_bskd.dtype if group == 1 else _F32
    out_specs = [_spec((None, bk, None, d), lambda j, bi, hi: (bi, j, hi, 0))] * 2
    out_shape = [jax.ShapeDtypeStruct((b, s, h, head_dim), out_dtype)] * 2
  out = pl.pallas_call(
      functools.partial(_dkv_kernel, kv_slots=kv_slots, **common(bq, bk)),
      grid=(s // bk, b, h),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_dkv",
      **extra,
  )(*args)
  if kv_slots:
    return out
  dk_bshd, dv_bshd = out
  if group > 1:
    dk_bshd = dk_bshd.reshape(b, s, kv_heads, group, head_dim).sum(axis=3)
    dv_bshd = dv_bshd.reshape(b, s, kv_heads, group, head_dim).sum(axis=3)
  dk_bshd, dv_bshd = dk_bshd.astype(k_bskd.dtype), dv_bshd.astype(k_bskd.dtype)
  if not stacked:
    return dq, dk_bshd, dv_bshd
  # Grouped heads: the group's partial sums are added here and written into the key and value
  # slots of dQ's output in place.
  dkv = jnp.stack([dk_bshd, dv_bshd], axis=3).reshape(b, s, 2 * kv_heads, head_dim)
  return lax.dynamic_update_slice_in_dim(dq, dkv.astype(dq.dtype), 0, axis=2)

"""Flash attention kernels for TPUs, written in Pallas for its Mosaic backend.

Same algorithm and block classification as `flash_attention_gpu`, in the TPU idiom: the inner
loop is the last grid axis (marked "arbitrary", so it runs in order on one core) with running
statistics in VMEM scratch; empty blocks are skipped with `pl.when`, and their index maps clamp to
the nearest visible block, so the pipeline issues no DMA for them. Arrays are transposed to
[B, H, T, D] so that every tile's last two dims are (sequence, head_dim), which Mosaic requires.

Segment ids travel as [B, T, 1] (queries) and [B, 1, S] (keys) so their tiles broadcast against a
[block_q, block_k] score tile without a relayout. The log-sum-exp residual is natural-log based.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from tinystories_jax.kernels import flash_tiling
from tinystories_jax.kernels.attention_reference import MASK_VALUE

LSE_EMPTY = -MASK_VALUE
_F32 = jnp.float32


def _spec(block_shape, index_map):
  return pl.BlockSpec(block_shape=block_shape, index_map=index_map)


def _compiler_params(num_parallel: int, num_arbitrary: int):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary)


def _dot(a, b, *, transpose_b: bool, precision):
  dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _kv_head(head, group: int):
  # lax.div, not //: floor division of a traced index lowers through sign(), which Mosaic
  # resolves from the TPU generation and so cannot lower away from the device.
  return lax.div(head, jnp.int32(group))


def _classify(outer, inner, range_fn, q_seg_ref=None, kv_seg_ref=None):
  """(visible, full) booleans for inner block `inner` of outer block `outer`.

  With segment ids a tile is also invisible when its query and key segments cannot meet.
  """
  lo, full_lo, full_hi, hi = range_fn(outer)
  visible = jnp.logical_and(inner >= lo, inner < hi)
  if q_seg_ref is not None:
    visible = jnp.logical_and(visible, flash_tiling.spans_overlap(
        flash_tiling.segment_span(q_seg_ref[...], flash_tiling.Q_PAD_ID),
        flash_tiling.segment_span(kv_seg_ref[...], flash_tiling.KV_PAD_ID)))
  full = jnp.logical_and(inner >= full_lo, inner < full_hi)
  return visible, full


def _clamped(outer, inner, range_fn):
  """Index of the block to fetch: skipped steps repeat a visible block, so no new DMA."""
  lo, _, _, hi = range_fn(outer)
  return jnp.maximum(jnp.minimum(inner, hi - 1), lo)


def _split_refs(refs, n_in, has_segments):
  ins, rest = list(refs[:n_in]), refs[n_in:]
  segs = (None, None)
  if has_segments:
    segs, rest = (rest[0], rest[1]), rest[2:]
  return ins, segs, rest


def _fwd_kernel(*refs, has_segments, scale, mask_kw, kv_range, block_q, block_k, precision):
  (q_ref, k_ref, v_ref), (q_seg_ref, kv_seg_ref), rest = _split_refs(refs, 3, has_segments)
  o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  def step(masked):
    s = _dot(q_ref[...], k_ref[...], transpose_b=True, precision=precision) * scale
    if masked:
      q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
      k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      mask = flash_tiling.block_mask(
          q_pos, k_pos, q_seg=q_seg_ref[...] if has_segments else None,
          kv_seg=kv_seg_ref[...] if has_segments else None, **mask_kw)
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    if masked:
      p = jnp.where(mask, p, 0.0)
    m_sc[...] = m_new
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, transpose_b=False,
                                             precision=precision)

  visible, full = _classify(i * block_q, j, kv_range, q_seg_ref, kv_seg_ref)
  pl.when(jnp.logical_and(visible, full))(lambda: step(False))
  pl.when(jnp.logical_and(visible, jnp.logical_not(full)))(lambda: step(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, LSE_EMPTY, m_sc[...] + jnp.log(l_safe))


def _dq_kernel(*refs, has_segments, scale, mask_kw, kv_range, block_q, block_k, precision):
  ins, (q_seg_ref, kv_seg_ref), rest = _split_refs(refs, 6, has_segments)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
  dq_ref, dq_sc = rest
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

  def step(masked):
    k = k_ref[...]
    p = jnp.exp(_dot(q_ref[...], k, transpose_b=True, precision=precision) * scale
                - lse_ref[...])
    if masked:
      q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
      k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
      mask = flash_tiling.block_mask(
          q_pos, k_pos, q_seg=q_seg_ref[...] if has_segments else None,
          kv_seg=kv_seg_ref[...] if has_segments else None, **mask_kw)
      p = jnp.where(mask, p, 0.0)
    dp = _dot(do_ref[...], v_ref[...], transpose_b=True, precision=precision)
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += _dot(ds.astype(k.dtype), k, transpose_b=False, precision=precision)

  visible, full = _classify(i * block_q, j, kv_range, q_seg_ref, kv_seg_ref)
  pl.when(jnp.logical_and(visible, full))(lambda: step(False))
  pl.when(jnp.logical_and(visible, jnp.logical_not(full)))(lambda: step(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, has_segments, scale, mask_kw, q_range, block_q, block_k, precision):
  ins, (kv_seg_ref, q_seg_ref), rest = _split_refs(refs, 6, has_segments)
  k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref = ins
  dk_ref, dv_ref, dk_sc, dv_sc = rest
  j, i = pl.program_id(2), pl.program_id(3)

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

  def step(masked):
    # Transposed tiles [block_k, block_q]: lse and delta arrive as [1, block_q] rows.
    q, do = q_ref[...], do_ref[...]
    p_t = jnp.exp(_dot(k_ref[...], q, transpose_b=True, precision=precision) * scale
                  - lse_ref[...])
    if masked:
      k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
      q_pos = i * block_q + lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
      mask = flash_tiling.block_mask(
          q_pos, k_pos, q_seg=q_seg_ref[...] if has_segments else None,
          kv_seg=kv_seg_ref[...] if has_segments else None, **mask_kw)
      p_t = jnp.where(mask, p_t, 0.0)
    dv_sc[...] += _dot(p_t.astype(do.dtype), do, transpose_b=False, precision=precision)
    dp_t = _dot(v_ref[...], do, transpose_b=True, precision=precision)
    ds_t = p_t * (dp_t - delta_ref[...])
    dk_sc[...] += _dot(ds_t.astype(q.dtype), q, transpose_b=False, precision=precision)

  visible, full = _classify(j * block_k, i, q_range, q_seg_ref, kv_seg_ref)
  pl.when(jnp.logical_and(visible, full))(lambda: step(False))
  pl.when(jnp.logical_and(visible, jnp.logical_not(full)))(lambda: step(True))

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _setup(q_bthd, k_bskd, q_seg_bt, block_q, block_k, causal, window, kv_len, q_offset):
  b, t, h, d = q_bthd.shape
  s, kv_heads = k_bskd.shape[1], k_bskd.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  has_segments = q_seg_bt is not None
  mask_kw = dict(causal=causal, window=window, kv_len=kv_len, kv_padded=kv_len < s,
                 q_offset=q_offset)
  range_kw = dict(block_q=bq, block_k=bk, kv_len=kv_len, causal=causal, window=window,
                  has_segments=has_segments, q_offset=q_offset)
  kv_range = functools.partial(flash_tiling.kv_block_range, **range_kw)
  q_range = functools.partial(flash_tiling.q_block_range, num_q_blocks=t // bq, **range_kw)
  return b, t, h, d, s, kv_heads, h // kv_heads, bq, bk, has_segments, mask_kw, kv_range, q_range


def forward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, *, scale, causal, window, kv_len,
            q_offset, block_sizes, interpret):
  """Forward kernel on padded [B, T, H, D] inputs; returns (o_bthd, lse_bht natural-log)."""
  (b, t, h, d, s, _, group, bq, bk, has_segments, mask_kw, kv_range,
   _) = _setup(q_bthd, k_bskd, q_seg_bt, block_sizes.block_q, block_sizes.block_k, causal,
               window, kv_len, q_offset)
  def kv_idx(bi, hi, i, j):
    return bi, _kv_head(hi, group), _clamped(i * bq, j, kv_range), 0

  in_specs = [_spec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
              _spec((None, None, bk, d), kv_idx), _spec((None, None, bk, d), kv_idx)]
  args = [q_bthd.transpose(0, 2, 1, 3), k_bskd.transpose(0, 2, 1, 3),
          v_bskd.transpose(0, 2, 1, 3)]
  if has_segments:
    in_specs += [_spec((None, bq, 1), lambda bi, hi, i, j: (bi, i, 0)),
                 _spec((None, 1, bk), lambda bi, hi, i, j: (bi, 0, _clamped(i * bq, j, kv_range)))]
    args += [q_seg_bt[:, :, None], kv_seg_bs[:, None, :]]
  kernel = functools.partial(_fwd_kernel, has_segments=has_segments, scale=scale,
                             mask_kw=mask_kw, kv_range=kv_range, block_q=bq, block_k=bk,
                             precision=_precision(q_bthd.dtype))
  o_bhtd, lse_bht1 = pl.pallas_call(
      kernel,
      grid=(b, h, t // bq, s // bk),
      in_specs=in_specs,
      out_specs=[_spec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
                 _spec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, h, t, d), q_bthd.dtype),
                 jax.ShapeDtypeStruct((b, h, t, 1), _F32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32),
                      pltpu.VMEM((bq, d), _F32)],
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="flash_attention_fwd_tpu",
  )(*args)
  return o_bhtd.transpose(0, 2, 1, 3), lse_bht1[..., 0]


def backward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, o_bthd, lse_bht, do_bthd, *, scale,
             causal, window, kv_len, q_offset, block_sizes, interpret):
  """dQ and dK/dV kernels on padded inputs; returns (dq, dk, dv) in the input dtypes."""
  (b, t, h, d, s, kv_heads, group, bq, bk, has_segments, mask_kw, kv_range,
   _) = _setup(q_bthd, k_bskd, q_seg_bt, block_sizes.block_q_dq, block_sizes.block_k_dq, causal,
               window, kv_len, q_offset)
  delta_bht = jnp.einsum("bthd,bthd->bht", o_bthd.astype(_F32), do_bthd.astype(_F32))
  q_bhtd, do_bhtd = q_bthd.transpose(0, 2, 1, 3), do_bthd.transpose(0, 2, 1, 3)
  k_bksd, v_bksd = k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
  common = dict(has_segments=has_segments, scale=scale, mask_kw=mask_kw, block_q=bq, block_k=bk,
                precision=_precision(q_bthd.dtype))

  q_blk = lambda bi, hi, i, j: (bi, hi, i, 0)  # noqa: E731
  def kv_blk(bi, hi, i, j):
    return bi, _kv_head(hi, group), _clamped(i * bq, j, kv_range), 0

  in_specs = [_spec((None, None, bq, d), q_blk), _spec((None, None, bk, d), kv_blk),
              _spec((None, None, bk, d), kv_blk), _spec((None, None, bq, d), q_blk),
              _spec((None, None, bq, 1), q_blk), _spec((None, None, bq, 1), q_blk)]
  args = [q_bhtd, k_bksd, v_bksd, do_bhtd, lse_bht[..., None], delta_bht[..., None]]
  if has_segments:
    in_specs += [_spec((None, bq, 1), lambda bi, hi, i, j: (bi, i, 0)),
                 _spec((None, 1, bk), lambda bi, hi, i, j: (bi, 0, _clamped(i * bq, j, kv_range)))]
    args += [q_seg_bt[:, :, None], kv_seg_bs[:, None, :]]
  dq_bhtd = pl.pallas_call(
      functools.partial(_dq_kernel, kv_range=kv_range, **common),
      grid=(b, h, t // bq, s // bk),
      in_specs=in_specs,
      out_specs=_spec((None, None, bq, d), q_blk),
      out_shape=jax.ShapeDtypeStruct((b, h, t, d), q_bthd.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), _F32)],
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="flash_attention_dq_tpu",
  )(*args)

  # Grid (B, H, key blocks, query blocks): per query head, partial dK/dV summed over the group.
  *_, bq, bk, _, _, _, q_range = _setup(q_bthd, k_bskd, q_seg_bt, block_sizes.block_q_dkv,
                                        block_sizes.block_k_dkv, causal, window, kv_len, q_offset)
  common.update(block_q=bq, block_k=bk)
  kv_own = lambda bi, hi, j, i: (bi, _kv_head(hi, group), j, 0)  # noqa: E731
  q_idx = lambda bi, hi, j, i: (bi, hi, _clamped(j * bk, i, q_range), 0)  # noqa: E731
  row_idx = lambda bi, hi, j, i: (bi, hi, 0, _clamped(j * bk, i, q_range))  # noqa: E731
  in_specs = [_spec((None, None, bk, d), kv_own), _spec((None, None, bk, d), kv_own),
              _spec((None, None, bq, d), q_idx), _spec((None, None, bq, d), q_idx),
              _spec((None, None, 1, bq), row_idx), _spec((None, None, 1, bq), row_idx)]
  args = [k_bksd, v_bksd, q_bhtd, do_bhtd, lse_bht[:, :, None, :], delta_bht[:, :, None, :]]
  if has_segments:
    in_specs += [_spec((None, bk, 1), lambda bi, hi, j, i: (bi, j, 0)),
                 _spec((None, 1, bq), lambda bi, hi, j, i: (bi, 0, _clamped(j * bk, i, q_range)))]
    args += [kv_seg_bs[:, :, None], q_seg_bt[:, None, :]]
  out_dtype = k_bskd.dtype if group == 1 else _F32
  dk_bhsd, dv_bhsd = pl.pallas_call(
      functools.partial(_dkv_kernel, q_range=q_range, **common),
      grid=(b, h, s // bk, t // bq),
      in_specs=in_specs,
      out_specs=[_spec((None, None, bk, d), lambda bi, hi, j, i: (bi, hi, j, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, h, s, d), out_dtype)] * 2,
      scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)],
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="flash_attention_dkv_tpu",
  )(*args)
  dk_bshd, dv_bshd = dk_bhsd.transpose(0, 2, 1, 3), dv_bhsd.transpose(0, 2, 1, 3)
  if group > 1:
    dk_bshd = dk_bshd.reshape(b, s, kv_heads, group, d).sum(axis=3)
    dv_bshd = dv_bshd.reshape(b, s, kv_heads, group, d).sum(axis=3)
  return dq_bhtd.transpose(0, 2, 1, 3), dk_bshd.astype(k_bskd.dtype), dv_bshd.astype(
      v_bskd.dtype)

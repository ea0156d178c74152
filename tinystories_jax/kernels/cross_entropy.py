"""The fused loss's two passes over materialised logits, in Pallas for GPUs (Triton backend).

`training.loss`'s fused form writes the `[N, V]` logits once (a cuBLAS matmul) and then reads
them in XLA-generated passes: the row maximum, the sum of exponentials (the log-sum-exp), and in
the backward pass the logit gradient `(softmax - onehot) * weight`. On an H200 at vocab 32000
those passes took 2.7 of the llama 15M step's 12.55 ms (docs/training.md): the log-sum-exp
reads the logits twice, and its exponential pass ran at 2.45 TB/s where the maximum, reading
the same bytes, ran at 3.84.

The two kernels here replace them:
- `logsumexp`: one program per block of rows, looping over column blocks with the online
  softmax rule (running maximum, sum rescaled when it grows), so the logits are read once;
- `logit_grad`: one program per `[rows, columns]` tile, reading the logits and writing the
  gradient in the logits' dtype.
A third kernel, `softmax_minus_onehot` (`train.loss_kernel="pallas_fwd_grad"`), makes the
gradient in the forward: one program per row sweeps the row twice, first for its log-sum-exp
and target logit, then backwards for `softmax - onehot(target)`, written over the logits'
buffer. The loss's backward then only scales around its matmuls. The second sweep re-reads the
row it has just read, last column block first. One row per program of 16 warps lets at most 4
programs share an SM (64 warps), and fewer where registers run out (2 as compiled for an H200:
64 registers a thread): at vocab 32000 on 132 SMs, 17 to 34 MB of rows in flight, under an
H100's or H200's 50 MB L2, so the re-read can come from L2 rather than HBM. Whether it does is
for a GPU to say: if it does not, the kernel reads the logits twice, as the two-pass kernels do.

Exponentials are base 2 with log2(e) folded into the logits: compiled for an NVIDIA GPU, each is
one fused multiply-add and one flush-to-zero `ex2` in inline PTX (as the attention kernels take
theirs, `flash_attention_gpu.exp2_affine`; off inside `override_default_blocks(fast_exp2=False)`),
and running maxima are taken over the unscaled logits. Columns at or past `vocab` (the loss pads
the projection to a multiple of 128 rows) are masked out of the softmax and get a zero gradient.

Tiles must be powers of two: the two-pass kernels' column block is the largest power of two
dividing the padded vocabulary (at most `MAX_BLOCK_V`), so the padded vocabulary must be a
multiple of `MIN_BLOCK_V`; `supports` says so with the fix. Their row block is the largest power
of two dividing the rows, at most 16: any B*T of a train step is a multiple of 16 in practice,
and an odd one still runs, one row per program (slowly). `softmax_minus_onehot` takes
`SWEEP_BLOCK_V`-wide blocks (narrower for a narrower row) and masks the columns past the
array in its last. The interpreter (`interpret=True`, or `flash_attention.force_interpret`)
runs all three kernels on a CPU for the tests.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from tinystories_jax.kernels import flash_attention as fa
from tinystories_jax.kernels import flash_attention_gpu as gpu_kernels
from tinystories_jax.kernels import flash_tiling
from tinystories_jax.kernels import sharding

MIN_BLOCK_V = 64
MAX_BLOCK_V = 512
MAX_BLOCK_ROWS = 16
# `softmax_minus_onehot`: columns per step of its sweeps, and warps per (one-row) program.
SWEEP_BLOCK_V = 8192
SWEEP_WARPS = 16
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_F32 = jnp.float32


def block_shape(rows: int, padded_vocab: int) -> tuple[int, int]:
  """(rows, columns) of one tile."""
  return (flash_tiling.pow2_divisor(rows, MAX_BLOCK_ROWS),
          flash_tiling.pow2_divisor(padded_vocab, MAX_BLOCK_V))


def supports(padded_vocab: int, platform: str) -> tuple[bool, str]:
  """(True, "") or (False, one sentence naming the fix)."""
  if padded_vocab % MIN_BLOCK_V:
    return False, (f"the Pallas loss kernels need the padded vocabulary to be a multiple of "
                   f"{MIN_BLOCK_V}, not {padded_vocab}; set train.loss_vocab_multiple to 128 "
                   "or use train.loss_kernel='xla'.")
  if platform not in ("gpu", "cuda", "rocm"):
    return False, (f"the Pallas loss kernels run on GPUs, not {platform!r}; use "
                   "train.loss_kernel='xla' there (tests run them with interpret=True).")
  return True, ""


def _resolve_interpret(interpret, padded_vocab: int) -> bool:
  interpret = fa.interpret_forced() if interpret is None else bool(interpret)
  ok, why = supports(padded_vocab, "gpu" if interpret else jax.default_backend())
  if not ok:
    raise ValueError(why)
  return interpret


def _fast_exp2(interpret: bool) -> bool:
  return not interpret and fa.fast_exp2_default() and gpu_kernels.ptx_available()


def _lse_kernel(x_ref, lse_ref, *, vocab: int, block_v: int, fast_exp2: bool):
  rows, width = x_ref.shape
  full_blocks, num_blocks = vocab // block_v, width // block_v

  def step(masked):
    def body(j, carry):
      m, s = carry  # m: the running maximum of log2(e)·x
      start = pl.multiple_of(j * block_v, block_v)
      x = x_ref[:, pl.ds(start, block_v)].astype(_F32)
      if masked:
        cols = start + lax.broadcasted_iota(jnp.int32, (rows, block_v), 1)
        x = jnp.where(cols < vocab, x, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(x, axis=1) * _LOG2E)
      # Until a row has seen a real column its maximum is -inf; shift by 0 then, so that no
      # `-inf - -inf` appears (its sum is still 0 and stays so).
      shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      s = (s * gpu_kernels.exp2(m - shift, fast_exp2)
           + jnp.sum(gpu_kernels.exp2_affine(x, _LOG2E, shift[:, None], fast_exp2), axis=1))
      return m_new, s
    return body

  carry = (jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32))
  carry = lax.fori_loop(0, full_blocks, step(False), carry)
  if full_blocks < num_blocks:
    carry = lax.fori_loop(full_blocks, num_blocks, step(True), carry)
  m, s = carry
  lse_ref[...] = (m + jnp.log2(s)) * _LN2


def _grad_kernel(x_ref, lse2_ref, soft_ref, tgt_w_ref, tgt_ref, o_ref, *, vocab: int,
                 padded: bool, fast_exp2: bool):
  rows, block_v = x_ref.shape
  start = pl.program_id(1) * block_v
  cols = start + lax.broadcasted_iota(jnp.int32, (rows, block_v), 1)
  p = gpu_kernels.exp2_affine(x_ref[...].astype(_F32), _LOG2E, lse2_ref[...][:, None],
                              fast_exp2)
  if padded:
    p = jnp.where(cols < vocab, p, 0.0)
  hit = cols == tgt_ref[...][:, None]
  g = p * soft_ref[...][:, None] - jnp.where(hit, tgt_w_ref[...][:, None], 0.0)
  o_ref[...] = g.astype(o_ref.dtype)


def _sweep_kernel(x_ref, tgt_ref, s_ref, lse_ref, tl_ref, *, vocab: int, padded_vocab: int,
                  block_v: int, fast_exp2: bool):
  """One row: its log-sum-exp and target logit, then softmax - onehot over it, in place."""
  num_blocks = -(-padded_vocab // block_v)
  # Whether any block has columns past the vocabulary (masked out of the softmax) or past the
  # array (masked loads and stores).
  past_vocab, past_array = vocab < num_blocks * block_v, padded_vocab < num_blocks * block_v
  target = tgt_ref[...]  # [1]

  def tile(j):
    start = pl.multiple_of(j * block_v, block_v)
    cols = start + lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
    view = x_ref.at[:, pl.ds(start, block_v)]
    in_array = cols < padded_vocab if past_array else None
    x = (view[...] if in_array is None else plgpu.load(view, mask=in_array, other=0.0))
    return view, cols, in_array, x.astype(_F32)

  def first(j, carry):
    m, total, target_logit = carry  # m: the running maximum of log2(e)·x
    _, cols, _, x = tile(j)
    x_real = jnp.where(cols < vocab, x, -jnp.inf) if past_vocab else x
    m_new = jnp.maximum(m, jnp.max(x_real, axis=1) * _LOG2E)
    # Until the row has seen a real column its maximum is -inf: shift by 0 then (see _lse_kernel).
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    total = (total * gpu_kernels.exp2(m - shift, fast_exp2)
             + jnp.sum(gpu_kernels.exp2_affine(x_real, _LOG2E, shift[:, None], fast_exp2),
                       axis=1))
    target_logit = target_logit + jnp.sum(jnp.where(cols == target[:, None], x, 0.0), axis=1)
    return m_new, total, target_logit

  zero = jnp.zeros((1,), _F32)
  m, total, target_logit = lax.fori_loop(0, num_blocks, first,
                                         (jnp.full((1,), -jnp.inf, _F32), zero, zero))
  lse2 = m + jnp.log2(total)
  lse_ref[...] = lse2 * _LN2
  tl_ref[...] = target_logit

  def second(i, _):
    # Last block first: the blocks read last in the first sweep are the likeliest still in L2.
    view, cols, in_array, x = tile(num_blocks - 1 - i)
    p = gpu_kernels.exp2_affine(x, _LOG2E, lse2[:, None], fast_exp2)
    if past_vocab:
      p = jnp.where(cols < vocab, p, 0.0)
    g = (p - jnp.where(cols == target[:, None], 1.0, 0.0)).astype(s_ref.dtype)
    out = s_ref.at[:, pl.ds(pl.multiple_of((num_blocks - 1 - i) * block_v, block_v), block_v)]
    if in_array is None:
      out[...] = g
    else:
      plgpu.store(out, g, mask=in_array)
    return 0

  lax.fori_loop(0, num_blocks, second, 0)


def _sweep_call(x_nv, targets_n, vocab: int, interpret: bool):
  n, vp = x_nv.shape
  block_v = min(SWEEP_BLOCK_V, 1 << (vp - 1).bit_length())
  width = -(-vp // block_v) * block_v
  tile = pl.BlockSpec((1, width), lambda i: (i, 0))
  row = pl.BlockSpec((1,), lambda i: (i,))
  return pl.pallas_call(
      functools.partial(_sweep_kernel, vocab=vocab, padded_vocab=vp, block_v=block_v,
                        fast_exp2=_fast_exp2(interpret)),
      grid=(n,),
      in_specs=[tile, row],
      out_specs=[tile, row, row],
      out_shape=[jax.ShapeDtypeStruct((n, vp), x_nv.dtype), jax.ShapeDtypeStruct((n,), _F32),
                 jax.ShapeDtypeStruct((n,), _F32)],
      input_output_aliases={0: 0},
      compiler_params=gpu_kernels.compiler_params(num_warps=SWEEP_WARPS, num_stages=2),
      interpret=interpret,
      name="cross_entropy_sweeps",
  )(x_nv, targets_n.astype(jnp.int32))


def _lse_call(x_nv, vocab: int, interpret: bool):
  n, vp = x_nv.shape
  br, bv = block_shape(n, vp)
  return pl.pallas_call(
      functools.partial(_lse_kernel, vocab=vocab, block_v=bv, fast_exp2=_fast_exp2(interpret)),
      grid=(n // br,),
      in_specs=[pl.BlockSpec((br, vp), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((br,), lambda i: (i,)),
      out_shape=jax.ShapeDtypeStruct((n,), _F32),
      compiler_params=gpu_kernels.compiler_params(num_warps=4, num_stages=3),
      interpret=interpret,
      name="cross_entropy_lse",
  )(x_nv)


def _grad_call(x_nv, lse_n, soft_n, tgt_w_n, targets_n, vocab: int, interpret: bool):
  n, vp = x_nv.shape
  br, bv = block_shape(n, vp)
  row = pl.BlockSpec((br,), lambda i, j: (i,))
  return pl.pallas_call(
      functools.partial(_grad_kernel, vocab=vocab, padded=vp != vocab,
                        fast_exp2=_fast_exp2(interpret)),
      grid=(n // br, vp // bv),
      in_specs=[pl.BlockSpec((br, bv), lambda i, j: (i, j)), row, row, row, row],
      out_specs=pl.BlockSpec((br, bv), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n, vp), x_nv.dtype),
      compiler_params=gpu_kernels.compiler_params(num_warps=4, num_stages=2),
      interpret=interpret,
      name="cross_entropy_grad",
  )(x_nv, (lse_n * _LOG2E).astype(_F32), soft_n.astype(_F32), tgt_w_n.astype(_F32),
    targets_n.astype(jnp.int32))


def logsumexp(logits_bnv, vocab: int, *, interpret: bool | None = None) -> jax.Array:
  """float32 log-sum-exp over the first `vocab` columns of `logits_bnv` [B, N, Vp] -> [B, N]."""
  interpret = _resolve_interpret(interpret, logits_bnv.shape[-1])
  vp = logits_bnv.shape[-1]

  def run(x):
    return _lse_call(x.reshape(-1, vp), vocab, interpret).reshape(x.shape[:2])
  return sharding.rows_sharded(run, (logits_bnv,))


def logit_grad(logits_bnv, lse_bn, softmax_weight_bn, target_weight_bn, targets_bn, vocab: int,
               *, interpret: bool | None = None) -> jax.Array:
  """`softmax(logits) * softmax_weight - onehot(targets) * target_weight` in the logits' dtype.

  The softmax is over the first `vocab` columns (with `lse_bn` its log-normaliser); later
  columns get 0. Shapes: logits [B, N, Vp]; the rest [B, N].
  """
  interpret = _resolve_interpret(interpret, logits_bnv.shape[-1])
  vp = logits_bnv.shape[-1]

  def run(x, lse, soft, tgt_w, tgt):
    flat = lambda a: a.reshape(-1)  # noqa: E731
    out = _grad_call(x.reshape(-1, vp), flat(lse), flat(soft), flat(tgt_w), flat(tgt), vocab,
                     interpret)
    return out.reshape(x.shape)
  return sharding.rows_sharded(
      run, (logits_bnv, lse_bn, softmax_weight_bn, target_weight_bn, targets_bn))


def softmax_minus_onehot(logits_bnv, targets_bn, vocab: int, *,
                         interpret: bool | None = None):
  """Two sweeps over each row of the logits [B, N, Vp]: (softmax - onehot(targets) [B, N, Vp]
  in the logits' dtype, written over the logits' buffer where XLA can give it; the float32
  log-sum-exp [B, N]; the float32 target logits [B, N]).

  The softmax is over the first `vocab` columns; later columns get 0.
  """
  interpret = _resolve_interpret(interpret, logits_bnv.shape[-1])
  vp = logits_bnv.shape[-1]

  def run(x, tgt):
    s, lse, tl = _sweep_call(x.reshape(-1, vp), tgt.reshape(-1), vocab, interpret)
    return s.reshape(x.shape), lse.reshape(x.shape[:2]), tl.reshape(x.shape[:2])
  return sharding.rows_sharded(run, (logits_bnv, targets_bn))


def softmax_minus_onehot_reference(logits_bnv, targets_bn, vocab: int):
  """What `softmax_minus_onehot` computes, in plain jnp."""
  lse = logsumexp_reference(logits_bnv, vocab)
  ones = jnp.ones(targets_bn.shape, _F32)
  s = logit_grad_reference(logits_bnv, lse, ones, ones, targets_bn, vocab)
  tl = jnp.take_along_axis(logits_bnv, targets_bn[..., None], axis=-1)[..., 0].astype(_F32)
  return s, lse, tl


def logsumexp_reference(logits_bnv, vocab: int) -> jax.Array:
  """What `logsumexp` computes, in plain jnp."""
  x = logits_bnv[..., :vocab].astype(_F32)
  return jax.nn.logsumexp(x, axis=-1)


def logit_grad_reference(logits_bnv, lse_bn, softmax_weight_bn, target_weight_bn, targets_bn,
                         vocab: int) -> jax.Array:
  """What `logit_grad` computes, in plain jnp."""
  vp = logits_bnv.shape[-1]
  cols = jnp.arange(vp)
  p = jnp.where(cols < vocab, jnp.exp(logits_bnv.astype(_F32) - lse_bn[..., None]), 0.0)
  hit = cols == targets_bn[..., None]
  g = p * softmax_weight_bn[..., None] - jnp.where(hit, target_weight_bn[..., None], 0.0)
  return g.astype(logits_bnv.dtype)

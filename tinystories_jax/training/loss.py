"""Output projection + cross-entropy: fused (the default), plain, or chunked over the sequence.

All three take the final hidden states `h_btd` and the output embedding `w_vd` and return sums (not
means) so that gradient accumulation and multi-device reductions stay exact: the caller divides by
the total number of unmasked targets once.

The chunked form scans over blocks of positions and recomputes each block's logits in the backward
pass (`jax.checkpoint`), so float32 logits never exist for more than `[B, chunk, V]` at a time. At
vocab 32000 and batch 128x256 the plain form would hold 4 GB of float32 logits (plus their
gradient); the chunked one holds a few tens of MB.

The fused form keeps the logits in the compute dtype (bfloat16 in mixed precision: the matmul
accumulates in float32 and rounds its output, as PyTorch's autocast does) and computes the
softmax and log-sum-exp in float32 inside the elementwise passes. Its hand-written backward reads
those logits once to form the bf16 logit gradient `(softmax - onehot) * weight` for the two
matmuls (with `kernel="pallas_fwd_grad"` the forward forms `softmax - onehot` and the backward
reads none), where autodiff of the plain form writes and re-reads float32 logits and a float32
gradient. That is about half the memory traffic of the plain form, and autodiff of the plain
form also runs both gradient matmuls in float32; on an H200 the fused form made the llama 15M
step at vocab 32000 1.49x faster than the plain one (docs/training.md). In float32 it equals
the plain form. Its passes over the logits (`kernel`) are, by default ("auto"), the Pallas
kernels of `kernels.cross_entropy` on GPUs (1.01-1.09x the whole step on an H200) and XLA's
fusions elsewhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp
import numpy as np

LOSS_IMPLS = ("plain", "chunked", "fused")
# What makes the fused loss's passes over its logits (see `fused_loss_sums`).
LOSS_KERNELS = ("auto", "xla", "xla_online", "pallas", "pallas_fwd_grad")
# Rows the fused loss pads the output projection to (a multiple of 128 keeps GPU GEMMs aligned).
VOCAB_MULTIPLE = 128


class LossSums(NamedTuple):
  """Per-batch sums over unmasked targets."""
  nll: jax.Array     # sum of -log p(target), float32
  z: jax.Array       # sum of logsumexp(logits)^2, float32 (the z-loss term, before its weight)
  count: jax.Array   # number of unmasked targets, float32


def _block_sums(h_bcd, w_vd, targets_bc, mask_bc) -> LossSums:
  logits_bcv = jnp.einsum("bcd,vd->bcv", h_bcd, w_vd.astype(h_bcd.dtype),
                          preferred_element_type=jnp.float32)
  lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
  target_logit_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
  mask_bc = mask_bc.astype(jnp.float32)
  return LossSums(nll=jnp.sum((lse_bc - target_logit_bc) * mask_bc),
                  z=jnp.sum(jnp.square(lse_bc) * mask_bc),
                  count=jnp.sum(mask_bc))


def plain_loss_sums(h_btd, w_vd, targets_bt, mask_bt) -> LossSums:
  """Materialises all `[B, T, V]` float32 logits; the reference for `chunked_loss_sums`."""
  return _block_sums(h_btd, w_vd, targets_bt, mask_bt)


def chunk_length(seq_len: int, chunk: int) -> int:
  """The largest divisor of `seq_len` that is at most `chunk` (so blocks tile the sequence)."""
  chunk = max(1, min(chunk, seq_len))
  while seq_len % chunk:
    chunk -= 1
  return chunk


def chunked_loss_sums(h_btd, w_vd, targets_bt, mask_bt, *, chunk: int = 128) -> LossSums:
  """Same sums as `plain_loss_sums`, computed `chunk` positions at a time."""
  b, t, d = h_btd.shape
  c = chunk_length(t, chunk)
  n = t // c
  if n == 1:
    return plain_loss_sums(h_btd, w_vd, targets_bt, mask_bt)
  # [B, T, ...] -> [n, B, c, ...]: scan over the leading block axis; the batch axis keeps its
  # sharding because only the (unsharded) sequence axis is split.
  h_nbcd = jnp.moveaxis(h_btd.reshape(b, n, c, d), 1, 0)
  tgt_nbc = jnp.moveaxis(targets_bt.reshape(b, n, c), 1, 0)
  mask_nbc = jnp.moveaxis(mask_bt.reshape(b, n, c), 1, 0)
  block = jax.checkpoint(_block_sums)

  def body(acc, xs):
    h_bcd, tgt_bc, mask_bc = xs
    s = block(h_bcd, w_vd, tgt_bc, mask_bc)
    return LossSums(*(a + x for a, x in zip(acc, s))), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, LossSums(zero, zero, zero), (h_nbcd, tgt_nbc, mask_nbc))
  return sums


def padded_vocab(vocab: int, multiple: int) -> int:
  """`vocab` rounded up to a multiple of `multiple` (1 or less: unchanged)."""
  return vocab if multiple <= 1 else -(-vocab // multiple) * multiple


def resolve_kernel(kernel: str, padded_vocab_size: int, backend: str | None = None, *,
                   tensor_split: bool | None = None) -> str:
  """What `kernel` runs as: "auto" is "pallas" where the Pallas kernels run (a GPU, a padded
  vocabulary they tile) and the vocabulary is not split over a `tensor` mesh axis (the kernels
  would gather it), else "xla"; any other name is itself.

  `tensor_split` None reads the mesh being traced under (`jax.sharding.get_abstract_mesh`).
  "auto" follows the H200 measurements in docs/training.md: on one GPU the Pallas kernels made
  the whole step 1.01-1.09x faster than XLA's two passes at every train shape, and XLA's
  one-pass form ("xla_online") was no faster than its two-pass one.
  """
  if kernel not in LOSS_KERNELS:
    raise ValueError(f"Unknown loss kernel {kernel!r}; use one of {LOSS_KERNELS}.")
  if kernel != "auto":
    return kernel
  if tensor_split is None:
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else {
        name: size for (name, size), kind in zip(mesh.shape.items(), mesh.axis_types)
        if kind != jax.sharding.AxisType.Manual}
    tensor_split = sizes.get("tensor", 1) > 1
  if tensor_split:
    return "xla"
  from tinystories_jax.kernels import cross_entropy  # noqa: PLC0415 (loads Pallas on use)
  ok, _ = cross_entropy.supports(padded_vocab_size, backend or jax.default_backend())
  return "pallas" if ok else "xla"


def resolve_kernel_for_mesh(kernel: str, vocab: int, vocab_multiple: int, mesh) -> str:
  """`resolve_kernel` for a run on `mesh`: its devices' platform, its `tensor` axis."""
  return resolve_kernel(kernel, padded_vocab(vocab, vocab_multiple),
                        backend=mesh.devices.flat[0].platform,
                        tensor_split=mesh.shape.get("tensor", 1) > 1)


def fused_loss_sums(h_btd, w_vd, targets_bt, mask_bt, *, vocab_multiple: int = VOCAB_MULTIPLE,
                    kernel: str = "auto") -> LossSums:
  """Same sums as `plain_loss_sums`, with logits in `h_btd`'s dtype and a hand-written backward.

  The output projection is zero-padded to `vocab_multiple` rows inside the loss (the padded
  logits are masked out of the softmax and their gradient is dropped), so that the three
  `[B*T, d] x [d, V]`-shaped matmuls see aligned dimensions whatever the vocabulary: at
  GPT-Neo's 50257 an H200 profile ran them as XLA's generated GEMMs at 240-510 TFLOP/s, where
  the aligned 32000 ran on cuBLAS at 620-780 (docs/training.md).

  `kernel` picks what makes the passes over the logits (`LOSS_KERNELS`): "xla" (the
  log-sum-exp in two passes, the maximum then the sum of exponentials), "xla_online" (in one,
  `online_logsumexp`), "pallas" (GPU kernels for the log-sum-exp and the logit gradient,
  `kernels.cross_entropy`), "pallas_fwd_grad" (under differentiation, one GPU kernel in the
  forward that writes `softmax - onehot` over the logits, two sweeps of each row, and a
  backward that only scales around its two matmuls; otherwise the log-sum-exp kernel), or
  "auto" (`resolve_kernel`: "pallas" on GPUs unless the mesh splits the vocabulary over
  `tensor`, "xla" elsewhere).

  With "pallas_fwd_grad" the z-loss term's gradient costs the backward a gather and a scatter
  over the targets; a caller without a z-loss should leave `z` out of what it differentiates
  (as the train step does), which makes its cotangent a symbolic zero and skips them.
  """
  kernel = resolve_kernel(kernel, padded_vocab(w_vd.shape[0], vocab_multiple))
  return _fused(h_btd, w_vd, targets_bt, mask_bt, vocab_multiple, kernel)


def _pad_rows(w_vd, vocab_multiple: int):
  vp = padded_vocab(w_vd.shape[0], vocab_multiple)
  return w_vd if vp == w_vd.shape[0] else jnp.pad(w_vd, ((0, vp - w_vd.shape[0]), (0, 0)))


def _masked_f32(logits_btv, vocab: int):
  """float32 logits with the padding columns (index >= `vocab`) at -inf."""
  x = logits_btv.astype(jnp.float32)
  if logits_btv.shape[-1] == vocab:
    return x
  return jnp.where(jnp.arange(logits_btv.shape[-1]) < vocab, x, -jnp.inf)


def online_logsumexp(x, valid=None):
  """`logsumexp` over the last axis in one pass, in float32; `valid` masks entries out.

  A variadic reduction over (running maximum, sum of exponentials scaled to it): two partial
  results (m1, s1) and (m2, s2) combine to max(m1, m2) and the smaller one's sum rescaled by
  exp(-|m1 - m2|), one exponential per combination. Masked entries enter as (-inf, 0), so a row
  with nothing valid gives -inf, as `jax.nn.logsumexp` does.
  """
  x = x.astype(jnp.float32)
  weight = jnp.ones_like(x)
  if valid is not None:
    x = jnp.where(valid, x, -jnp.inf)
    weight = jnp.where(valid, weight, 0.0)

  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    # Equal maxima (also both -inf) need no rescaling, and must not compute exp(-inf + inf).
    e = jnp.where(m1 == m2, 1.0, jnp.exp(-jnp.abs(m1 - m2)))
    return jnp.maximum(m1, m2), jnp.where(m1 >= m2, s1 + s2 * e, s1 * e + s2)

  m, s = jax.lax.reduce((x, weight), (np.float32(-np.inf), np.float32(0.0)), combine,
                        (x.ndim - 1,))
  return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h_btd, w_vd, targets_bt, mask_bt, vocab_multiple, kernel):
  return _forward(h_btd, w_vd, targets_bt, mask_bt, vocab_multiple, kernel, for_grad=False)[0]


def _ce_kernels():
  from tinystories_jax.kernels import cross_entropy  # noqa: PLC0415 (loads Pallas on use)
  return cross_entropy


def _forward(h_btd, w_vd, targets_bt, mask_bt, vocab_multiple, kernel, *, for_grad: bool):
  w_c = w_vd.astype(h_btd.dtype)
  # f32 accumulation, compute-dtype output, over the padded vocabulary.
  logits_btv = jnp.einsum("btd,vd->btv", h_btd, _pad_rows(w_c, vocab_multiple))
  vocab = w_vd.shape[0]
  saved_btv, target_logit_bt = logits_btv, None
  if kernel == "pallas_fwd_grad" and for_grad:
    # Saved for the backward: softmax - onehot, over the logits' buffer.
    saved_btv, lse_bt, target_logit_bt = _ce_kernels().softmax_minus_onehot(
        logits_btv, targets_bt, vocab)
  elif kernel in ("pallas", "pallas_fwd_grad"):
    lse_bt = _ce_kernels().logsumexp(logits_btv, vocab)
  elif kernel == "xla_online":
    valid = (jnp.arange(logits_btv.shape[-1]) < vocab) if logits_btv.shape[-1] != vocab else None
    lse_bt = online_logsumexp(logits_btv, valid)
  else:
    lse_bt = jax.nn.logsumexp(_masked_f32(logits_btv, vocab), axis=-1)
  if target_logit_bt is None:
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None],
                                          axis=-1)[..., 0].astype(jnp.float32)
  mask_f = mask_bt.astype(jnp.float32)
  sums = LossSums(nll=jnp.sum((lse_bt - target_logit_bt) * mask_f),
                  z=jnp.sum(jnp.square(lse_bt) * mask_f), count=jnp.sum(mask_f))
  return sums, (h_btd, w_c, saved_btv, lse_bt, targets_bt, mask_bt)


def _fused_fwd(h_btd, w_vd, targets_bt, mask_bt, vocab_multiple, kernel):
  # symbolic_zeros: the differentiable arguments arrive wrapped (value, perturbed).
  h_btd, w_vd, targets_bt, mask_bt = (a.value for a in (h_btd, w_vd, targets_bt, mask_bt))
  return _forward(h_btd, w_vd, targets_bt, mask_bt, vocab_multiple, kernel, for_grad=True)


def _cotangent(x):
  """None for a symbolic zero (an output nothing differentiated depends on), else x."""
  return None if isinstance(x, SymbolicZero) else x


def _fused_bwd(vocab_multiple, kernel, residuals, g: LossSums):
  h_btd, w_c, saved_btv, lse_bt, targets_bt, mask_bt = residuals
  vocab = w_c.shape[0]
  mask_f = mask_bt.astype(jnp.float32)
  dtargets = np.zeros(targets_bt.shape, jax.dtypes.float0)
  dmask = (np.zeros(mask_bt.shape, jax.dtypes.float0)
           if not jnp.issubdtype(mask_bt.dtype, jnp.inexact) else jnp.zeros_like(mask_bt))
  g_nll, g_z = _cotangent(g.nll), _cotangent(g.z)
  if g_nll is None and g_z is None:
    return jnp.zeros_like(h_btd), jnp.zeros((vocab, w_c.shape[1]), jnp.float32), dtargets, dmask
  g_nll = jnp.zeros((), jnp.float32) if g_nll is None else g_nll
  # d nll / d logits = softmax - onehot(target); d z / d logits = 2 lse softmax.
  target_weight_bt = mask_f * g_nll
  softmax_weight_bt = target_weight_bt if g_z is None else mask_f * (g_nll + 2.0 * g_z * lse_bt)
  w_p = _pad_rows(w_c, vocab_multiple)
  if kernel == "pallas_fwd_grad":
    # saved = s = softmax - onehot, so d logits = a s + (a - b) onehot with a, b the softmax
    # and target weights: the backward scales around the two matmuls instead of reading s.
    s_btv = saved_btv
    dh_btd = softmax_weight_bt[..., None] * jnp.einsum("btv,vd->btd", s_btv, w_p,
                                                       preferred_element_type=jnp.float32)
    h_a = (h_btd * softmax_weight_bt[..., None]).astype(h_btd.dtype)
    dw_vd = jnp.einsum("btv,btd->vd", s_btv, h_a, preferred_element_type=jnp.float32)[:vocab]
    if g_z is not None:  # the z-loss's (a - b) onehot term: a gather and a scatter
      extra_bt = softmax_weight_bt - target_weight_bt
      dh_btd = dh_btd + extra_bt[..., None] * jnp.take(w_c, targets_bt, axis=0, mode="clip")
      dw_vd = dw_vd.at[targets_bt].add(extra_bt[..., None] * h_btd.astype(jnp.float32))
    return dh_btd.astype(h_btd.dtype), dw_vd, dtargets, dmask
  logits_btv = saved_btv
  if kernel == "pallas":
    dlogits_btv = _ce_kernels().logit_grad(logits_btv, lse_bt, softmax_weight_bt,
                                           target_weight_bt, targets_bt, vocab)
  else:
    probs_btv = jnp.exp(_masked_f32(logits_btv, vocab) - lse_bt[..., None])  # 0 on padding
    onehot_btv = targets_bt[..., None] == jnp.arange(logits_btv.shape[-1],
                                                     dtype=targets_bt.dtype)
    dlogits_btv = (probs_btv * softmax_weight_bt[..., None]
                   - jnp.where(onehot_btv, target_weight_bt[..., None], 0.0)
                   ).astype(h_btd.dtype)
  dh_btd = jnp.einsum("btv,vd->btd", dlogits_btv, w_p)
  dw_vd = jnp.einsum("btv,btd->vd", dlogits_btv, h_btd,
                     preferred_element_type=jnp.float32)[:vocab]
  return dh_btd, dw_vd, dtargets, dmask


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def loss_sums(h_btd, w_vd, targets_bt, mask_bt, *, impl: str, chunk: int,
              vocab_multiple: int = VOCAB_MULTIPLE, kernel: str = "auto") -> LossSums:
  """Dispatches to the configured implementation (`"plain"`, `"chunked"` or `"fused"`)."""
  if impl == "plain":
    return plain_loss_sums(h_btd, w_vd, targets_bt, mask_bt)
  if impl == "fused":
    return fused_loss_sums(h_btd, w_vd, targets_bt, mask_bt, vocab_multiple=vocab_multiple,
                           kernel=kernel)
  if impl == "chunked":
    return chunked_loss_sums(h_btd, w_vd, targets_bt, mask_bt, chunk=chunk)
  raise ValueError(f"Unknown loss implementation {impl!r}; use one of {LOSS_IMPLS}.")

"""SwiGLU's backward through its activation, as one Pallas kernel for GPUs (Triton).

llama's MLP computes its gate and up projections as one [N, 2, F] array `gu` (models.layers'
`swiglu_paired`) and `h = silu(gate) * up`. Its backward turns the gradient `dh` [N, F] into
the gradient of `gu`:

    d_gate = dh * up * s * (1 + gate * (1 - s)),   d_up = dh * gate * s,   s = sigmoid(gate)

XLA writes that [N, 2, F] result as one elementwise fusion in which every output element
computes its own sigmoid from the pair and from the pair read again with its halves swapped:
per pair, gate and up read twice, two sigmoids, the arithmetic rounded to bfloat16 after each
operation. Compiled for an H200, each thread read 8 bytes per load (docs/kernels.md); the
2026-11-27 H200 trace timed it at 2.9 TB/s where the forward's fusion ran at 3.7. Here one
program reads a tile of gate, up and dh once, takes the sigmoid once per pair in float32 and
writes both gradients: the same bytes in and out (read 3, write 2 values per pair), half the
transcendental work and one rounding at the store.

Tiles are [block_rows, block_f] with block_f a power of two (Triton's), so a d_ff such as 1376
is covered by column blocks whose last one is masked. The interpreter (`interpret=True`, or
`flash_attention.force_interpret`) runs the kernel on a CPU for the tests;
`swiglu_grad_reference` is the same function in jnp (float32).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from tinystories_jax.kernels import flash_attention as fa
from tinystories_jax.kernels import flash_attention_gpu as gpu_kernels
from tinystories_jax.kernels import flash_tiling
from tinystories_jax.kernels import sharding

# Elements of one [block_rows, block_f] tile, and the widest column block.
TILE_ELEMENTS = 4096
MAX_BLOCK_F = 512
NUM_WARPS = 8
_F32 = jnp.float32


def block_shape(rows: int, d_ff: int) -> tuple[int, int]:
  """(block_rows, block_f) for `rows` pairs of width `d_ff`: the widest column block, up to
  MAX_BLOCK_F and down to 16, whose masked columns are at most an eighth of d_ff where one is
  (768: 256, 1376: 512)."""
  block_f = min(MAX_BLOCK_F, 1 << (d_ff - 1).bit_length())
  while block_f > 16 and (-d_ff % block_f) * 8 > d_ff:
    block_f //= 2
  return flash_tiling.pow2_divisor(rows, max(1, TILE_ELEMENTS // block_f)), block_f


def supports(platform: str) -> tuple[bool, str]:
  """(True, "") or (False, one sentence naming the fix)."""
  if platform not in ("gpu", "cuda", "rocm"):
    return False, (f"the Pallas SwiGLU kernel runs on GPUs, not {platform!r}; use "
                   "model.mlp='xla' there (tests run it with interpret=True).")
  return True, ""


def _bwd_kernel(gu_ref, dh_ref, out_ref, *, d_ff: int, block_f: int):
  if d_ff % block_f:
    cols = pl.program_id(1) * block_f + jnp.arange(block_f, dtype=jnp.int32)
    mask = (cols < d_ff)[None, :]
    load = lambda ref: plgpu.load(ref, mask=mask, other=0.0).astype(_F32)  # noqa: E731
    store = lambda ref, x: plgpu.store(ref, x, mask=mask)  # noqa: E731
  else:
    load = lambda ref: ref[...].astype(_F32)  # noqa: E731

    def store(ref, x):
      ref[...] = x
  # The pair's slots by a traced index: the interpreter's masked store does not take a constant
  # one; Triton takes one indexer per access, so the slot and the columns are indexed together.
  gate_slot = pl.program_id(0) * 0
  half = lambda ref, slot: ref.at[(slice(None), slot, slice(None))]  # noqa: E731
  gate, up, dh = load(half(gu_ref, gate_slot)), load(half(gu_ref, gate_slot + 1)), load(dh_ref)
  s = 1.0 / (1.0 + jnp.exp(-gate))
  d_gate = dh * up * (s * (1.0 + gate * (1.0 - s)))
  d_up = dh * (gate * s)
  store(half(out_ref, gate_slot), d_gate.astype(out_ref.dtype))
  store(half(out_ref, gate_slot + 1), d_up.astype(out_ref.dtype))


def _grad(gu_n2f, dh_nf, interpret: bool):
  n, _, f = gu_n2f.shape
  br, bf = block_shape(n, f)
  pair = pl.BlockSpec((br, 2, bf), lambda i, j: (i, 0, j))
  return pl.pallas_call(
      functools.partial(_bwd_kernel, d_ff=f, block_f=bf),
      grid=(n // br, pl.cdiv(f, bf)),
      in_specs=[pair, pl.BlockSpec((br, bf), lambda i, j: (i, j))],
      out_specs=pair,
      out_shape=jax.ShapeDtypeStruct(gu_n2f.shape, gu_n2f.dtype),
      compiler_params=gpu_kernels.compiler_params(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="swiglu_bwd",
  )(gu_n2f, dh_nf)


def swiglu_grad(gu_n2f, dh_nf, *, interpret: bool | None = None):
  """The gradient of `gu` [N, 2, F] (gate, up) through `silu(gate) * up`, given `dh` [N, F].

  Returns [N, 2, F] in gu's dtype (float32 arithmetic inside). Under a mesh the rows run per
  device (`kernels.sharding.rows_sharded`; a d_ff split over `tensor` would be gathered, so
  the model keeps the jnp form there).
  """
  if gu_n2f.ndim != 3 or gu_n2f.shape[1] != 2:
    raise ValueError(f"swiglu_grad: gu must be [N, 2, F] (gate, up), got {list(gu_n2f.shape)}.")
  n, _, f = gu_n2f.shape
  if dh_nf.shape != (n, f):
    raise ValueError(f"swiglu_grad: dh {list(dh_nf.shape)} must be [N, F] = {[n, f]}.")
  interpret = fa.interpret_forced() if interpret is None else bool(interpret)
  ok, why = supports("gpu" if interpret else jax.default_backend())
  if not ok:
    raise ValueError(why)
  return sharding.rows_sharded(
      lambda gu, dh: _grad(gu, dh.astype(gu.dtype), interpret), (gu_n2f, dh_nf))


def swiglu_grad_reference(gu_n2f, dh_nf):
  """What `swiglu_grad` computes, in plain jnp (float32, one rounding at the end)."""
  gate, up = gu_n2f[:, 0].astype(_F32), gu_n2f[:, 1].astype(_F32)
  dh = dh_nf.astype(_F32)
  s = jax.nn.sigmoid(gate)
  d_gate = dh * up * (s * (1.0 + gate * (1.0 - s)))
  d_up = dh * (gate * s)
  return jnp.stack([d_gate, d_up], axis=1).astype(gu_n2f.dtype)

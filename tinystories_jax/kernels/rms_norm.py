"""RMSNorm with the residual add before it, in one pass each way: Pallas for GPUs (Triton).

A pre-norm block adds each branch's output to the residual stream and normalises the sum for
the next branch: `s = x + delta; y = rmsnorm(s) * scale`. XLA runs that as two kernels forward
(the add with the row reduction, then the normalisation, which reads `s` again) and two
backward (the row reduction of `dy · scale · s`, then the gradient, which reads `dy` and `s`
again). Here each direction is one kernel (compiled for an H200, 67 fewer kernels and 1.3 GB
less memory traffic a step at the llama 42M shape; docs/kernels.md):

- forward: reads `x` and `delta`, writes `s` (in their dtype), `y` and the float32 reciprocal
  RMS of each row (the backward's residual);
- backward: reads `dy`, `s`, the reciprocal RMS and the gradient already flowing into `s`
  (the residual path's), writes `dx` (which is also `delta`'s gradient) and one partial sum of
  `dy · s · rstd` per program for the scale's gradient, which XLA sums.

Numerics: the statistics, the scale and the gradients are float32 until the stores, as in
`models.layers.RMSNorm`; the kernel normalises the sum as stored (rounded to the activations'
dtype), where XLA, allowed excess precision by default, may normalise the unrounded float32
sum: in bf16 the two agree to rounding.

One program handles `program_rows` rows, `block_rows` at a time; Triton tiles are powers of
two, so a width such as 288 is read through 512-wide tiles with masked loads and stores (the
extra columns read as zeros and contribute nothing). Rows that are not a multiple of a power
of two still run, with fewer rows a program. The interpreter (`interpret=True`, or `flash_attention.force_interpret`)
runs both kernels on a CPU for the tests; `rms_norm_reference` is the same function in jnp.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from tinystories_jax.kernels import flash_attention as fa
from tinystories_jax.kernels import flash_attention_gpu as gpu_kernels
from tinystories_jax.kernels import flash_tiling
from tinystories_jax.kernels import sharding

# Elements of one [block_rows, width] tile (width rounded up to a power of two): 4096 keeps the
# backward's three float32 tiles in registers with 4 warps.
TILE_ELEMENTS = 4096
# Row blocks one program loops over (its share of the scale gradient is one partial sum).
MAX_STEPS = 8
MAX_WIDTH = 8192
_F32 = jnp.float32


def _tile_width(d: int) -> int:
  return 1 << (d - 1).bit_length()


def block_shape(rows: int, d: int) -> tuple[int, int]:
  """(block_rows, program_rows): rows a tile holds, and rows one program handles."""
  block_rows = flash_tiling.pow2_divisor(rows, max(1, TILE_ELEMENTS // _tile_width(d)))
  program_rows = block_rows * flash_tiling.pow2_divisor(rows // block_rows, MAX_STEPS)
  return block_rows, program_rows


def supports(d: int, platform: str) -> tuple[bool, str]:
  """(True, "") or (False, one sentence naming the fix)."""
  if platform not in ("gpu", "cuda", "rocm"):
    return False, (f"the Pallas RMSNorm kernels run on GPUs, not {platform!r}; use "
                   "model.norm='xla' there (tests run them with interpret=True).")
  if d > MAX_WIDTH:
    return False, (f"the Pallas RMSNorm kernels hold a whole row in registers, at most "
                   f"{MAX_WIDTH} wide, not {d}; use model.norm='xla'.")
  return True, ""


def _resolve_interpret(interpret, d: int) -> bool:
  interpret = fa.interpret_forced() if interpret is None else bool(interpret)
  ok, why = supports(d, "gpu" if interpret else jax.default_backend())
  if not ok:
    raise ValueError(why)
  return interpret


def _col_mask(d: int, width: int):
  """[1, width] mask of the real columns, or None when the tile has no padding columns."""
  if d == width:
    return None
  return (jnp.arange(width, dtype=jnp.int32) < d)[None, :]


def _load(ref, mask):
  if mask is None:
    return ref[...].astype(_F32)
  return plgpu.load(ref, mask=mask, other=0.0).astype(_F32)


def _store(ref, value, mask):
  if mask is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=mask)


def _fwd_kernel(*refs, has_delta: bool, eps: float, d: int, block_rows: int):
  if has_delta:
    x_ref, delta_ref, scale_ref, s_ref, y_ref, rstd_ref = refs
  else:
    (x_ref, scale_ref, y_ref, rstd_ref), delta_ref, s_ref = refs, None, None
  steps, width = x_ref.shape[0] // block_rows, x_ref.shape[1]
  mask = _col_mask(d, width)
  scale = _load(scale_ref, None if mask is None else mask[0])

  def body(i, carry):
    rows = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
    x = _load(x_ref.at[rows, :], mask)
    if has_delta:
      s = (x + _load(delta_ref.at[rows, :], mask)).astype(s_ref.dtype)
      _store(s_ref.at[rows, :], s, mask)
      x = s.astype(_F32)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
    _store(y_ref.at[rows, :], (x * rstd[:, None] * scale[None, :]).astype(y_ref.dtype), mask)
    rstd_ref[rows] = rstd
    return carry

  lax.fori_loop(0, steps, body, 0)


def _bwd_kernel(*refs, has_ds: bool, d: int, block_rows: int):
  if has_ds:
    dy_ref, ds_ref, s_ref, rstd_ref, scale_ref, dx_ref, dscale_ref = refs
  else:
    (dy_ref, s_ref, rstd_ref, scale_ref, dx_ref, dscale_ref), ds_ref = refs, None
  steps, width = s_ref.shape[0] // block_rows, s_ref.shape[1]
  mask = _col_mask(d, width)
  scale = _load(scale_ref, None if mask is None else mask[0])

  def body(i, dscale):
    rows = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
    dy = _load(dy_ref.at[rows, :], mask)
    xhat = _load(s_ref.at[rows, :], mask) * rstd_ref[rows][:, None]
    g = dy * scale[None, :]
    # d/ds of (s * rstd * scale): rstd * (g - xhat * mean(g * xhat)).
    dx = (g - xhat * (jnp.sum(g * xhat, axis=1) / d)[:, None]) * rstd_ref[rows][:, None]
    if has_ds:
      dx = dx + _load(ds_ref.at[rows, :], mask)
    _store(dx_ref.at[rows, :], dx.astype(dx_ref.dtype), mask)
    return dscale + jnp.sum(dy * xhat, axis=0)

  dscale = lax.fori_loop(0, steps, body, jnp.zeros((width,), _F32))
  _store(dscale_ref, dscale, None if mask is None else mask[0])


def _params():
  return gpu_kernels.compiler_params(num_warps=4, num_stages=2)


def _forward(x_nd, delta_nd, scale_d, eps: float, interpret: bool):
  """(s or None, y, rstd) for [N, D] rows."""
  n, d = x_nd.shape
  width = _tile_width(d)
  br, pr = block_shape(n, d)
  tile = pl.BlockSpec((pr, width), lambda i: (i, 0))
  has_delta = delta_nd is not None
  ins = [x_nd, delta_nd] if has_delta else [x_nd]
  out_shape = [jax.ShapeDtypeStruct((n, d), x_nd.dtype), jax.ShapeDtypeStruct((n,), _F32)]
  out_specs = [tile, pl.BlockSpec((pr,), lambda i: (i,))]
  if has_delta:
    out_shape, out_specs = [out_shape[0]] + out_shape, [tile] + out_specs
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, has_delta=has_delta, eps=eps, d=d, block_rows=br),
      grid=(n // pr,),
      in_specs=[tile] * len(ins) + [pl.BlockSpec((width,), lambda i: (0,))],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_params(),
      interpret=interpret,
      name="rms_norm_fwd",
  )(*ins, scale_d.astype(_F32))
  return tuple(outs) if has_delta else (None, *outs)


def _backward(dy_nd, ds_nd, s_nd, rstd_n, scale_d, interpret: bool):
  """(dx [N, D] in s's dtype, dscale float32 [D])."""
  n, d = s_nd.shape
  width = _tile_width(d)
  br, pr = block_shape(n, d)
  tile = pl.BlockSpec((pr, width), lambda i: (i, 0))
  has_ds = ds_nd is not None
  ins = [dy_nd, ds_nd, s_nd] if has_ds else [dy_nd, s_nd]
  dx, partial = pl.pallas_call(
      functools.partial(_bwd_kernel, has_ds=has_ds, d=d, block_rows=br),
      grid=(n // pr,),
      in_specs=[tile] * len(ins) + [pl.BlockSpec((pr,), lambda i: (i,)),
                                    pl.BlockSpec((width,), lambda i: (0,))],
      out_specs=[tile, pl.BlockSpec((None, width), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((n, d), s_nd.dtype),
                 jax.ShapeDtypeStruct((n // pr, d), _F32)],
      compiler_params=_params(),
      interpret=interpret,
      name="rms_norm_bwd",
  )(*ins, rstd_n, scale_d.astype(_F32))
  return dx, partial.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x_nd, delta_nd, scale_d, eps, return_sum, interpret):
  return _fused_fwd(x_nd, delta_nd, scale_d, eps, return_sum, interpret)[0]


def _fused_fwd(x_nd, delta_nd, scale_d, eps, return_sum, interpret):
  s, y, rstd = _forward(x_nd, delta_nd, scale_d, eps, interpret)
  out = (s, y) if return_sum else y
  # Without a delta the sum is x itself; the residuals' tree structure (an empty tuple or None,
  # no arrays) tells the backward whether there was one.
  return out, (x_nd if s is None else s, rstd, scale_d, None if s is None else ())


def _fused_bwd(eps, return_sum, interpret, res, ct):
  del eps
  s, rstd, scale_d, had_delta = res
  ds, dy = ct if return_sum else (None, ct)
  dx, dscale = _backward(dy, ds, s, rstd, scale_d, interpret)
  return dx, None if had_delta is None else dx, dscale.astype(scale_d.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def rms_norm(x_btd, scale_d, *, eps: float, delta_btd=None, return_sum: bool = False,
             interpret: bool | None = None):
  """`rmsnorm(x + delta) * scale` in x's dtype (statistics in float32), in one pass.

  Args:
    x_btd: [..., D] activations (the residual stream).
    scale_d: [D] scale (any float dtype; its gradient comes back in it).
    eps: added to the mean square.
    delta_btd: optional [..., D] branch output added to `x` first (same dtype as x).
    return_sum: also return the sum `x + delta` (needs `delta_btd`): (sum, normalised).
    interpret: run the Pallas interpreter (a CPU); None follows `force_interpret`.

  Under a mesh the rows run per device (`kernels.sharding.rows_sharded`).
  """
  if return_sum and delta_btd is None:
    raise ValueError("rms_norm: return_sum=True needs delta_btd (without it the sum is x).")
  if delta_btd is not None and (delta_btd.shape != x_btd.shape
                                or delta_btd.dtype != x_btd.dtype):
    raise ValueError(f"rms_norm: delta {delta_btd.dtype}{list(delta_btd.shape)} must match x "
                     f"{x_btd.dtype}{list(x_btd.shape)}.")
  d = x_btd.shape[-1]
  if scale_d.shape != (d,):
    raise ValueError(f"rms_norm: scale has shape {scale_d.shape}, the rows are {d} wide.")
  interpret = _resolve_interpret(interpret, d)

  def run(x, delta, scale):
    flat = lambda a: None if a is None else a.reshape(-1, d)  # noqa: E731
    out = _fused(flat(x), flat(delta), scale, float(eps), return_sum, interpret)
    return jax.tree.map(lambda a: a.reshape(x.shape), out)

  return sharding.rows_sharded(run, (x_btd, delta_btd), (scale_d,))


def rms_norm_reference(x_btd, scale_d, *, eps: float, delta_btd=None, return_sum: bool = False):
  """What `rms_norm` computes, in plain jnp (the same expressions as `models.layers.RMSNorm`)."""
  s = x_btd if delta_btd is None else x_btd + delta_btd
  x = s.astype(_F32)
  y = x * lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
  y = (y * scale_d.astype(_F32)).astype(x_btd.dtype)
  return (s, y) if return_sum else y

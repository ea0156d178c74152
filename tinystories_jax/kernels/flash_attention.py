"""Flash attention: the public entry point, its gradient and the per-platform dispatch.

`flash_attention` pads the inputs to the kernels' tiles, runs the Pallas kernel of the current
platform (`flash_attention_gpu` on the Triton backend, `flash_attention_tpu` on Mosaic) under a
`jax.custom_vjp`, and slices the padding off again. `flash_attention_reference` is the same
function in plain jnp; `supports` tells a caller choosing an implementation whether the kernel
takes a given head size, dtype and platform (everything else goes to the `xla` implementation).

Layouts: q [B, T, H, D], k and v [B, S, K, D] with K dividing H (query head h reads kv head
h // (H // K)); the output is [B, T, H, D] in q's dtype. Masks follow
`tinystories_jax.models.attention`: causal is bottom-right aligned (query row i sits at key
position i + S - T), `window` counts the keys a query sees including itself, and segment id 0
marks padding, whose query rows come out as zeros.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib

import jax
from jax import lax
import jax.numpy as jnp

from tinystories_jax.kernels.attention_reference import check_attention_args
from tinystories_jax.kernels.attention_reference import flash_attention_reference
from tinystories_jax.kernels.flash_tiling import KV_PAD_ID
from tinystories_jax.kernels.flash_tiling import Q_PAD_ID
from tinystories_jax.kernels.flash_tiling import BlockSizes

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "force_interpret",
           "interpret_forced", "supports", "default_block_sizes", "override_default_blocks",
           "flash_attention_stacked",
           "flash_attention_stacked_reference", "rotate_half", "stack_qkv_weights"]

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# Kernel family -> module, imported on first use: a TPU install need not load Triton's Pallas
# backend, nor a GPU install Mosaic TPU's.
_BACKENDS = {"gpu": "tinystories_jax.kernels.flash_attention_gpu",
             "tpu": "tinystories_jax.kernels.flash_attention_tpu"}


def _kernels(family: str):
  return importlib.import_module(_BACKENDS[family])

# Mesh axes (tinystories_jax.parallel's names) that attention may be split over: every batch row
# and every head is independent, so the kernels run per shard without communication.
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"

# Set by `force_interpret`, so code that cannot pass `interpret=` (a model's attention layer)
# can still run the kernels through the Pallas interpreter on a CPU.
_FORCE_INTERPRET = False
# Set by `override_default_blocks`: changes to the block sizes calls without `block_sizes=` get.
_DEFAULT_BLOCK_CHANGES: dict = {}


@contextlib.contextmanager
def force_interpret(enabled: bool = True):
  """Within this context, calls without an explicit `interpret=` run the Pallas interpreter."""
  global _FORCE_INTERPRET
  previous, _FORCE_INTERPRET = _FORCE_INTERPRET, enabled
  try:
    yield
  finally:
    _FORCE_INTERPRET = previous


def interpret_forced() -> bool:
  """Whether `force_interpret` is in effect (the other kernels follow it too)."""
  return _FORCE_INTERPRET


def _kernel_family(platform: str) -> str | None:
  if platform in _GPU_PLATFORMS:
    return "gpu"
  if platform == "tpu":
    return "tpu"
  return None


def supports(head_dim: int, dtype, platform: str) -> tuple[bool, str]:
  """Whether the compiled kernel handles this head size, dtype and platform.

  Args:
    head_dim: D, the size of one attention head.
    dtype: the dtype of q, k and v.
    platform: a jax platform name ("gpu", "cuda", "rocm", "tpu", "cpu").

  Returns:
    (True, "") or (False, one sentence saying why and naming `xla` as the alternative).
  """
  if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
    return False, (f"pallas flash attention supports head_dim {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, "
                   f"not {head_dim}; use attention='xla' for this model.")
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    return False, (f"pallas flash attention supports bfloat16 and float32 inputs, not "
                   f"{jnp.dtype(dtype).name}; use attention='xla' or cast the inputs.")
  if _kernel_family(platform) is None:
    return False, (f"pallas flash attention needs a GPU or TPU, not {platform!r}; use "
                   "attention='xla' there (tests run the kernels with interpret=True).")
  return True, ""


def default_block_sizes(family: str, head_dim: int) -> BlockSizes:
  """Tile sizes per kernel family; see docs/kernels.md for how they were chosen. Inside
  `override_default_blocks`, with its changes."""
  if family == "tpu":
    blocks = BlockSizes(*(128,) * 6)
  elif head_dim > 64:
    blocks = BlockSizes(*(64,) * 6)
  else:
    blocks = BlockSizes(128, 64, 64, 64, 64, 64)
  return dataclasses.replace(blocks, **_DEFAULT_BLOCK_CHANGES)


def fast_exp2_default() -> bool:
  """`BlockSizes.fast_exp2` of the default blocks (inside `override_default_blocks`, as changed
  there): the loss kernels (`cross_entropy`) take their exponentials the same way."""
  return _DEFAULT_BLOCK_CHANGES.get("fast_exp2", BlockSizes.fast_exp2)


@contextlib.contextmanager
def override_default_blocks(**changes):
  """Within this context, the block sizes picked for calls without `block_sizes=` (a model's
  attention layer) get `changes`, e.g. `split_head_dim=True`: how a benchmark times one tiling
  choice inside a whole train step. Changes apply where the kernels are traced."""
  global _DEFAULT_BLOCK_CHANGES
  fields = {f.name for f in dataclasses.fields(BlockSizes)}
  unknown = sorted(set(changes) - fields)
  if unknown:
    raise ValueError(f"override_default_blocks: BlockSizes has no field {', '.join(unknown)}; "
                     f"its fields are {', '.join(sorted(fields))}.")
  dataclasses.replace(BlockSizes(), **changes)  # the same checks as BlockSizes itself
  previous, _DEFAULT_BLOCK_CHANGES = _DEFAULT_BLOCK_CHANGES, {**_DEFAULT_BLOCK_CHANGES, **changes}
  try:
    yield
  finally:
    _DEFAULT_BLOCK_CHANGES = previous


def _fit_to_length(block: int, length: int) -> int:
  """Shrinks a block for short sequences so padding stays below one small tile."""
  fitted = 16
  while fitted < block and fitted < length:
    fitted *= 2
  return fitted


# The smallest scale the GPU kernels take: below it, scale · MASK_VALUE would no longer make a
# masked score's exponential 0 (their forward masks the scores before scaling them).
MIN_GPU_SCALE = 1e-30


def _resolve_scale(scale, head_dim: int, family: str) -> float:
  """The softmax scale (None: 1/sqrt(D)); the GPU kernels need at least MIN_GPU_SCALE."""
  scale = float(head_dim**-0.5 if scale is None else scale)
  if family == "gpu" and not scale >= MIN_GPU_SCALE:
    raise ValueError(f"flash_attention: the GPU kernels take a positive scale of at least "
                     f"{MIN_GPU_SCALE}, got {scale} (they take each row's maximum before "
                     "scaling); use attention='xla' for another.")
  return scale


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static arguments of one kernel call (hashable: it is a custom_vjp nondiff argument)."""
  family: str
  scale: float
  causal: bool
  window: int | None
  kv_len: int
  q_offset: int
  block_sizes: BlockSizes
  interpret: bool

  def kernel_kwargs(self):
    return dict(scale=self.scale, causal=self.causal, window=self.window, kv_len=self.kv_len,
                q_offset=self.q_offset, block_sizes=self.block_sizes, interpret=self.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_padded(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, cfg):
  o_bthd, _ = _kernels(cfg.family).forward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs,
                                            **cfg.kernel_kwargs())
  return o_bthd


def _flash_padded_fwd(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, cfg):
  o_bthd, lse_bht = _kernels(cfg.family).forward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs,
                                                  **cfg.kernel_kwargs())
  return o_bthd, (q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, o_bthd, lse_bht)


def _flash_padded_bwd(cfg, residuals, do_bthd):
  q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs, o_bthd, lse_bht = residuals
  dq, dk, dv = _kernels(cfg.family).backward(q_bthd, k_bskd, v_bskd, q_seg_bt, kv_seg_bs,
                                              o_bthd, lse_bht, do_bthd.astype(o_bthd.dtype),
                                              **cfg.kernel_kwargs())
  # Segment ids are integers: no cotangent.
  return dq, dk, dv, None, None


_flash_padded.defvjp(_flash_padded_fwd, _flash_padded_bwd)


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _shard_specs(batch: int, heads: int, kv_heads: int, split_heads: bool = True):
  """(mesh, spec of [B, T, H, D], spec of [B, T]) for the current mesh, or None if unsharded.

  A Pallas call is opaque to XLA's partitioner, which would gather its operands onto every device;
  under `jax.set_mesh` the call is instead wrapped in `jax.shard_map` over the batch axes (and the
  head axis where it divides both head counts), so each device runs the kernel on its own shard.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  # Axes already manual (inside a caller's shard_map) are not ours to split again.
  sizes = {name: size for (name, size), kind in zip(mesh.shape.items(), mesh.axis_types)
           if kind != jax.sharding.AxisType.Manual}
  batch_axes, split = [], 1
  for axis in _BATCH_AXES:
    if sizes.get(axis, 1) > 1 and batch % (split * sizes[axis]) == 0:
      batch_axes.append(axis)
      split *= sizes[axis]
  n_head = sizes.get(_HEAD_AXIS, 1)
  head_axis = (_HEAD_AXIS if split_heads and n_head > 1 and heads % n_head == 0
               and kv_heads % n_head == 0 else None)
  if not batch_axes and head_axis is None:
    return None
  batch_spec = tuple(batch_axes) if batch_axes else None
  P = jax.sharding.PartitionSpec  # noqa: N806
  return mesh, P(batch_spec, None, head_axis, None), P(batch_spec, None)


def flash_attention(q_bthd, k_bskd, v_bskd, *, causal=True, window=None, q_segment_ids_bt=None,
                    kv_segment_ids_bs=None, scale=None, block_sizes=None, interpret=None,
                    backend=None):
  """Memory-efficient exact attention with Pallas kernels, differentiable in q, k and v.

  Args:
    q_bthd: queries [B, T, H, D], bfloat16 or float32, 16 <= D <= 128.
    k_bskd: keys [B, S, K, D], K dividing H.
    v_bskd: values [B, S, K, D].
    causal: query i sees only keys j <= i + S - T.
    window: if set (causal only), query i also needs j > i + S - T - window; blocks outside
      the window are skipped entirely.
    q_segment_ids_bt: int32 [B, T], non-negative; query i sees key j only where the ids are
      equal, and id 0 (padding) sees nothing (its rows are zeros).
    kv_segment_ids_bs: int32 [B, S], given together with q_segment_ids_bt.
    scale: multiplies q.k; None means 1 / sqrt(D) (GPT-Neo passes 1.0). At least
      MIN_GPU_SCALE (1e-30) on a GPU.
    block_sizes: `BlockSizes` override; None picks per platform and head size.
    interpret: run the Pallas interpreter (works on CPU); None follows `force_interpret`.
    backend: "gpu" (Triton) or "tpu" (Mosaic) kernels; None picks the current platform's. For
      tests: with interpret=True it runs one family's kernels on a CPU, and it lets a CPU
      lower the kernels for another platform (`.lower(lowering_platforms=...)`; for CUDA
      from a host without a GPU, jax 0.11 and later also need the target GPU named by an
      abstract mesh's `jax.sharding.AbstractDevice`, as the tests' `cuda_lowering` fixture
      does).

  Returns:
    o_bthd [B, T, H, D] in q's dtype. Query rows that see no key (padding) are zeros.

  Raises:
    ValueError: for inconsistent shapes, or a head size, dtype or platform the kernels do not
      support (the message names `xla`, the implementation to use instead).
  """
  check_attention_args(q_bthd, k_bskd, v_bskd, causal=causal, window=window,
                       q_segment_ids_bt=q_segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs)
  interpret = _FORCE_INTERPRET if interpret is None else bool(interpret)
  platform = jax.default_backend()
  b, t, h, d = q_bthd.shape
  s = k_bskd.shape[1]
  # An explicit backend (tests, lowering for another platform) vouches for the platform.
  ok, reason = supports(d, q_bthd.dtype, "gpu" if interpret else (backend or platform))
  if not ok:
    raise ValueError(reason)
  family = backend or _kernel_family(platform) or "gpu"
  if family not in _BACKENDS:
    raise ValueError(f"backend must be 'gpu' or 'tpu', not {backend!r}.")
  if k_bskd.dtype != q_bthd.dtype or v_bskd.dtype != q_bthd.dtype:
    k_bskd, v_bskd = k_bskd.astype(q_bthd.dtype), v_bskd.astype(q_bthd.dtype)

  blocks = block_sizes or default_block_sizes(family, d)
  blocks = dataclasses.replace(blocks, **{
      name: _fit_to_length(getattr(blocks, name), t if "_q" in name else s)
      for name in BlockSizes.names()})
  t_pad = _round_up(t, blocks.q_multiple)
  s_pad = _round_up(s, blocks.k_multiple)
  if window is not None and window >= s:
    window = None  # Wider than the sequence: plain causal, and no block is wasted on it.
  cfg = _Config(family=family, scale=_resolve_scale(scale, d, family),
                causal=bool(causal), window=None if window is None else int(window),
                kv_len=s, q_offset=s - t, block_sizes=blocks, interpret=interpret)

  q_p = _pad_axis(q_bthd, 1, t_pad)
  k_p = _pad_axis(k_bskd, 1, s_pad)
  v_p = _pad_axis(v_bskd, 1, s_pad)
  q_seg = kv_seg = None
  if q_segment_ids_bt is not None:
    # Padding queries (id 0, and the tile padding) get an id no key has, so their rows see
    # nothing and come out as zeros; tile-padding keys get another such id.
    q_seg = q_segment_ids_bt.astype(jnp.int32)
    q_seg = _pad_axis(jnp.where(q_seg == 0, Q_PAD_ID, q_seg), 1, t_pad, value=Q_PAD_ID)
    kv_seg = _pad_axis(kv_segment_ids_bs.astype(jnp.int32), 1, s_pad, value=KV_PAD_ID)
  sharding = _shard_specs(b, h, k_bskd.shape[2])
  if sharding is None:
    o_p = _flash_padded(q_p, k_p, v_p, q_seg, kv_seg, cfg)
  elif q_seg is None:
    mesh, x_spec, _ = sharding
    o_p = jax.shard_map(lambda q, k, v: _flash_padded(q, k, v, None, None, cfg), mesh=mesh,
                        in_specs=(x_spec,) * 3, out_specs=x_spec, check_vma=False)(q_p, k_p, v_p)
  else:
    mesh, x_spec, seg_spec = sharding
    o_p = jax.shard_map(functools.partial(_flash_padded, cfg=cfg), mesh=mesh,
                        in_specs=(x_spec,) * 3 + (seg_spec,) * 2, out_specs=x_spec,
                        check_vma=False)(q_p, k_p, v_p, q_seg, kv_seg)
  return o_p[:, :t]


# ------------------------------------------------------------------------------------------------
# Self-attention read straight from the stacked q/k/v projection, rotary inside the backward.


def stack_qkv_weights(wq_dhk, wk_dgk, wv_dgk):
  """The [d, 2K + H, D] weight whose product with x is the stacked projection
  `flash_attention_stacked` reads: per kv head its key then its value, then the query heads."""
  d, kv, hd = wk_dgk.shape
  kv_pairs = jnp.stack([wk_dgk, wv_dgk], axis=2).reshape(d, 2 * kv, hd)
  return jnp.concatenate([kv_pairs, wq_dhk], axis=1)


def rotate_half(x_btnd, cos_btr, sin_btr):
  """Rotary embedding in the rotate-half layout: (lo, hi) -> (lo·cos - hi·sin, hi·cos + lo·sin)
  over the head dim's halves, in float32, returned in x's dtype.

  cos_btr / sin_btr: float32 [B, T, D/2] (or wider: extra columns are ignored). Written with a
  reverse of a [2, D/2] view rather than a concatenate of the halves (faster on NVIDIA GPUs,
  models.layers.rotary_by_reverse), and equal to it.
  """
  *lead, d = x_btnd.shape
  half = d // 2
  cos = cos_btr[..., :half][:, :, None, None, :]
  sin = sin_btr[..., :half][:, :, None, None, :] * jnp.array([-1.0, 1.0], jnp.float32)[:, None]
  x = x_btnd.astype(jnp.float32).reshape(*lead, 2, half)
  return (x * cos + x[..., ::-1, :] * sin).reshape(x_btnd.shape).astype(x_btnd.dtype)


def _split_stacked(y_btnd, kv_heads: int):
  """(q [B, T, H, D], k [B, T, K, D], v [B, T, K, D]) from the stacked projection."""
  kv = y_btnd[:, :, : 2 * kv_heads]
  return y_btnd[:, :, 2 * kv_heads:], kv[:, :, 0::2], kv[:, :, 1::2]


def flash_attention_stacked_reference(y_btnd, cos_btr, sin_btr, *, kv_heads, causal=True,
                                      window=None, segment_ids_bt=None, scale=None):
  """`flash_attention_stacked` in plain jnp: split, rotate, `flash_attention_reference`."""
  cos_btr, sin_btr = lax.stop_gradient(cos_btr), lax.stop_gradient(sin_btr)
  q, k, v = _split_stacked(y_btnd, kv_heads)
  return flash_attention_reference(rotate_half(q, cos_btr, sin_btr),
                                   rotate_half(k, cos_btr, sin_btr), v, causal=causal,
                                   window=window, q_segment_ids_bt=segment_ids_bt,
                                   kv_segment_ids_bs=segment_ids_bt, scale=scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _stacked_padded(y_btnd, cos_btr, sin_btr, q_seg_bt, kv_seg_bs, kv_heads, cfg):
  return _stacked_padded_fwd(y_btnd, cos_btr, sin_btr, q_seg_bt, kv_seg_bs, kv_heads, cfg)[0]


def _stacked_padded_fwd(y_btnd, cos_btr, sin_btr, q_seg_bt, kv_seg_bs, kv_heads, cfg):
  q, k, _ = _split_stacked(y_btnd, kv_heads)
  q, k = rotate_half(q, cos_btr, sin_btr), rotate_half(k, cos_btr, sin_btr)
  o_bthd, lse_bht = _kernels("gpu").forward(q, k, y_btnd, q_seg_bt, kv_seg_bs, v_stacked=True,
                                            **cfg.kernel_kwargs())
  return o_bthd, (q, k, y_btnd, cos_btr, sin_btr, q_seg_bt, kv_seg_bs, o_bthd, lse_bht)


def _stacked_padded_bwd(kv_heads, cfg, residuals, do_bthd):
  del kv_heads  # in the shapes of the residuals
  q, k, y_btnd, cos_btr, sin_btr, q_seg_bt, kv_seg_bs, o_bthd, lse_bht = residuals
  dy = _kernels("gpu").backward_stacked(q, k, y_btnd, cos_btr, sin_btr, q_seg_bt, kv_seg_bs,
                                        o_bthd, lse_bht, do_bthd.astype(o_bthd.dtype),
                                        **cfg.kernel_kwargs())
  # The rotary tables and segment ids are not differentiated.
  return dy, None, None, None, None


_stacked_padded.defvjp(_stacked_padded_fwd, _stacked_padded_bwd)


def flash_attention_stacked(y_btnd, cos_btr, sin_btr, *, kv_heads, causal=True, window=None,
                            segment_ids_bt=None, scale=None, block_sizes=None, interpret=None):
  """Self-attention on the stacked q/k/v projection, with rotary on q and k: the same values as
  `flash_attention(rotate_half(q), rotate_half(k), v)` for q, k, v the stacked slots, but the
  kernels read v in place and write the gradient of `y` itself (slot by slot, rotary's backward
  done on each tile), so no pass copies v out, and with one kv head per query head none stacks
  dq, dk and dv afterwards (with grouped heads XLA adds each group's dK/dV and writes them into
  their slots in place).

  Pallas GPU (Triton) kernels only; a mesh may split the batch but not the heads (y's slots mix
  keys, values and queries), so under a `tensor`-split mesh each device runs all heads of its
  batch shard. `stack_qkv_weights` builds the weight whose product with x is `y`. For the
  backward it keeps y, the rotated q and k and the tables (the split path keeps q, k and v).

  Args:
    y_btnd: [B, T, 2K + H, D]: kv head k's key at slot 2k and value at 2k + 1, then the H query
      heads; bfloat16 or float32.
    cos_btr: float32 [B, T, D/2]: cos of each position's rotary angles (not differentiated).
    sin_btr: float32 [B, T, D/2]: their sin (not differentiated).
    kv_heads: K (it must divide H).
    causal, window, scale, block_sizes, interpret: as in `flash_attention`.
    segment_ids_bt: int32 [B, T] for queries and keys alike, as in `flash_attention`.

  Returns:
    o_bthd [B, T, H, D] in y's dtype.
  """
  b, t, n, d = y_btnd.shape
  heads = n - 2 * kv_heads
  if kv_heads <= 0 or heads <= 0 or heads % kv_heads or d % 2:
    raise ValueError(f"flash_attention_stacked: y {y_btnd.shape} must hold 2·{kv_heads} key and "
                     f"value slots then a multiple of {kv_heads} query heads, with an even "
                     "head_dim.")
  if cos_btr.shape != (b, t, d // 2) or sin_btr.shape != cos_btr.shape:
    raise ValueError(f"flash_attention_stacked: cos and sin must be [B, T, D/2] = "
                     f"{(b, t, d // 2)}, got {cos_btr.shape} and {sin_btr.shape}.")
  interpret = _FORCE_INTERPRET if interpret is None else bool(interpret)
  platform = "gpu" if interpret else jax.default_backend()
  if _kernel_family(platform) != "gpu":
    raise ValueError(f"flash_attention_stacked runs the Pallas GPU kernels, not on {platform!r}; "
                     "split q, k and v there (a model's qkv_impl='xla').")
  ok, reason = supports(d, y_btnd.dtype, platform)
  if not ok:
    raise ValueError(f"flash_attention_stacked: {reason} (a model's qkv_impl='xla' splits them)")
  cos_btr, sin_btr = lax.stop_gradient(cos_btr), lax.stop_gradient(sin_btr)
  q_like = jax.ShapeDtypeStruct((b, t, heads, d), y_btnd.dtype)
  kv_like = jax.ShapeDtypeStruct((b, t, kv_heads, d), y_btnd.dtype)
  check_attention_args(q_like, kv_like, kv_like, causal=causal, window=window,
                       q_segment_ids_bt=segment_ids_bt, kv_segment_ids_bs=segment_ids_bt)
  blocks = block_sizes or default_block_sizes("gpu", d)
  blocks = dataclasses.replace(blocks, **{name: _fit_to_length(getattr(blocks, name), t)
                                          for name in BlockSizes.names()})
  t_pad = _round_up(t, max(blocks.q_multiple, blocks.k_multiple))
  if window is not None and window >= t:
    window = None
  cfg = _Config(family="gpu", scale=_resolve_scale(scale, d, "gpu"),
                causal=bool(causal), window=None if window is None else int(window),
                kv_len=t, q_offset=0, block_sizes=blocks, interpret=interpret)
  width = _kernels("gpu").rotary_table_width(d)
  y_p = _pad_axis(y_btnd, 1, t_pad)
  cos_p, sin_p = (_pad_axis(_pad_axis(x.astype(jnp.float32), 2, width), 1, t_pad)
                  for x in (cos_btr, sin_btr))
  q_seg = kv_seg = None
  if segment_ids_bt is not None:
    ids = segment_ids_bt.astype(jnp.int32)
    q_seg = _pad_axis(jnp.where(ids == 0, Q_PAD_ID, ids), 1, t_pad, value=Q_PAD_ID)
    kv_seg = _pad_axis(ids, 1, t_pad, value=KV_PAD_ID)
  sharding = _shard_specs(b, heads, kv_heads, split_heads=False)
  run = lambda y, c, s_, qs, ks: _stacked_padded(y, c, s_, qs, ks, kv_heads, cfg)  # noqa: E731
  if sharding is None:
    o_p = run(y_p, cos_p, sin_p, q_seg, kv_seg)
  else:
    mesh, x_spec, seg_spec = sharding
    table_spec = jax.sharding.PartitionSpec(*seg_spec, None)
    if q_seg is None:
      o_p = jax.shard_map(lambda y, c, s_: run(y, c, s_, None, None), mesh=mesh,
                          in_specs=(x_spec, table_spec, table_spec), out_specs=x_spec,
                          check_vma=False)(y_p, cos_p, sin_p)
    else:
      o_p = jax.shard_map(run, mesh=mesh, in_specs=(x_spec,) + (table_spec,) * 2
                          + (seg_spec,) * 2, out_specs=x_spec,
                          check_vma=False)(y_p, cos_p, sin_p, q_seg, kv_seg)
  return o_p[:, :t]

"""Building blocks both families share: parameters with logical axes, norms, rotary, attention.

Every parameter is an `nnx.Param` carrying logical axis names (metadata `out_sharding` in flax
0.12, set through `nnx.with_partitioning`), drawn from: vocab, embed, heads, kv_heads, head_dim,
mlp, positions, norm. `tinystories_jax.parallel` maps them to mesh axes.

Numerics: parameters are stored in `cfg.param_dtype` and cast to `cfg.dtype` where used; norm
statistics, rotary angles and softmax run in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx

from tinystories_jax.models import attention as attn_lib
from tinystories_jax.models import scan as scan_lib
from tinystories_jax.models.config import ModelConfig


class Normal:
  """The normal initialiser (`nnx.initializers.normal(std)`), marked so that `param` can defer
  its draw to `grouped_normal_draws`."""

  def __init__(self, std: float):
    self.std = std
    self._init = nnx.initializers.normal(stddev=std)

  def __call__(self, key, shape, dtype=None, **kwargs):
    return self._init(key, shape, dtype, **kwargs)


def normal(std: float) -> Normal:
  return Normal(std)


# Set inside `grouped_normal_draws`: the (param, key, std) of each draw deferred so far.
_PENDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("pending_normal_draws",
                                                                     default=None)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str, ...],
          dtype) -> nnx.Param:
  """An `nnx.Param` initialised by `init` and annotated with logical `axes`.

  Inside `grouped_normal_draws` a `Normal` draw from a threefry key (without eager sharding)
  is left to the end of the block: the Param holds a `jax.ShapeDtypeStruct` until then, so
  it cannot be read inside the block.
  """
  key = rngs.params()
  pending = _PENDING.get()
  if (pending is None or not isinstance(init, Normal) or nnx.using_eager_sharding()
      or str(jax.random.key_impl(key)) != "threefry2x32"):
    return nnx.Param(nnx.with_partitioning(init, axes)(key, shape, dtype))
  placeholder = lambda _, s, d: jax.ShapeDtypeStruct(s, jnp.dtype(d))  # noqa: E731
  p = nnx.Param(nnx.with_partitioning(placeholder, axes)(key, shape, dtype))
  pending.append((p, key, init.std))
  return p


@contextlib.contextmanager
def grouped_normal_draws():
  """Draws the normally initialised parameters created inside the block together: one
  `jax.vmap` over the keys of all parameters of a shape and dtype.

  Each parameter gets the random bits its own draw gives (threefry's bits do not depend on
  batching), so the same values up to the rounding of the transform to a normal, which
  depends on how XLA compiles it: in the CPU tests, within one unit in the last place (bit
  for bit with jax 0.10.2; with jax 0.12.0.1 a quarter of the values differ in the last
  place). The initialiser then has one random-number computation per shape and dtype instead
  of one per parameter, which is where XLA spent most of an initialiser's compile time
  (docs/training.md). Each group's draws are held whole until sliced, which can raise a
  compiled initialiser's temporary memory (for an H200 by at most 11 MB at the train shapes;
  on the CPU backend, llama 15m's from 46 to 85 MB: docs/training.md).

  Limits (the models here meet them): parameters are read only after the block, and none is
  created under an nnx transform (`nnx.vmap`, `nnx.jit`) inside it, whose traced keys could
  not be drawn outside it. Used by `models.build`.
  """
  pending: list = []
  token = _PENDING.set(pending)
  try:
    yield
  finally:
    _PENDING.reset(token)
  groups: dict = {}
  for p, key, std in pending:
    spec = p.get_raw_value()
    groups.setdefault((spec.shape, spec.dtype), []).append((p, key, std))
  for (shape, dtype), members in groups.items():
    keys = jnp.stack([key for _, key, _ in members])
    draws = jax.vmap(lambda k, s=shape, d=dtype: jax.random.normal(k, s, d))(keys)
    # The initialiser's own multiply (`random.normal(...) * jnp.array(std, dtype)`), batched.
    stds = jnp.array([std for *_, std in members], dtype).reshape((-1,) + (1,) * len(shape))
    # The barrier keeps the group one buffer: without it XLA's GPU compiler fused the whole
    # random-number computation into each parameter's slice again (docs/training.md).
    draws = lax.optimization_barrier(draws * stds)
    for i, (p, _, _) in enumerate(members):
      p.set_value(draws[i])


zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias; statistics in float32."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.scale = param(rngs, ones, (cfg.d_model,), ("norm",), pd)
    self.bias = param(rngs, zeros, (cfg.d_model,), ("norm",), pd)
    self.eps = cfg.norm_eps
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return _layer_norm(x_btd, self.scale[...], self.bias[...], self.eps, self.dtype)

  def add_and_norm(self, x_btd, delta_btd, *, keep_sum: bool = True):
    """(s, norm(s)) for s = x + delta (delta None: s = x), or norm(s) alone without `keep_sum`."""
    s = x_btd if delta_btd is None else x_btd + delta_btd
    return (s, self(s)) if keep_sum else self(s)


class RMSNorm(nnx.Module):
  """RMSNorm (llama); statistics in float32, like llama2.c and transformers."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.scale = param(rngs, ones, (cfg.d_model,), ("norm",), jnp.dtype(cfg.param_dtype))
    self.eps = cfg.norm_eps
    self.dtype = jnp.dtype(cfg.dtype)
    self.impl = cfg.norm_impl

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    return _rms_norm(x_btd, self.scale[...], self.eps, self.dtype)

  def add_and_norm(self, x_btd, delta_btd, *, keep_sum: bool = True):
    """(s, norm(s)) for s = x + delta (delta None: s = x), or norm(s) alone without `keep_sum`.

    `norm_impl="pallas"` (a config's `model.norm`) runs the add and the norm as one kernel
    each way (`kernels.rms_norm`); "xla" runs the same expressions as jnp.
    """
    if self.impl == "pallas":
      from tinystories_jax.kernels import rms_norm  # noqa: PLC0415 (loads Pallas on use)
      x, delta = (None if a is None else a.astype(self.dtype) for a in (x_btd, delta_btd))
      if delta is None:
        y = rms_norm.rms_norm(x, self.scale[...], eps=self.eps)
        return (x, y) if keep_sum else y
      return rms_norm.rms_norm(x, self.scale[...], eps=self.eps, delta_btd=delta,
                               return_sum=keep_sum)
    s = x_btd if delta_btd is None else x_btd + delta_btd
    return (s, self(s)) if keep_sum else self(s)


# The norms compute in float32 but keep only their input (in the compute dtype) for the
# backward, which recomputes the rest: unrolled, XLA does so anyway; in a scan (`scan_layers`)
# every value kept becomes a [layers, B, T, d_model] buffer, and autodiff kept three float32
# ones per norm (docs/models.md).
@functools.partial(jax.checkpoint, static_argnums=(3, 4), prevent_cse=False)
def _layer_norm(x_btd, scale_d, bias_d, eps, dtype):
  x = x_btd.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale_d.astype(jnp.float32) + bias_d.astype(jnp.float32)).astype(dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3), prevent_cse=False)
def _rms_norm(x_btd, scale_d, eps, dtype):
  x = x_btd.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
  return (y * scale_d.astype(jnp.float32)).astype(dtype)


def rotary(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in transformers' rotate-half layout (pairs are i and i + D/2).

  llama2.c's `run.c` rotates adjacent pairs (2i, 2i+1) instead; `interop.llama2c` permutes the
  q/k projection rows on export so both layouts give the same model.

  Two forms with the same values: `rotary_by_reverse` on NVIDIA GPUs, where it was measured
  faster, and `rotary_by_concatenate` elsewhere; they differ only in speed (docs/training.md).
  """
  return lax.platform_dependent(x_bthd, positions_bt, cuda=functools.partial(
      rotary_by_reverse, theta=theta), default=functools.partial(rotary_by_concatenate,
                                                                 theta=theta))


def _rotary_angles(positions_bt: jax.Array, d: int, theta: float) -> jax.Array:
  """float32 angles [B, T, D/2]: position times theta^(-2i/D)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  return positions_bt.astype(jnp.float32)[:, :, None] * inv_freq


def rotary_by_concatenate(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """`rotary` as the two rotated halves concatenated (off NVIDIA GPUs; the CPU's q/k/v
  projection and rotary as they were measured there, docs/training.md)."""
  d = x_bthd.shape[-1]
  angles = _rotary_angles(positions_bt, d, theta)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_bthd.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthd.dtype)


def rotary_by_reverse(x_bthd: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
  """`rotary` without a concatenate: the head dim viewed as [2, D/2], the halves swapped by a
  reverse of that axis, so the forward and its autodiff backward are elementwise with an index
  remap (NVIDIA GPUs: on an H200 the fusions concatenating D/2-wide halves ran at 1.7-2.7 TB/s
  at head_dim 48, and q/k/v stacked + rotary ran 1.06x faster forward + backward in this form
  at the llama 15M shape, 1.03x at 42M; docs/training.md)."""
  d = x_bthd.shape[-1]
  angles = _rotary_angles(positions_bt, d, theta)
  cos = jnp.cos(angles)[:, :, None, None, :]
  sin = jnp.sin(angles)[:, :, None, None, :] * jnp.array([-1.0, 1.0])[:, None]
  x = x_bthd.astype(jnp.float32).reshape(*x_bthd.shape[:-1], 2, d // 2)
  out = x * cos + x[..., ::-1, :] * sin
  return out.reshape(x_bthd.shape).astype(x_bthd.dtype)


def separate_qkv(x_btd, wq_dhk, wk_dgk, wv_dgk):
  """q, k, v = x·wq, x·wk, x·wv as three matmuls (XLA:GPU merges them into one itself)."""
  return tuple(jnp.einsum("btd,dhk->bthk", x_btd, w) for w in (wq_dhk, wk_dgk, wv_dgk))


def _stacking_keeps_heads_in_place(heads: int, kv_heads: int) -> bool:
  """Whether `qkv_projection` leaves heads split over the mesh's `tensor` axis where they are.

  `parallel.rules` splits heads and kv heads over `tensor` only where it divides them, so with
  query heads split and kv heads replicated (4 kv heads on an 8-way axis) the stacked weight
  would have to move shards between devices; three matmuls do not.
  """
  n = _tensor_axis_size()
  return kv_heads % n == 0 or heads % n != 0


def _tensor_axis_size() -> int:
  """Devices the current mesh's (non-manual) `tensor` axis splits heads over; 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return {name: size for (name, size), kind in zip(mesh.shape.items(), mesh.axis_types)
          if kind != jax.sharding.AxisType.Manual}.get("tensor", 1)


def qkv_projection(x_btd, wq_dhk, wk_dgk, wv_dgk):
  """q, k, v = x·wq, x·wk, x·wv, as one matmul against the three weights stacked per kv head.

  The stacked weight is [d, kv_heads, group + 2, head_dim]: each kv head's `group` query heads,
  then its key, then its value. Its backward stacks dq, dk, dv the same way in one explicit
  concatenate (`_split_qkv`), into which XLA fuses what produced them (rotary's backward), and
  both gradient matmuls read that one array. The new axis sits inside the kv-head axis, so heads
  sharded over `tensor` stay where they are. llama's attention uses it off the CPU
  (`Attention.qkv`; docs/training.md).
  """
  d, h, hd = wq_dhk.shape
  kv = wk_dgk.shape[1]
  w = jnp.concatenate([wq_dhk.reshape(d, kv, h // kv, hd), wk_dgk[:, :, None], wv_dgk[:, :, None]],
                      axis=2)
  return _split_qkv(jnp.einsum("btd,dkgh->btkgh", x_btd, w))


@jax.custom_vjp
def _split_qkv(y_btkgh):
  """[B, T, kv, group + 2, D] -> q [B, T, kv·group, D], k and v [B, T, kv, D]; the backward
  stacks their gradients back in one concatenate."""
  b, t, kv, g2, hd = y_btkgh.shape
  q = y_btkgh[:, :, :, : g2 - 2].reshape(b, t, kv * (g2 - 2), hd)
  return q, y_btkgh[:, :, :, g2 - 2], y_btkgh[:, :, :, g2 - 1]


def _split_qkv_fwd(y_btkgh):
  return _split_qkv(y_btkgh), None


def _split_qkv_bwd(_, grads):
  dq, dk, dv = grads
  b, t, kv, hd = dk.shape
  return (jnp.concatenate([dq.reshape(b, t, kv, -1, hd), dk[:, :, :, None], dv[:, :, :, None]],
                          axis=3),)


_split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


class Attention(nnx.Module):
  """Self-attention with separately callable pieces, so a KV-cache decode can reuse them:
  `qkv(x)` -> q, k, v; `rotate(q, k, positions)`; `attend(q, k, v, ...)`; `out(o)`.

  Parameters: wq [embed, heads, head_dim], wk / wv [embed, kv_heads, head_dim],
  wo [heads, head_dim, embed] (+ bo [embed] for GPT-Neo).
  """

  def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
    d, h, k, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    init = normal(cfg.init_std)
    out_init = init if cfg.is_gpt_neo else normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    self.wq = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pd)
    self.wk = param(rngs, init, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
    self.wv = param(rngs, init, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
    self.wo = param(rngs, out_init, (h, hd, d), ("heads", "head_dim", "embed"), pd)
    self.bo = param(rngs, zeros, (d,), ("embed",), pd) if cfg.is_gpt_neo else None
    self.window = cfg.window if kind == "local" else None
    self.use_rotary = not cfg.is_gpt_neo
    self.rope_theta = cfg.rope_theta
    # GPT-Neo does not scale scores by 1/sqrt(head_dim); its checkpoints depend on that.
    self.scale = 1.0 if cfg.is_gpt_neo else None
    self.impl = cfg.attention_impl
    self.dtype = jnp.dtype(cfg.dtype)
    self.stacked = cfg.qkv_impl == "pallas"

  def qkv(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    dt = self.dtype
    x, wq, wk, wv = (a.astype(dt) for a in (x_btd, self.wq[...], self.wk[...], self.wv[...]))
    if self.use_rotary and _stacking_keeps_heads_in_place(wq.shape[1], wk.shape[1]):
      # The CPU keeps three matmuls, and so the compiled step measured there (docs/training.md).
      return lax.platform_dependent(x, wq, wk, wv, cpu=separate_qkv, default=qkv_projection)
    # Without rotary (GPT-Neo) nothing is left to fuse into the stacking: compiled for an H200,
    # XLA's own merge of the three matmuls wrote less (docs/training.md).
    return separate_qkv(x, wq, wk, wv)

  def rotate(self, q_bthd, k_bskd, q_positions_bt, k_positions_bs):
    if not self.use_rotary:
      return q_bthd, k_bskd
    return (rotary(q_bthd, q_positions_bt, self.rope_theta),
            rotary(k_bskd, k_positions_bs, self.rope_theta))

  def attend(self, q_bthd, k_bskd, v_bskd, *, q_segment_ids_bt=None, kv_segment_ids_bs=None,
             causal: bool = True):
    return attn_lib.attention(q_bthd, k_bskd, v_bskd, impl=self.impl, causal=causal,
                              window=self.window, q_segment_ids_bt=q_segment_ids_bt,
                              kv_segment_ids_bs=kv_segment_ids_bs, scale=self.scale)

  def attend_stacked(self, x_btd, positions_bt, segment_ids_bt=None):
    """`qkv_impl="pallas"`: one matmul into the stacked [B, T, 2K + H, D] projection, which the
    Pallas kernels read and whose gradient they write whole (rotary inside; no copies of q, k
    or v and no stacking of their gradients). Same values as qkv -> rotate -> attend.

    The stacked slots mix keys, values and queries, so a mesh whose `tensor` axis splits heads
    takes the split path instead (`__call__`), which keeps each device's heads its own."""
    from tinystories_jax.kernels import flash_attention as fa_lib  # noqa: PLC0415
    dt = self.dtype
    w = fa_lib.stack_qkv_weights(*(p[...].astype(dt) for p in (self.wq, self.wk, self.wv)))
    y = jnp.einsum("btd,dnk->btnk", x_btd.astype(dt), w)
    angles = _rotary_angles(positions_bt, w.shape[-1], self.rope_theta)
    return fa_lib.flash_attention_stacked(y, jnp.cos(angles), jnp.sin(angles),
                                          kv_heads=self.wk.shape[1], window=self.window,
                                          segment_ids_bt=segment_ids_bt, scale=self.scale)

  def out(self, o_bthd: jax.Array) -> jax.Array:
    y = jnp.einsum("bthk,hkd->btd", o_bthd.astype(self.dtype), self.wo[...].astype(self.dtype))
    if self.bo is not None:
      y = y + self.bo[...].astype(self.dtype)
    return y

  def __call__(self, x_btd, positions_bt, segment_ids_bt=None):
    if self.stacked and _tensor_axis_size() == 1:
      return self.out(self.attend_stacked(x_btd, positions_bt, segment_ids_bt))
    q, k, v = self.qkv(x_btd)
    q, k = self.rotate(q, k, positions_bt, positions_bt)
    o = self.attend(q, k, v, q_segment_ids_bt=segment_ids_bt, kv_segment_ids_bs=segment_ids_bt)
    return self.out(o)


class GeluMLP(nnx.Module):
  """GPT-Neo's MLP: Linear(d, f) + bias, gelu_new (tanh approximation), Linear(f, d) + bias."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd, init = jnp.dtype(cfg.param_dtype), normal(cfg.init_std)
    self.w_in = param(rngs, init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), pd)
    self.b_in = param(rngs, zeros, (cfg.d_ff,), ("mlp",), pd)
    self.w_out = param(rngs, init, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), pd)
    self.b_out = param(rngs, zeros, (cfg.d_model,), ("embed",), pd)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x_btd):
    dt = self.dtype
    h = jnp.einsum("btd,df->btf", x_btd.astype(dt), self.w_in[...].astype(dt))
    h = gelu_new(h, self.b_in[...].astype(dt))
    y = jnp.einsum("btf,fd->btd", h, self.w_out[...].astype(dt))
    return y + self.b_out[...].astype(dt)


@jax.checkpoint
def gelu_new(h, b):
  """gelu_new(h + b); its backward recomputes the tanh from `h` and `b` rather than keep it."""
  return jax.nn.gelu(h + b, approximate=True)


class SwiGLU(nnx.Module):
  """llama's MLP: w2(silu(w1 x) * w3 x), no biases (w1 = gate_proj, w3 = up_proj, w2 = down)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pd, init = jnp.dtype(cfg.param_dtype), normal(cfg.init_std)
    out_init = normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    self.w_gate = param(rngs, init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), pd)
    self.w_up = param(rngs, init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), pd)
    self.w_down = param(rngs, out_init, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), pd)
    self.dtype = jnp.dtype(cfg.dtype)
    self.impl = cfg.mlp_impl

  def __call__(self, x_btd):
    """`mlp_impl="pallas"` (a config's `model.mlp`) takes the backward through the activation
    from one Pallas kernel (`swiglu_paired_kernel`); a d_ff split over the mesh's `tensor` axis
    keeps the jnp form, which leaves the split in place."""
    dt = self.dtype
    fn = swiglu
    if self.impl == "pallas" and _tensor_axis_size() == 1:
      fn = swiglu_paired_kernel
    return fn(x_btd.astype(dt), self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
              self.w_down[...].astype(dt))


def swiglu(x_btd, w_gate_df, w_up_df, w_down_fd):
  """w_down(silu(x w_gate) * x w_up), with a hand-written backward in one of two forms.

  Both contract [B*T, .] matrices directly: autodiff of the [B, T, D] einsums made XLA:CPU
  transpose the [B*T, d_ff] activation gradients before each weight-gradient matmul (the
  hand-written backward made the MLP's forward and backward about 2.5x faster on a CPU,
  docs/training.md). `swiglu_split` runs on CPUs, `swiglu_paired` elsewhere; they differ only
  in speed (docs/training.md). Same values as autodiff up to float rounding.
  """
  return lax.platform_dependent(x_btd, w_gate_df, w_up_df, w_down_fd, cpu=swiglu_split,
                                default=swiglu_paired)


@jax.custom_vjp
def swiglu_split(x_btd, w_gate_df, w_up_df, w_down_fd):
  """Gate and up as two matmuls, their gradients as two arrays; one sigmoid reused."""
  return _split_fwd(x_btd, w_gate_df, w_up_df, w_down_fd)[0]


def _split_fwd(x_btd, w_gate_df, w_up_df, w_down_fd):
  x = x_btd.reshape(-1, x_btd.shape[-1])  # [B*T, D]
  gate, up = x @ w_gate_df, x @ w_up_df
  y = (jax.nn.silu(gate) * up) @ w_down_fd
  return y.reshape(x_btd.shape), (x, gate, up, w_gate_df, w_up_df, w_down_fd)


def _split_bwd(res, dy_btd):
  x, gate, up, w_gate_df, w_up_df, w_down_fd = res
  dy = dy_btd.reshape(-1, dy_btd.shape[-1])
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  dh = dy @ w_down_fd.T
  d_up = dh * silu
  d_gate = dh * up * (sig * (1 + gate * (1 - sig)))  # silu'(g) = s (1 + g (1 - s))
  dx = d_gate @ w_gate_df.T + d_up @ w_up_df.T
  return (dx.reshape(dy_btd.shape), x.T @ d_gate, x.T @ d_up, (silu * up).T @ dy)


swiglu_split.defvjp(_split_fwd, _split_bwd)


@jax.custom_vjp
def swiglu_paired(x_btd, w_gate_df, w_up_df, w_down_fd):
  """Gate and up as one [B*T, 2, F] matmul against the weights stacked [D, 2, F], and their
  gradients as one [B*T, 2, F] array written by a single elementwise expression.

  On XLA:GPU the split backward ran as two passes, each reading the upstream gradient and the
  gate (and a concatenate of the two halves became an extra copy); here XLA writes the pair in
  one pass and both gradient matmuls read it whole. The pair sits on a new axis, not
  concatenated along d_ff, so a d_ff sharded over `tensor` stays where it is. On XLA:CPU this
  form ran 1.3-2.7x slower than the split one.
  """
  return _paired_fwd(x_btd, w_gate_df, w_up_df, w_down_fd)[0]


def _paired_fwd(x_btd, w_gate_df, w_up_df, w_down_fd):
  x = x_btd.reshape(-1, x_btd.shape[-1])  # [B*T, D]
  gu = jnp.einsum("nd,dkf->nkf", x, jnp.stack([w_gate_df, w_up_df], axis=1))
  y = (jax.nn.silu(gu[:, 0]) * gu[:, 1]) @ w_down_fd
  return y.reshape(x_btd.shape), (x, gu, w_gate_df, w_up_df, w_down_fd)


def _activation_grad(gu, dh):
  """d(gate, up) [N, 2, F] from dh [N, F], as one jnp expression XLA writes in one pass."""
  # Entry (n, k, f) reads its gate and up from gu and from gu with the pair swapped.
  swapped = gu[:, ::-1]
  first = lax.broadcasted_iota(jnp.int32, (1, 2, 1), 1) == 0
  g, u = jnp.where(first, gu, swapped), jnp.where(first, swapped, gu)
  sig = jax.nn.sigmoid(g)
  return dh[:, None, :] * jnp.where(first, u * (sig * (1 + g * (1 - sig))), g * sig)


def _paired_grads(res, dy_btd, activation_grad):
  x, gu, w_gate_df, w_up_df, w_down_fd = res
  dy = dy_btd.reshape(-1, dy_btd.shape[-1])
  d_gu = activation_grad(gu, dy @ w_down_fd.T)
  dx = jnp.einsum("nkf,dkf->nd", d_gu, jnp.stack([w_gate_df, w_up_df], axis=1))
  dw = jnp.einsum("nd,nkf->dkf", x, d_gu)
  h = jax.nn.silu(gu[:, 0]) * gu[:, 1]
  return dx.reshape(dy_btd.shape), dw[:, 0], dw[:, 1], h.T @ dy


swiglu_paired.defvjp(_paired_fwd, functools.partial(_paired_grads,
                                                    activation_grad=_activation_grad))


def swiglu_paired_kernel(x_btd, w_gate_df, w_up_df, w_down_fd, *, interpret=None):
  """`swiglu_paired` with d(gate, up) taken by the Pallas kernel `kernels.swiglu.swiglu_grad`:
  it reads gate, up and dh once per pair and writes both gradients (float32 arithmetic, one
  rounding), where XLA's fusion reads each pair twice and takes its sigmoid twice
  (docs/kernels.md). The forward and every matmul are `swiglu_paired`'s. `interpret` (None:
  `flash_attention.force_interpret` as it is at this call) is fixed here, so a backward traced
  later runs the same way."""
  if interpret is None:
    from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
    interpret = fa.interpret_forced()
  return _swiglu_paired_kernel(x_btd, w_gate_df, w_up_df, w_down_fd, bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _swiglu_paired_kernel(x_btd, w_gate_df, w_up_df, w_down_fd, interpret):
  del interpret
  return _paired_fwd(x_btd, w_gate_df, w_up_df, w_down_fd)[0]


def _kernel_fwd(x_btd, w_gate_df, w_up_df, w_down_fd, interpret):
  del interpret
  return _paired_fwd(x_btd, w_gate_df, w_up_df, w_down_fd)


def _kernel_bwd(interpret, res, dy_btd):
  from tinystories_jax.kernels import swiglu as swiglu_kernels  # noqa: PLC0415 (Pallas on use)
  return _paired_grads(res, dy_btd, functools.partial(swiglu_kernels.swiglu_grad,
                                                      interpret=interpret))


_swiglu_paired_kernel.defvjp(_kernel_fwd, _kernel_bwd)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm1(x)); x + mlp(norm2(x))."""

  def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
    norm = LayerNorm if cfg.is_gpt_neo else RMSNorm
    self.norm1 = norm(cfg, rngs)
    self.attn = Attention(cfg, kind, rngs)
    self.norm2 = norm(cfg, rngs)
    self.mlp = GeluMLP(cfg, rngs) if cfg.is_gpt_neo else SwiGLU(cfg, rngs)

  def __call__(self, x_btd, positions_bt, segment_ids_bt=None):
    x, mlp_out = self.deferred(x_btd, None, positions_bt, segment_ids_bt)
    return x + mlp_out

  def deferred(self, x_btd, delta_btd, positions_bt, segment_ids_bt=None):
    """The block applied to x + delta, returning (x', mlp_out) with the last residual add left
    to the caller: with `norm_impl="pallas"` the model hands it to the next norm
    (`add_and_norm`), so each residual add and the norm reading its sum run as one kernel.
    delta None: nothing to add."""
    x, h = self.norm1.add_and_norm(x_btd, delta_btd)
    x, h = self.norm2.add_and_norm(x, self.attn(h, positions_bt, segment_ids_bt))
    return x, self.mlp(h)


class CausalLM(nnx.Module):
  """What both families share: embedding, blocks, final norm, tied (or separate) output layer.

  Subclasses set `self.embed_positions(tokens_bt, positions_bt) -> x_btd`.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embedding = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                           ("vocab", "embed"), pd)
    self.blocks = nnx.List([Block(cfg, kind, rngs) for kind in cfg.attention_layers])
    self.final_norm = (LayerNorm if cfg.is_gpt_neo else RMSNorm)(cfg, rngs)
    self.lm_head = None if cfg.tie_embeddings else param(
        rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd)

  def embed_positions(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
    del positions_bt
    return x_btd

  def hidden(self, tokens_bt: jax.Array, *, positions_bt: jax.Array | None = None,
             segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states h_btd in the compute dtype."""
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    dt = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.embedding[...], tokens_bt, axis=0).astype(dt)
    x = self.embed_positions(x, positions_bt)
    # With the norm kernels each block's last residual add is left to the next norm (the
    # kernel adds and normalises in one pass); the jnp norms keep the plain blocks, so their
    # step (and its remat and scan boundaries) is what it always was.
    deferred, remat = self.cfg.norm_impl == "pallas", self.cfg.remat == "block"
    delta = None
    if self.cfg.scan_layers:
      x, delta = scan_lib.scan_blocks(list(self.blocks), self.cfg.attention_layers, x,
                                      positions_bt, segment_ids_bt, remat=remat,
                                      deferred=deferred)
    elif deferred:
      step = nnx.remat(Block.deferred) if remat else Block.deferred
      for block in self.blocks:
        x, delta = step(block, x, delta, positions_bt, segment_ids_bt)
    else:
      step = nnx.remat(Block.__call__) if remat else Block.__call__
      for block in self.blocks:
        x = step(block, x, positions_bt, segment_ids_bt)
    return self.final_norm.add_and_norm(x, delta, keep_sum=False)

  def output_embedding(self) -> jax.Array:
    """The output projection w_vd (the tied input embedding unless `tie_embeddings` is False)."""
    return (self.embedding if self.lm_head is None else self.lm_head)[...]

  def logits(self, h_btd: jax.Array) -> jax.Array:
    """float32 logits from hidden states (matmul in the compute dtype, float32 accumulation)."""
    w = self.output_embedding().astype(h_btd.dtype)
    return jnp.einsum("btd,vd->btv", h_btd, w, preferred_element_type=jnp.float32)

  def __call__(self, tokens_bt: jax.Array, *, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
    """logits_btv in float32."""
    return self.logits(self.hidden(tokens_bt, positions_bt=positions_bt,
                                   segment_ids_bt=segment_ids_bt))

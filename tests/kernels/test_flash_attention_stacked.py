"""`flash_attention_stacked` (q/k/v read from the stacked projection, rotary inside the backward)
against split + rotary + the float32 reference: the output and the gradient of the stacked
projection. Through the Pallas interpreter on a CPU; the `gpu`-marked cases compiled on a GPU.
Inputs are fresh random draws on every run; the seed is part of every failure message.
"""

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinystories_jax.kernels import flash_attention as fa

SMALL_BLOCKS = fa.BlockSizes(*(32,) * 6)
MIXED_BLOCKS = fa.BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                             block_k_dkv=16, num_warps=2, num_stages=1)
SPLIT_BLOCKS = fa.BlockSizes(*(32,) * 6, split_head_dim=True)


def _tables(positions_bt, d, theta=10000.0):
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def _inputs(seed, b, t, h, k, d, dtype, segments):
  rng = np.random.default_rng(seed)
  y = jnp.asarray(rng.standard_normal((b, t, 2 * k + h, d)), dtype)
  do = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  # Positions need not be 0..T-1 nor the same in every row (packed rows restart them).
  positions = jnp.asarray(rng.integers(0, 4 * t, (b, t)))
  seg = None
  if segments:
    ids = np.zeros((b, t), np.int32)
    for row in range(b):
      cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
      ids[row, :cuts[0]], ids[row, cuts[0]:cuts[1]], ids[row, cuts[1]:cuts[2]] = 1, 2, 3
    seg = jnp.asarray(ids)
  return y, do, _tables(positions, d), seg


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-6))


def _check(interpret, *, b, t, h, k, d, dtype=jnp.float32, window=None, segments=False,
           block_sizes=SMALL_BLOCKS):
  seed = secrets.randbits(32)
  y, do, (cos, sin), seg = _inputs(seed, b, t, h, k, d, dtype, segments)
  kw = dict(kv_heads=k, window=window, segment_ids_bt=seg)
  o, vjp = jax.vjp(lambda y: fa.flash_attention_stacked(
      y, cos, sin, interpret=interpret, block_sizes=block_sizes, **kw), y)
  (dy,) = vjp(do)
  o_ref, vjp_ref = jax.vjp(lambda y: fa.flash_attention_stacked_reference(y, cos, sin, **kw),
                           y.astype(jnp.float32))
  (dy_ref,) = vjp_ref(do.astype(jnp.float32))
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  for name, got, want in (("o", o, o_ref), ("dy", dy, dy_ref)):
    assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
    assert np.isfinite(np.asarray(got, np.float32)).all(), f"{name} has NaN/inf (seed {seed})"
    err = _rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol} (seed {seed})"
  # Every slot gets its gradient: keys, values and queries each against the reference's.
  slots = {"k": slice(0, 2 * k, 2), "v": slice(1, 2 * k, 2), "q": slice(2 * k, None)}
  for name, sl in slots.items():
    err = _rel_err(dy[:, :, sl], dy_ref[:, :, sl])
    assert err < tol, f"d{name}: relative error {err:.2e} >= {tol} (seed {seed})"
  if segments:
    padding = np.asarray(seg) == 0
    assert not np.asarray(o, np.float32)[padding].any(), f"padding rows not zero ({seed})"


# One kv head per query head (the kernels write the key and value slots themselves), grouped
# and single kv heads (the group's sums written by XLA), padding, windows, segments, head dims
# whose halves are and are not tile widths, bf16.
CASES = {
    "mha_d64": dict(b=1, t=64, h=2, k=2, d=64),
    "mha_pad_window_segments_d48": dict(b=2, t=100, h=3, k=3, d=48, window=40, segments=True),
    "gqa_d16": dict(b=2, t=64, h=4, k=2, d=16, segments=True),
    "mqa_pad_d32": dict(b=1, t=70, h=3, k=1, d=32),
    "bf16_mha_window_d48": dict(b=1, t=96, h=2, k=2, d=48, dtype=jnp.bfloat16, window=33),
    "mha_d128_mixed_blocks": dict(b=1, t=72, h=2, k=2, d=128, window=20,
                                  block_sizes=MIXED_BLOCKS),
    # q and k in rotary's halves, v, o and dO in power-of-two column tiles (32 + 16).
    "split_mha_pad_window_segments_d48": dict(b=2, t=100, h=3, k=3, d=48, window=40,
                                              segments=True, block_sizes=SPLIT_BLOCKS),
    "split_bf16_gqa_d48": dict(b=1, t=96, h=4, k=2, d=48, dtype=jnp.bfloat16,
                               block_sizes=SPLIT_BLOCKS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreted(case):
  _check(True, **CASES[case])


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled(case):
  _check(False, **{"block_sizes": None, **CASES[case]})


@pytest.mark.gpu
def test_compiled_at_the_llama_15m_shape():
  _check(False, b=4, t=256, h=6, k=6, d=48, dtype=jnp.bfloat16, block_sizes=None)


def test_stack_qkv_weights_lays_out_the_slots():
  rng = np.random.default_rng(0)
  wq, wk, wv = (jnp.asarray(rng.standard_normal((8, n, 16)), jnp.float32) for n in (4, 2, 2))
  w = fa.stack_qkv_weights(wq, wk, wv)
  assert w.shape == (8, 2 * 2 + 4, 16)
  np.testing.assert_array_equal(w[:, 0], wk[:, 0])
  np.testing.assert_array_equal(w[:, 1], wv[:, 0])
  np.testing.assert_array_equal(w[:, 2], wk[:, 1])
  np.testing.assert_array_equal(w[:, 3], wv[:, 1])
  np.testing.assert_array_equal(w[:, 4:], wq)


def test_rotate_half_is_rotary():
  """The rotate-half layout: pair (i, i + D/2) turned by the position's angle, norms kept."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 3, 2, 8)), jnp.float32)
  cos, sin = _tables(jnp.asarray([[0, 1, 5]]), 8)
  r = fa.rotate_half(x, cos, sin)
  np.testing.assert_allclose(r[:, 0], x[:, 0], rtol=1e-6)  # position 0: no turn
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  angle = float(jnp.arctan2(sin[0, 2, 1], cos[0, 2, 1]))
  lo, hi = x[0, 2, 0, 1], x[0, 2, 0, 5]
  np.testing.assert_allclose(r[0, 2, 0, 1], lo * np.cos(angle) - hi * np.sin(angle), rtol=1e-5)
  np.testing.assert_allclose(r[0, 2, 0, 5], hi * np.cos(angle) + lo * np.sin(angle), rtol=1e-5)


def test_sharded_over_the_batch_under_a_mesh():
  """Under jax.set_mesh each device runs its batch shard (all heads, the tensor axis too)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake CPU) devices")
  auto = (jax.sharding.AxisType.Auto,) * 3
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
  seed = secrets.randbits(32)
  y, do, (cos, sin), seg = _inputs(seed, 4, 32, 2, 2, 16, jnp.float32, True)
  kw = dict(kv_heads=2, segment_ids_bt=seg)

  def run(fn):
    o, vjp = jax.vjp(lambda y: fn(y, cos, sin, **kw), y)
    return (o,) + vjp(do)

  want = run(fa.flash_attention_stacked_reference)
  with jax.set_mesh(mesh):
    sharded = lambda: run(lambda *a, **k: fa.flash_attention_stacked(  # noqa: E731
        *a, interpret=True, block_sizes=SMALL_BLOCKS, **k))
    assert "shard_map" in str(jax.make_jaxpr(sharded)())
    got = jax.jit(sharded)()
  for name, g, w in zip(("o", "dy"), got, want):
    assert _rel_err(g, w) < 2e-5, (name, seed)


def test_lowers_for_cuda(cuda_lowering):
  """The Triton lowering takes the half-width tiles, the two-slot blocks and the aliasing."""
  y = jax.ShapeDtypeStruct((2, 200, 3 * 4, 48), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((2, 200, 24), jnp.float32)
  seg = jax.ShapeDtypeStruct((2, 200), jnp.int32)

  def fwd_bwd(y, cos, sin, seg):
    o, vjp = jax.vjp(lambda y: fa.flash_attention_stacked(
        y, cos, sin, kv_heads=4, window=64, segment_ids_bt=seg, interpret=False), y)
    return vjp(o)

  with pytest.MonkeyPatch.context() as mp:  # the wrapper checks the platform it runs on
    mp.setattr(jax, "default_backend", lambda: "gpu")
    try:
      text = jax.jit(fwd_bwd).trace(y, table, table, seg).lower(
          lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # a jaxlib built without the Triton lowering
      pytest.skip(f"cannot lower for cuda here: {e}")
  assert text.count("triton") >= 3, "expected the forward, dQ and dK/dV kernels"
  assert "output_operand_alias" in text, "dK/dV writes into dQ's buffer in place"


def test_clear_errors():
  y = jnp.zeros((1, 32, 6, 16), jnp.float32)
  cos = sin = jnp.zeros((1, 32, 8), jnp.float32)
  with pytest.raises(ValueError, match="runs the Pallas GPU kernels, not on 'cpu'"):
    fa.flash_attention_stacked(y, cos, sin, kv_heads=2)
  with pytest.raises(ValueError, match="key and value slots"):
    fa.flash_attention_stacked(y, cos, sin, kv_heads=3, interpret=True)
  with pytest.raises(ValueError, match=r"cos and sin must be \[B, T, D/2\]"):
    fa.flash_attention_stacked(y, cos[:, :, :4], sin, kv_heads=2, interpret=True)
  with pytest.raises(ValueError, match="head_dim 16 to 128.*qkv_impl='xla'"):
    fa.flash_attention_stacked(jnp.zeros((1, 32, 6, 8)), cos[..., :4], sin[..., :4],
                               kv_heads=2, interpret=True)

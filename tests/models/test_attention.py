"""Attention implementations against the float32 reference: masks, GQA, gradients, sharding."""

import functools
import importlib.util

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from tinystories_jax.models import attention as attn


def _inputs(b=2, t=37, s=None, h=4, k=2, d=8, dtype=jnp.float32, seed=0):
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  kk = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
  return q, kk, v


def _segments(b, t, seed=0):
  """Packed rows: a few segments of random lengths, then padding (0)."""
  rng = np.random.default_rng(seed)
  out = np.zeros((b, t), np.int32)
  for row in range(b):
    pos, seg = 0, 1
    while pos < t - 3:
      n = int(rng.integers(1, t // 2))
      out[row, pos:pos + n] = seg
      pos, seg = pos + n, seg + 1
  return jnp.asarray(out)


CASES = {
    "causal": dict(causal=True),
    "window": dict(causal=True, window=5),
    "window_1": dict(causal=True, window=1),
    "segments": dict(causal=True, segments=True),
    "window_segments": dict(causal=True, window=7, segments=True),
    "bidirectional": dict(causal=False),
    "bidirectional_segments": dict(causal=False, segments=True),
    "scale_1": dict(causal=True, window=4, scale=1.0),
}


def _run(impl, q, k, v, case):
  kw = dict(case)
  seg = None
  if kw.pop("segments", False):
    seg = _segments(q.shape[0], q.shape[1])
  return attn.attention(q, k, v, impl=impl, q_segment_ids_bt=seg, kv_segment_ids_bs=seg, **kw)


def _forward_and_grads(impl, case):
  q, k, v = _inputs()
  ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def loss(q, k, v):
    o = _run(impl, q, k, v, CASES[case])
    return jnp.sum(o * ct), o

  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, grads


_reference_results = functools.lru_cache(maxsize=None)(
    lambda case: _forward_and_grads("reference", case))


@pytest.mark.parametrize("impl", ["xla", "cpu"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradient_match_reference(impl, case):
  want, g_want = _reference_results(case)
  got, g_got = _forward_and_grads(impl, case)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("t,s,d,block,case", [
    (37, 45, 8, 8, "window_segments"),  # many blocks, queries bottom-right aligned
    (37, 37, 32, 16, "causal"),         # head_dim above the elementwise dO V^T limit
    (20, 12, 8, 8, "causal"),           # T > S: the first query rows see no key
    (37, 37, 8, 8, "bidirectional_segments"),
])
def test_cpu_custom_backward_matches_reference(t, s, d, block, case):
  """The `cpu` backward is written by hand: every gradient against autodiff of the reference."""
  from tinystories_jax.models import attention_cpu  # pylint: disable=import-outside-toplevel
  q, k, v = _inputs(b=2, t=t, s=s, h=4, k=2, d=d)
  kw = dict(CASES[case])
  seg = (_segments(2, t), _segments(2, s, seed=1)) if kw.pop("segments", False) else (None, None)
  ct = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

  def ours(q, k, v):
    return attention_cpu.cpu_attention(q, k, v, window=kw.get("window"), causal=kw["causal"],
                                       q_segment_ids_bt=seg[0], kv_segment_ids_bs=seg[1],
                                       scale=d ** -0.5, block=block)

  def ref(q, k, v):
    return attn.attention(q, k, v, impl="reference", q_segment_ids_bt=seg[0],
                          kv_segment_ids_bs=seg[1], **kw)

  def grads(f):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)

  np.testing.assert_allclose(jax.jit(ours)(q, k, v), ref(q, k, v), atol=2e-6, rtol=1e-5)
  for a, b in zip(grads(ours), grads(ref)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla", "cpu"])
@pytest.mark.parametrize("k_heads", [1, 2, 4])
def test_gqa_equals_repeated_kv(impl, k_heads):
  q, k, v = _inputs(h=4, k=k_heads)
  rep = 4 // k_heads
  want = attn.attention(q, jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2),
                        impl="reference", causal=True)
  got = attn.attention(q, k, v, impl=impl, causal=True)
  np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("impl", ["reference", "xla", "cpu"])
def test_queries_are_bottom_right_aligned(impl):
  """T < S (a decode step or a chunk): queries are the last T positions."""
  q, k, v = _inputs(t=12, s=12)
  full = attn.attention(q, k, v, impl="reference", causal=True, window=5)
  tail = attn.attention(q[:, -4:], k, v, impl=impl, causal=True, window=5)
  np.testing.assert_allclose(tail, full[:, -4:], atol=2e-6)


def test_window_matches_gpt_neo_local_mask():
  """transformers' GPT-Neo: bias = tril(ones); local: bias ^ tril(bias, -window_size)."""
  t, w = 20, 6
  bias = np.tril(np.ones((t, t), bool))
  neo = bias ^ np.tril(bias, -w)
  ours = np.asarray(attn.structural_mask(t, t, causal=True, window=w))
  np.testing.assert_array_equal(ours, neo)
  assert ours.sum(-1).max() == w  # a query sees `window` keys, itself included


def test_padding_rows_are_zero_and_finite():
  q, k, v = _inputs(t=16)
  seg = jnp.asarray(np.r_[np.ones(10), np.zeros(6)].astype(np.int32)[None].repeat(2, 0))
  for impl in ("reference", "xla", "cpu"):
    def f(q, k, v, impl=impl):
      return attn.attention(q, k, v, impl=impl, q_segment_ids_bt=seg, kv_segment_ids_bs=seg)
    o = jax.jit(f)(q, k, v)
    assert np.all(np.asarray(o[:, 10:]) == 0), impl
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))(
        q, k, v)
    for g in grads:
      assert np.isfinite(np.asarray(g)).all(), impl


def test_fully_masked_rows_in_reference_are_zero():
  q, k, v = _inputs(t=4, s=4)
  qs = jnp.asarray([[1, 1, 2, 2]] * 2)
  ks = jnp.asarray([[3, 3, 3, 3]] * 2)  # no key shares a segment with any query
  o = attn.attention(q, k, v, impl="reference", q_segment_ids_bt=qs, kv_segment_ids_bs=ks)
  assert np.all(np.asarray(o) == 0)


def test_scale_default_is_inverse_sqrt_head_dim():
  q, k, v = _inputs(d=16)
  a = attn.attention(q, k, v, impl="reference")
  b = attn.attention(q, k, v, impl="reference", scale=0.25)
  np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "cpu"])
def test_bfloat16_inputs(impl):
  q, k, v = _inputs(dtype=jnp.bfloat16)
  got = attn.attention(q, k, v, impl=impl, window=9)
  assert got.dtype == jnp.bfloat16
  want = attn.attention(q, k, v, impl="reference", window=9)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)


def test_sharded_on_a_fake_mesh_matches_reference():
  devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
  if devices.size < 8:
    pytest.skip("needs 8 (fake) CPU devices")
  mesh = jax.sharding.Mesh(devices, ("data", "tensor"))
  q, k, v = _inputs(b=4, t=32, h=4, k=2)
  seg = _segments(4, 32)
  ct = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
  heads = NamedSharding(mesh, P("data", None, "tensor", None))
  rows = NamedSharding(mesh, P("data", None))

  for impl in ("xla", "cpu"):
    def loss(q, k, v, seg, ct, impl=impl):
      o = attn.attention(q, k, v, impl=impl, window=9, q_segment_ids_bt=seg,
                         kv_segment_ids_bs=seg)
      return jnp.sum(o * ct), o

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                   in_shardings=(heads, heads, heads, rows, heads))
    args = [jax.device_put(x, s) for x, s in
            zip((q, k, v, seg, ct), (heads, heads, heads, rows, heads))]
    (_, o), grads = step(*args)
    assert o.sharding.num_devices == 8
    (_, o_ref), g_ref = jax.jit(jax.value_and_grad(
        lambda *a: loss(*a, impl="reference"), argnums=(0, 1, 2), has_aux=True))(
            q, k, v, seg, ct)
    np.testing.assert_allclose(o, o_ref, atol=2e-6)
    for a, b in zip(grads, g_ref):
      np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "window", "segments", "window_segments"])
def test_cudnn_matches_reference_on_a_gpu(case):
  q, k, v = _inputs(b=2, t=128, h=4, k=2, d=64, dtype=jnp.bfloat16)
  got = jax.jit(lambda q, k, v: _run("cudnn", q, k, v, CASES[case]))(q, k, v)
  want = _run("reference", q, k, v, CASES[case])
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=3e-2)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      _run("cudnn", q, k, v, CASES[case]).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def test_cudnn_on_cpu_says_so():
  q, k, v = _inputs()
  with pytest.raises(attn.AttentionUnsupported, match="xla"):
    attn.attention(q, k, v, impl="cudnn")


def test_pallas_without_the_kernel_module_says_so(monkeypatch):
  monkeypatch.setattr(attn, "_PALLAS_MODULE", "tinystories_jax.kernels.no_such_kernel")
  q, k, v = _inputs()
  with pytest.raises(attn.AttentionUnsupported, match="xla"):
    attn.attention(q, k, v, impl="pallas")


def test_pallas_registration_calls_the_kernel():
  fa = pytest.importorskip("tinystories_jax.kernels.flash_attention")
  q, k, v = _inputs(b=1, t=32, h=2, k=1, d=16)
  seg = _segments(1, 32)
  with fa.force_interpret():
    got = attn.attention(q, k, v, impl="pallas", window=9, q_segment_ids_bt=seg)
  want = attn.attention(q, k, v, impl="reference", window=9, q_segment_ids_bt=seg)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_unknown_implementation_lists_the_known_ones():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="reference"):
    attn.attention(q, k, v, impl="nope")


def test_auto_picks_per_platform():
  assert attn.choose_auto(jnp.float32, 8, None) == "cpu"  # this machine
  # GPU: the Pallas kernel up to head_dim 64 (measured ahead of cuDNN there), cuDNN above.
  assert attn.choose_auto(jnp.bfloat16, 64, 256, backend="gpu") == "pallas"
  assert attn.choose_auto(jnp.bfloat16, 48, None, backend="gpu") == "pallas"
  assert attn.choose_auto(jnp.bfloat16, 128, None, backend="gpu") == "cudnn"
  assert attn.choose_auto(jnp.bfloat16, 128, 256, backend="gpu", same_length=False) == "pallas"
  assert attn.choose_auto(jnp.float32, 8, None, backend="gpu") == "xla"  # neither kernel
  if importlib.util.find_spec("tinystories_jax.kernels.flash_attention"):
    assert attn.choose_auto(jnp.float32, 64, None, backend="gpu") == "pallas"
    assert attn.choose_auto(jnp.float32, 128, None, backend="gpu") == "pallas"  # cuDNN: no f32
    assert attn.choose_auto(jnp.bfloat16, 64, None, backend="tpu") == "pallas"
  assert attn.choose_auto(jnp.bfloat16, 8, None, backend="tpu") == "xla"
  assert {"reference", "xla", "cudnn", "pallas", "cpu", "auto"} <= set(attn.implementations())


def test_bad_arguments_are_one_sentence():
  q, k, v = _inputs(h=4, k=3, d=8)
  with pytest.raises(ValueError, match="kv heads dividing"):
    attn.attention(q, k, v, impl="reference")
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="causal"):
    attn.attention(q, k, v, impl="reference", causal=False, window=4)


def test_register_attention_adds_an_implementation():
  calls = []

  def fake(q, k, v, *, causal, window, q_segment_ids_bt, kv_segment_ids_bs, scale):
    calls.append((causal, window, scale))
    return q

  attn.register_attention("test_fake", fake)
  try:
    q, k, v = _inputs(d=4)
    attn.attention(q, k, v, impl="test_fake", window=3)
    assert calls == [(True, 3, 0.5)]
  finally:
    attn._REGISTRY.pop("test_fake")

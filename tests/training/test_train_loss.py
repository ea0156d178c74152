"""The chunked and fused output losses equal the plain one, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinystories_jax.kernels import flash_attention as fa
from tinystories_jax.training import loss as loss_lib


def _inputs(b=3, t=24, d=16, v=50, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (v, d)) * 0.3
  targets = jax.random.randint(k[2], (b, t), 0, v)
  mask = (jax.random.uniform(k[3], (b, t)) > 0.25).astype(jnp.float32)
  return h, w, targets, mask


@pytest.mark.parametrize("chunk", [5, 8, 24, 100])
def test_chunked_equals_plain_values_and_gradients(chunk):
  h, w, targets, mask = _inputs()

  def objective(fn):
    def f(h, w):
      s = fn(h, w, targets, mask)
      return s.nll + 1e-2 * s.z, s
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)

  (v_plain, s_plain), g_plain = objective(loss_lib.plain_loss_sums)
  chunked = lambda *a: loss_lib.chunked_loss_sums(*a, chunk=chunk)
  (v_chunk, s_chunk), g_chunk = objective(chunked)
  np.testing.assert_allclose(v_chunk, v_plain, rtol=1e-5)
  np.testing.assert_allclose(s_chunk.count, float(mask.sum()))
  for a, b in zip(g_chunk, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _objective(fn, h, w, targets, mask, z_weight=1e-2):
  def f(h, w):
    s = fn(h, w, targets, mask)
    # As the train step: without a z-loss, z is left out of what is differentiated.
    return (s.nll + z_weight * s.z if z_weight else s.nll), s
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(h, w)


# 50 rows: unpadded, padded to 64 and to 128. The Pallas kernels need a padded vocabulary
# (test_pallas_kernel_needs_padding_and_a_gpu), so they run the padded cases only.
@pytest.mark.parametrize("vocab_multiple, kernel", [
    (m, k) for m in (1, 16, 128) for k in loss_lib.LOSS_KERNELS
    if m > 1 or not k.startswith("pallas")])
@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_fused_equals_plain_in_float32(z_weight, vocab_multiple, kernel):
  seed = np.random.SeedSequence().entropy % 2**31
  h, w, targets, mask = _inputs(seed=seed)
  fused = lambda *a: loss_lib.fused_loss_sums(*a, vocab_multiple=vocab_multiple, kernel=kernel)
  (v_plain, s_plain), g_plain = _objective(loss_lib.plain_loss_sums, h, w, targets, mask, z_weight)
  with fa.force_interpret():  # the Pallas kernels through the interpreter on this CPU
    (v_fused, s_fused), g_fused = _objective(fused, h, w, targets, mask, z_weight)
  np.testing.assert_allclose(v_fused, v_plain, rtol=1e-5, err_msg=f"seed {seed}")
  np.testing.assert_allclose(s_fused.z, s_plain.z, rtol=1e-5)
  np.testing.assert_allclose(s_fused.count, float(mask.sum()))
  for a, b in zip(g_fused, g_plain):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"seed {seed}")


def _fused_with(kernel):
  """The fused loss with `kernel`, padded to 64 rows (which the Pallas kernels need)."""
  return lambda *a: loss_lib.fused_loss_sums(*a, vocab_multiple=64, kernel=kernel)


@pytest.mark.parametrize("kernel", ["xla", "pallas", "pallas_fwd_grad"])
def test_fused_in_bfloat16_stays_close_to_float32(kernel):
  """bf16 logits (the mixed-precision case): value and gradients near the float32 plain loss."""
  h, w, targets, mask = _inputs(b=4, t=32, d=32, v=300, seed=3)
  (v_ref, _), (gh_ref, gw_ref) = _objective(loss_lib.plain_loss_sums, h, w, targets, mask)
  with fa.force_interpret():
    (v_bf, _), (gh_bf, gw_bf) = _objective(_fused_with(kernel), h.astype(jnp.bfloat16), w,
                                           targets, mask)
  assert gh_bf.dtype == jnp.bfloat16 and gw_bf.dtype == jnp.float32  # w's own dtype
  np.testing.assert_allclose(v_bf, v_ref, rtol=2e-2)
  for got, want in ((gh_bf, gh_ref), (gw_bf, gw_ref)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("kernel", ["xla", "pallas", "pallas_fwd_grad"])
def test_fused_masked_targets_do_not_matter(kernel):
  h, w, targets, mask = _inputs(seed=4)
  other = jnp.where(mask > 0, targets, (targets + 7) % w.shape[0])
  with fa.force_interpret():
    (_, _), g_a = _objective(_fused_with(kernel), h, w, targets, mask)
    (_, _), g_b = _objective(_fused_with(kernel), h, w, other, mask)
  for a, b in zip(g_a, g_b):
    np.testing.assert_array_equal(a, b)


def test_plain_matches_a_direct_cross_entropy():
  h, w, targets, mask = _inputs(seed=1)
  logits = jnp.einsum("btd,vd->btv", h, w)
  logp = jax.nn.log_softmax(logits)
  want = -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask)
  got = loss_lib.plain_loss_sums(h, w, targets, mask)
  np.testing.assert_allclose(got.nll, want, rtol=1e-5)


def test_masked_targets_do_not_matter():
  h, w, targets, mask = _inputs(seed=2)
  other = jnp.where(mask > 0, targets, (targets + 7) % w.shape[0])
  a = loss_lib.chunked_loss_sums(h, w, targets, mask, chunk=8)
  b = loss_lib.chunked_loss_sums(h, w, other, mask, chunk=8)
  np.testing.assert_array_equal(a.nll, b.nll)


def test_chunk_length_tiles_the_sequence():
  assert loss_lib.chunk_length(256, 128) == 128
  assert loss_lib.chunk_length(24, 10) == 8
  assert loss_lib.chunk_length(7, 128) == 7
  assert loss_lib.chunk_length(13, 4) == 1


def test_unknown_impl_is_rejected():
  h, w, targets, mask = _inputs()
  with pytest.raises(ValueError, match="plain"):
    loss_lib.loss_sums(h, w, targets, mask, impl="nope", chunk=8)
  with pytest.raises(ValueError, match="xla_online"):
    loss_lib.loss_sums(h, w, targets, mask, impl="fused", chunk=8, kernel="triton")


def test_pallas_kernel_needs_padding_and_a_gpu():
  h, w, targets, mask = _inputs()  # vocab 50
  with fa.force_interpret(), pytest.raises(ValueError, match="loss_vocab_multiple to 128"):
    loss_lib.fused_loss_sums(h, w, targets, mask, vocab_multiple=1, kernel="pallas")
  with pytest.raises(ValueError, match="run on GPUs"):  # compiled, on this CPU
    loss_lib.fused_loss_sums(h, w, targets, mask, kernel="pallas")


def test_auto_kernel_is_pallas_where_it_runs():
  resolve = loss_lib.resolve_kernel
  assert resolve("auto", 32000, "gpu") == "pallas"
  assert resolve("auto", 50304, "cuda") == "pallas"
  assert resolve("auto", 50257, "gpu") == "xla"  # unpadded: the kernels cannot tile it
  assert resolve("auto", 32000, "cpu") == "xla"
  assert resolve("auto", 32000, "tpu") == "xla"
  for name in ("xla", "xla_online", "pallas", "pallas_fwd_grad"):
    assert resolve(name, 50257, "cpu") == name  # a named kernel is taken as named
  with pytest.raises(ValueError, match="Unknown loss kernel 'triton'"):
    resolve("triton", 32000, "gpu")
  # A vocabulary split over `tensor`: the kernels would gather it, so XLA's passes.
  assert resolve("auto", 32000, "gpu", tensor_split=True) == "xla"
  axes = ("data", "fsdp", "tensor")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1, 1, 2), axes)):
    assert resolve("auto", 32000, "gpu") == "xla"
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2, 2, 1), axes)):
    assert resolve("auto", 32000, "gpu") == "pallas"


def test_fwd_grad_saves_softmax_minus_onehot_and_only_scales_it(monkeypatch):
  """"pallas_fwd_grad": the forward's kernel runs once per gradient and the backward never
  calls the gradient kernel; the z-loss's cotangent alone (nll not differentiated) and no
  cotangent at all give what the plain loss gives."""
  from tinystories_jax.kernels import cross_entropy as ce  # noqa: PLC0415
  calls = []
  for name in ("softmax_minus_onehot", "logit_grad", "logsumexp"):
    fn = getattr(ce, name)
    monkeypatch.setattr(ce, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
  h, w, targets, mask = _inputs(seed=4)
  fused = lambda *a: loss_lib.fused_loss_sums(*a, vocab_multiple=64, kernel="pallas_fwd_grad")
  with fa.force_interpret():
    (_, s_fused), g_fused = _objective(fused, h, w, targets, mask)
    assert calls == ["softmax_minus_onehot"]
    assert fused(h, w, targets, mask).nll == pytest.approx(float(s_fused.nll), rel=1e-6)
    assert calls[1:] == ["logsumexp"]  # not differentiated: the log-sum-exp kernel alone
    z_only = jax.grad(lambda h, w: fused(h, w, targets, mask).z, argnums=(0, 1))(h, w)
    neither = jax.grad(lambda h, w: fused(h, w, targets, mask).count, argnums=(0, 1))(h, w)
  (_, _), g_plain = _objective(loss_lib.plain_loss_sums, h, w, targets, mask)
  for a, b in zip(g_fused, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  z_plain = jax.grad(lambda h, w: loss_lib.plain_loss_sums(h, w, targets, mask).z,
                     argnums=(0, 1))(h, w)
  for a, b in zip(z_only, z_plain):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a in neither:
    assert not np.any(np.asarray(a))


def test_fwd_grad_without_z_runs_no_gather_or_scatter():
  """The z-loss's gather and scatter run only where z's cotangent is not a symbolic zero."""
  h, w, targets, mask = _inputs(seed=5)

  def texts(objective):
    fused = lambda h, w: loss_lib.fused_loss_sums(  # noqa: E731
        h, w, targets, mask, vocab_multiple=64, kernel="pallas_fwd_grad")
    with fa.force_interpret():
      return str(jax.make_jaxpr(jax.grad(lambda h, w: objective(fused(h, w)),
                                         argnums=(0, 1)))(h, w))
  nll_only = texts(lambda s: s.nll)
  with_z = texts(lambda s: s.nll + 1e-2 * s.z)
  assert "scatter-add" not in nll_only and "scatter-add" in with_z
  assert nll_only.count("gather") < with_z.count("gather")


def test_padded_vocab():
  assert loss_lib.padded_vocab(50257, 128) == 50304
  assert loss_lib.padded_vocab(32000, 128) == 32000
  assert loss_lib.padded_vocab(50, 1) == 50


def test_online_logsumexp_equals_two_pass():
  seed = np.random.SeedSequence().entropy % 2**31
  k1, k2 = jax.random.split(jax.random.key(seed))
  # Wide magnitudes: exp() of them would overflow float32 without the running maximum.
  x = jax.random.normal(k1, (3, 5, 301)) * 40.0
  np.testing.assert_allclose(jax.jit(loss_lib.online_logsumexp)(x),
                             jax.nn.logsumexp(x, axis=-1), rtol=1e-6, err_msg=f"seed {seed}")
  valid = jax.random.uniform(k2, (301,)) > 0.5
  np.testing.assert_allclose(loss_lib.online_logsumexp(x, valid),
                             jax.nn.logsumexp(jnp.where(valid, x, -jnp.inf), axis=-1),
                             rtol=1e-6, err_msg=f"seed {seed}")
  # Nothing valid: -inf, not NaN; a single valid entry: that entry.
  none = loss_lib.online_logsumexp(x, jnp.zeros((301,), bool))
  assert np.all(np.isneginf(np.asarray(none)))
  one = loss_lib.online_logsumexp(x, jnp.arange(301) == 7)
  np.testing.assert_allclose(one, x[..., 7], rtol=1e-6)

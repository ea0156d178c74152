"""The chunked output loss equals the plain one, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    loss_lib.loss_sums(h, w, targets, mask, impl="fused", chunk=8)

"""The residual add + RMSNorm Pallas kernels (through the interpreter) against their reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinystories_jax.kernels import rms_norm as rn
from tinystories_jax.parallel import mesh as mesh_lib

EPS = 1e-5


def _case(shape, dtype, seed):
  k = jax.random.split(jax.random.key(seed), 5)
  d = shape[-1]
  x = (jax.random.normal(k[0], shape) * 3.0).astype(dtype)
  delta = jax.random.normal(k[1], shape).astype(dtype)
  scale = 1.0 + 0.3 * jax.random.normal(k[2], (d,))
  # Cotangents for the sum and the normalised output: a loss reads both.
  w_s, w_y = jax.random.normal(k[3], shape), jax.random.normal(k[4], shape)
  return x, delta, scale, w_s, w_y


def _loss(fn, w_s, w_y, with_delta, return_sum):
  def loss(x, delta, scale):
    out = fn(x, scale, eps=EPS, delta_btd=delta if with_delta else None, return_sum=return_sum)
    s, y = out if return_sum else (None, out)
    total = jnp.sum(y.astype(jnp.float32) * w_y)
    return total if s is None else total + jnp.sum(s.astype(jnp.float32) * w_s)
  return loss


# Widths: a power of two (no padding columns), 48 and 288 (read through 64- and 512-wide tiles);
# row counts: 2*16 (whole tiles, several a program), 3*5 (odd: one row a program), 4*64 at 288
# (tiles of 8 rows, 8 tiles a program, 4 programs).
SHAPES = [(2, 16, 64), (3, 5, 48), (4, 64, 288)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_delta, return_sum", [(False, False), (True, False), (True, True)])
def test_kernels_match_the_reference(shape, dtype, with_delta, return_sum):
  seed = np.random.SeedSequence().entropy % 2**31
  x, delta, scale, w_s, w_y = _case(shape, dtype, seed)
  kernel = lambda *a, **k: rn.rms_norm(*a, interpret=True, **k)  # noqa: E731
  args = (x, delta, scale)
  got = kernel(x, scale, eps=EPS, delta_btd=delta if with_delta else None, return_sum=return_sum)
  # The reference runs op by op (not jitted): under jit XLA may normalise the unrounded float32
  # sum, where both the kernel and the eager reference normalise the stored bf16 one.
  want = rn.rms_norm_reference(x, scale, eps=EPS, delta_btd=delta if with_delta else None,
                               return_sum=return_sum)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=2e-2)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == dtype and g.shape == shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               err_msg=f"seed {seed}", **tol)
  argnums = (0, 1, 2) if with_delta else (0, 2)
  grads = jax.grad(_loss(kernel, w_s, w_y, with_delta, return_sum), argnums)(*args)
  wants = jax.grad(_loss(rn.rms_norm_reference, w_s, w_y, with_delta, return_sum), argnums)(*args)
  for g, w in zip(grads, wants):
    assert g.dtype == w.dtype and g.shape == w.shape
    # The kernel adds the residual gradient in float32 and rounds once; autodiff of the
    # reference rounds the norm's gradient to the activations' dtype first.
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               err_msg=f"seed {seed}",
                               **(dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32
                                  else dict(rtol=2e-2, atol=5e-2)))


def test_the_gradient_is_the_float64_one():
  """Against finite-precision-free numbers: the float64 gradient of the same function."""
  x, delta, scale, w_s, w_y = _case((2, 8, 48), jnp.float32, 3)

  def f64(x, delta, scale):
    s = x + delta
    y = s / jnp.sqrt(jnp.mean(s * s, -1, keepdims=True) + EPS) * scale
    return s, y

  with jax.enable_x64():
    a64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, delta, scale)]
    w64 = [jnp.asarray(np.asarray(w), jnp.float64) for w in (w_s, w_y)]
    want = jax.grad(lambda *a: jnp.sum(f64(*a)[0] * w64[0]) + jnp.sum(f64(*a)[1] * w64[1]),
                    (0, 1, 2))(*a64)
  got = jax.grad(_loss(lambda *a, **k: rn.rms_norm(*a, interpret=True, **k), w_s, w_y, True,
                       True), (0, 1, 2))(x, delta, scale)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_block_shape():
  assert rn.block_shape(32768, 512) == (8, 64)    # llama 42M
  assert rn.block_shape(32768, 288) == (8, 64)    # llama 15M: 512-wide tiles
  assert rn.block_shape(32768, 768) == (4, 32)
  assert rn.block_shape(15, 48) == (1, 1)
  assert rn.block_shape(24, 64) == (8, 8)       # 3 tiles of 8: one a program


def test_supports_names_the_fix():
  ok, why = rn.supports(512, "cpu")
  assert not ok and "model.norm='xla'" in why
  ok, why = rn.supports(16384, "gpu")
  assert not ok and "8192" in why
  assert rn.supports(288, "gpu") == (True, "")
  with pytest.raises(ValueError, match="model.norm='xla'"):
    rn.rms_norm(jnp.ones((2, 4, 8)), jnp.ones(8), eps=EPS, interpret=False)


def test_bad_arguments_name_the_problem():
  x = jnp.ones((2, 4, 8))
  with pytest.raises(ValueError, match="return_sum=True needs delta"):
    rn.rms_norm(x, jnp.ones(8), eps=EPS, return_sum=True, interpret=True)
  with pytest.raises(ValueError, match="must match x"):
    rn.rms_norm(x, jnp.ones(8), eps=EPS, delta_btd=x.astype(jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match="8 wide"):
    rn.rms_norm(x, jnp.ones(7), eps=EPS, interpret=True)


def test_rows_split_over_the_mesh():
  """Under a data x fsdp mesh each device normalises its rows; the scale's gradient is the sum
  over the devices, as without a mesh."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 1), jax.devices()[:4])
  x, delta, scale, w_s, w_y = _case((4, 8, 48), jnp.float32, 1)
  loss = _loss(lambda *a, **k: rn.rms_norm(*a, interpret=True, **k), w_s, w_y, True, True)
  want = jax.grad(loss, (0, 1, 2))(x, delta, scale)
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.grad(loss, (0, 1, 2)))
    assert "shard_map" in str(jax.make_jaxpr(fn)(x, delta, scale))
    got = fn(x, delta, scale)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_kernels_lower_for_gpus(monkeypatch, cuda_lowering):
  """Both kernels lower through Pallas's Triton backend on this CPU (what the interpreter does
  not check), at the llama 15M width (288: masked 512-wide tiles) and 42M's (512)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels' platform check
  for d in (288, 512):
    x = jax.ShapeDtypeStruct((128, 256, d), jnp.bfloat16)
    scale = jax.ShapeDtypeStruct((d,), jnp.float32)

    def grads(x, delta, scale):
      return jax.grad(_loss(rn.rms_norm, 1.0, 1.0, True, True), (0, 1, 2))(x, delta, scale)

    try:
      text = jax.jit(grads).trace(x, x, scale).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # a jaxlib built without the Triton lowering
      pytest.skip(f"cannot lower for cuda here: {e}")
    assert text.count("triton") >= 2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 256, 288), (32, 1024, 512), (3, 5, 48)])
def test_gpu_kernels_compiled(shape):
  x, delta, scale, w_s, w_y = _case(shape, jnp.bfloat16, 5)
  loss = lambda fn: _loss(fn, w_s, w_y, True, True)  # noqa: E731
  kernel = lambda *a, **k: rn.rms_norm(*a, interpret=False, **k)  # noqa: E731
  got = jax.jit(jax.grad(loss(kernel), (0, 1, 2)))(x, delta, scale)
  # Op by op, so the reference normalises the stored bf16 sum as the kernel does (jitted, XLA
  # may normalise the unrounded one).
  want = jax.grad(loss(rn.rms_norm_reference), (0, 1, 2))(x, delta, scale)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=2e-2, atol=5e-2)

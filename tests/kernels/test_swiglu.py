"""The SwiGLU backward Pallas kernel (through the interpreter) against its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinystories_jax.kernels import swiglu as sw
from tinystories_jax.models import layers
from tinystories_jax.parallel import mesh as mesh_lib


def _case(n, f, dtype, seed):
  k = jax.random.split(jax.random.key(seed), 2)
  # Gates out to |x| ~ 10, where the sigmoid saturates.
  gu = (jax.random.normal(k[0], (n, 2, f)) * 3.0).astype(dtype)
  dh = jax.random.normal(k[1], (n, f)).astype(dtype)
  return gu, dh


# d_ff: 1376 (llama 42M: 512-wide column blocks, the last one masked), 768 (15M: three whole
# 256-wide blocks), 512 (one whole block), 172 (64 wide, masked) and 40 (16 wide, masked); rows:
# whole tiles, several tiles, and odd counts (one row a program).
SHAPES = [(16, 1376), (24, 768), (16, 512), (6, 172), (5, 40)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n, f", SHAPES)
def test_kernel_matches_the_reference(n, f, dtype):
  seed = np.random.SeedSequence().entropy % 2**31
  gu, dh = _case(n, f, dtype, seed)
  got = sw.swiglu_grad(gu, dh, interpret=True)
  want = sw.swiglu_grad_reference(gu, dh)
  assert got.dtype == dtype and got.shape == (n, 2, f)
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             err_msg=f"seed {seed}", **tol)


@pytest.mark.parametrize("f, masked", [(1376, True), (172, True), (768, False)])
def test_every_access_of_a_ragged_tile_is_masked(f, masked, monkeypatch):
  """Where d_ff is not a multiple of the column block, every load and store goes through a
  column mask. The interpreter drops writes past the array's edge, so only this sees a missing
  mask; on a GPU one would write into the next slot's and row's columns."""
  calls = []
  load, store = sw.plgpu.load, sw.plgpu.store

  def recorded(fn, kind):
    def call(ref, *args, mask=None, **kw):
      calls.append((kind, None if mask is None else tuple(mask.shape)))
      return fn(ref, *args, mask=mask, **kw)
    return call

  monkeypatch.setattr(sw.plgpu, "load", recorded(load, "load"))
  monkeypatch.setattr(sw.plgpu, "store", recorded(store, "store"))
  gu, dh = _case(16, f, jnp.float32, 2)
  np.testing.assert_allclose(sw.swiglu_grad(gu, dh, interpret=True),
                             sw.swiglu_grad_reference(gu, dh), rtol=1e-5, atol=1e-5)
  _, block_f = sw.block_shape(16, f)
  if masked:
    assert sorted(calls) == [("load", (1, block_f))] * 3 + [("store", (1, block_f))] * 2
  else:
    assert calls == []


def test_the_gradient_is_the_float64_one():
  """Against the float64 vector-Jacobian product of silu(gate) * up, and the jnp form the model
  runs without the kernel."""
  gu, dh = _case(12, 200, jnp.float32, 7)
  with jax.enable_x64():
    g64, dh64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (gu, dh))
    _, vjp = jax.vjp(lambda gu: jax.nn.silu(gu[:, 0]) * gu[:, 1], g64)
    (want,) = vjp(dh64)
  got = sw.swiglu_grad(gu, dh, interpret=True)
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(layers._activation_grad(gu, dh), got, rtol=1e-5, atol=1e-5)


def test_the_model_form_fixes_interpret_at_the_forward_call():
  """`layers.swiglu_paired_kernel` under `force_interpret`: its backward, traced after the
  context has closed, still runs the interpreter, with autodiff's gradients."""
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
  k = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(k[0], (2, 8, 16))
  ws = [jax.random.normal(kk, shape) * 0.3 for kk, shape in
        zip(k[1:4], ((16, 40), (16, 40), (40, 16)))]
  ct = jax.random.normal(k[4], (2, 8, 16))
  with fa.force_interpret():
    _, vjp = jax.vjp(layers.swiglu_paired_kernel, x, *ws)
  got = vjp(ct)
  _, vjp_ref = jax.vjp(lambda x, wg, wu, wd: (jax.nn.silu(x @ wg) * (x @ wu)) @ wd, x, *ws)
  for g, w in zip(got, vjp_ref(ct)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_block_shape():
  assert sw.block_shape(32768, 1376) == (8, 512)   # llama 42M: 3 column blocks, 160 masked
  assert sw.block_shape(32768, 768) == (16, 256)   # 15M: 3 whole blocks (512 would mask 256)
  assert sw.block_shape(32768, 172) == (64, 64)    # 3 blocks, 20 columns masked
  assert sw.block_shape(15, 40) == (1, 16)


def test_supports_names_the_fix():
  ok, why = sw.supports("cpu")
  assert not ok and "model.mlp='xla'" in why
  assert sw.supports("gpu") == (True, "")
  gu, dh = _case(4, 8, jnp.float32, 0)
  with pytest.raises(ValueError, match="model.mlp='xla'"):
    sw.swiglu_grad(gu, dh, interpret=False)


def test_bad_arguments_name_the_problem():
  gu, dh = _case(4, 8, jnp.float32, 0)
  with pytest.raises(ValueError, match=r"gu must be \[N, 2, F\]"):
    sw.swiglu_grad(gu.reshape(4, 16), dh, interpret=True)
  with pytest.raises(ValueError, match=r"must be \[N, F\] = \[4, 8\]"):
    sw.swiglu_grad(gu, dh[:, :7], interpret=True)


def test_rows_split_over_the_mesh():
  """Under a data x fsdp mesh each device takes its rows, with the same result."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 1), jax.devices()[:4])
  gu, dh = _case(16, 40, jnp.float32, 1)
  want = sw.swiglu_grad(gu, dh, interpret=True)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda gu, dh: sw.swiglu_grad(gu, dh, interpret=True))
    assert "shard_map" in str(jax.make_jaxpr(fn)(gu, dh))
    got = fn(gu, dh)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_kernel_lowers_for_gpus(monkeypatch, cuda_lowering):
  """The kernel lowers through Pallas's Triton backend on this CPU (what the interpreter does
  not check), at the llama 15M and 42M widths (masked column blocks)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernel's platform check
  for f in (768, 1376):
    gu = jax.ShapeDtypeStruct((32768, 2, f), jnp.bfloat16)
    dh = jax.ShapeDtypeStruct((32768, f), jnp.bfloat16)
    try:
      text = jax.jit(sw.swiglu_grad).trace(gu, dh).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:  # a jaxlib built without the Triton lowering
      pytest.skip(f"cannot lower for cuda here: {e}")
    assert "triton" in text


@pytest.mark.gpu
@pytest.mark.parametrize("n, f", [(32768, 1376), (32768, 768), (5, 40)])
def test_gpu_kernel_compiled(n, f):
  gu, dh = _case(n, f, jnp.bfloat16, 5)
  got = jax.jit(lambda gu, dh: sw.swiglu_grad(gu, dh, interpret=False))(gu, dh)
  want = sw.swiglu_grad_reference(gu, dh)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=1e-2, atol=1e-2)

"""The Pallas loss kernels (through the interpreter) against their jnp references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinystories_jax.kernels import cross_entropy as ce
from tinystories_jax.kernels import flash_attention as fa
from tinystories_jax.parallel import mesh as mesh_lib


def _case(b, n, vp, vocab, dtype, scale, seed):
  k = jax.random.split(jax.random.key(seed), 5)
  x = (jax.random.normal(k[0], (b, n, vp)) * scale).astype(dtype)
  targets = jax.random.randint(k[1], (b, n), 0, vocab)
  soft = jax.random.uniform(k[2], (b, n))
  tgt_w = jax.random.uniform(k[3], (b, n))
  return x, targets, soft, tgt_w


# (B, N, padded vocab, vocab): unpadded; padded inside the last column block; column blocks past
# the vocabulary entirely (the last of 640 / 128 = 5, the second of 1024 / 512 = 2); row counts
# whose tiles are 16, 2 and 1 rows; several column blocks.
SHAPES = [(2, 16, 256, 256), (3, 10, 640, 577), (2, 8, 640, 500), (1, 7, 1024, 400),
          (2, 8, 1536, 1500)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_references(shape, dtype):
  seed = np.random.SeedSequence().entropy % 2**31
  b, n, vp, vocab = shape
  # Wide logits: exp() of them overflows float32 without the running maximum.
  x, targets, soft, tgt_w = _case(b, n, vp, vocab, dtype, 40.0, seed)
  lse = ce.logsumexp(x, vocab, interpret=True)
  want = ce.logsumexp_reference(x, vocab)
  assert lse.dtype == jnp.float32 and lse.shape == (b, n)
  np.testing.assert_allclose(lse, want, rtol=1e-6, atol=1e-5, err_msg=f"seed {seed}")
  g = ce.logit_grad(x, want, soft, tgt_w, targets, vocab, interpret=True)
  g_want = ce.logit_grad_reference(x, want, soft, tgt_w, targets, vocab)
  assert g.dtype == x.dtype and g.shape == x.shape
  got, g_want = np.asarray(g, np.float64), np.asarray(g_want, np.float64)
  if dtype == jnp.float32:
    # Base-2 exponentials: log2(e)·x and log2(e)·lse each round to float32 first, and |x| reaches
    # ~200 here, so the exponent is off by up to ~3e-5 and p = softmax by a relative ~2e-5. The
    # error scales with p·w, not with the gradient: at the target, p·w − w_t can cancel to
    # almost nothing while p·w's rounding stays.
    p_w = np.where(np.arange(vp) < vocab,
                   np.exp(np.asarray(x, np.float64) - np.asarray(want, np.float64)[..., None]),
                   0.0) * np.asarray(soft, np.float64)[..., None]
    bad = np.abs(got - g_want) > 5e-5 * p_w + 1e-7
    assert not bad.any(), (f"seed {seed}: {bad.sum()} elements off, e.g. got "
                           f"{got[bad][:3]} want {g_want[bad][:3]}")
  else:
    np.testing.assert_allclose(got, g_want, rtol=1e-2, atol=1e-2, err_msg=f"seed {seed}")
  assert not np.any(np.asarray(g[..., vocab:], np.float32))  # padding columns: no gradient


# Several sweep blocks with the last partly past the padded vocabulary (9024 in 8192-wide
# blocks), a vocabulary of whole blocks padded into one more (8256 = 8192 + 64), and SHAPES'
# cases: one block wider than the row (1536 in 2048), padding columns.
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(1, 3, 9024, 8999), (1, 2, 8256, 8192)])
def test_softmax_minus_onehot_matches_its_reference(shape, dtype):
  seed = np.random.SeedSequence().entropy % 2**31
  b, n, vp, vocab = shape
  x, targets, _, _ = _case(b, n, vp, vocab, dtype, 40.0, seed)
  s, lse, tl = ce.softmax_minus_onehot(x, targets, vocab, interpret=True)
  s_want, lse_want, tl_want = ce.softmax_minus_onehot_reference(x, targets, vocab)
  assert s.dtype == x.dtype and s.shape == x.shape and lse.shape == tl.shape == (b, n)
  np.testing.assert_allclose(lse, lse_want, rtol=1e-6, atol=1e-5, err_msg=f"seed {seed}")
  np.testing.assert_array_equal(tl, tl_want)
  # In float32 each base-2 exponent (log2(e)·x, up to ~290 here) rounds by up to half an ulp
  # (1.5e-5 above 256), and p moves by ln 2 times its exponent's error. The interpreter (XLA
  # on a CPU) may round log2(e)·x - shift in two steps (compiled, it is one fused multiply-add),
  # so an entry whose p is near 1 can be off by ln 2 · (two half-ulps), ~2.1e-5 absolute. Seen
  # over 150 draws: 1.06e-5 beyond rtol (an entry with p ≈ 1 - 1e-5 where the reference has 1).
  atol = 2.5e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(s, np.float32), np.asarray(s_want, np.float32),
                             rtol=1e-3, atol=atol, err_msg=f"seed {seed}")
  assert not np.any(np.asarray(s[..., vocab:], np.float32))  # padding columns: no gradient
  # Each row: the softmax sums to 1, so softmax - onehot sums to 0, and the target's entry is
  # p - 1 with p = exp(target logit - lse), both within the same bound: the two sweeps may
  # round differently, so a row's sum can be off by ~2.1e-5 too. Seen over those draws: up to
  # 2.1e-5 (sum) and 4e-6 (target entry).
  np.testing.assert_allclose(np.asarray(s, np.float32).sum(-1), 0.0, atol=2e-2 if
                             dtype == jnp.bfloat16 else 5e-5)
  at_target = np.take_along_axis(np.asarray(s, np.float32), np.asarray(targets)[..., None],
                                 axis=-1)[..., 0]
  p = np.exp(np.asarray(tl, np.float64) - np.asarray(lse, np.float64))
  np.testing.assert_allclose(at_target, p - 1.0, atol=1e-2 if dtype == jnp.bfloat16 else 2.5e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype", [((2, 512, 32000, 32000), jnp.bfloat16),
                                          ((1, 256, 50304, 50257), jnp.bfloat16),
                                          ((3, 10, 640, 577), jnp.float32)])
def test_gpu_kernels_compiled(shape, dtype):
  b, n, vp, vocab = shape
  x, targets, soft, tgt_w = _case(b, n, vp, vocab, dtype, 8.0, 5)
  want = ce.logsumexp_reference(x, vocab)
  np.testing.assert_allclose(ce.logsumexp(x, vocab, interpret=False), want, rtol=1e-5, atol=1e-5)
  g = ce.logit_grad(x, want, soft, tgt_w, targets, vocab, interpret=False)
  g_want = ce.logit_grad_reference(x, want, soft, tgt_w, targets, vocab)
  atol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_want, np.float32),
                             rtol=1e-2, atol=atol)
  s, lse, tl = ce.softmax_minus_onehot(x, targets, vocab, interpret=False)
  s_want, _, tl_want = ce.softmax_minus_onehot_reference(x, targets, vocab)
  np.testing.assert_allclose(lse, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(tl, tl_want)
  np.testing.assert_allclose(np.asarray(s, np.float32), np.asarray(s_want, np.float32),
                             rtol=1e-2, atol=atol)


def test_logsumexp_is_the_softmax_normaliser():
  """Against numpy in float64, on moderate logits, unpadded and padded."""
  x, *_ = _case(2, 16, 640, 640, jnp.float32, 3.0, 0)
  for vocab in (640, 600):
    got = np.asarray(ce.logsumexp(x, vocab, interpret=True))
    xs = np.asarray(x, np.float64)[..., :vocab]
    want = np.log(np.exp(xs).sum(-1))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_logsumexp_of_huge_negative_logits():
  """No constant start for the running maximum: rows far below any such constant still work."""
  x = jnp.full((1, 4, 256), -1e31, jnp.float32).at[0, 1, 3].set(-2e31)
  np.testing.assert_allclose(ce.logsumexp(x, 200, interpret=True),
                             ce.logsumexp_reference(x, 200), rtol=1e-6)


def test_block_shape():
  assert ce.block_shape(32768, 32000) == (16, 256)
  assert ce.block_shape(32768, 50304) == (16, 128)
  assert ce.block_shape(30, 4096) == (2, 512)
  assert ce.block_shape(7, 64) == (1, 64)


def test_supports_names_the_fix():
  ok, why = ce.supports(50257, "gpu")
  assert not ok and "loss_vocab_multiple" in why
  ok, why = ce.supports(50304, "cpu")
  assert not ok and "loss_kernel='xla'" in why
  assert ce.supports(32000, "gpu") == (True, "")


def test_rows_split_over_the_mesh():
  """Under a data x fsdp mesh the kernels run per device on its rows, with the same results."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 1), jax.devices()[:4])
  x, targets, soft, tgt_w = _case(4, 8, 256, 250, jnp.float32, 5.0, 1)
  want = ce.logsumexp_reference(x, 250)
  with jax.set_mesh(mesh):
    lse_fn = jax.jit(lambda x: ce.logsumexp(x, 250, interpret=True))
    assert "shard_map" in str(jax.make_jaxpr(lse_fn)(x))
    lse = lse_fn(x)
    g = jax.jit(lambda *a: ce.logit_grad(*a, 250, interpret=True))(x, want, soft, tgt_w,
                                                                     targets)
    sweeps = jax.jit(lambda x, t: ce.softmax_minus_onehot(x, t, 250, interpret=True))
    assert "shard_map" in str(jax.make_jaxpr(sweeps)(x, targets))
    s, lse_s, _ = sweeps(x, targets)
  s_want, _, _ = ce.softmax_minus_onehot_reference(x, targets, 250)
  np.testing.assert_allclose(s, s_want, atol=5e-6)  # base-2 exponentials round differently
  np.testing.assert_allclose(lse_s, want, rtol=1e-6)
  np.testing.assert_allclose(lse, want, rtol=1e-6)
  np.testing.assert_allclose(g, ce.logit_grad_reference(x, want, soft, tgt_w, targets, 250),
                             atol=1e-6)


def test_kernels_lower_for_gpus(monkeypatch, cuda_lowering):
  """All three kernels lower through Pallas's Triton backend on this CPU (what the interpreter
  does not check), at the shapes of the llama 15M step at vocab 32000."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the kernels' platform check
  x = jax.ShapeDtypeStruct((128, 256, 32000), jnp.bfloat16)
  row = jax.ShapeDtypeStruct((128, 256), jnp.float32)
  tgt = jax.ShapeDtypeStruct((128, 256), jnp.int32)

  def all_three(x, lse, soft, tgt_w, tgt):
    return (ce.logsumexp(x, 32000), ce.logit_grad(x, lse, soft, tgt_w, tgt, 32000),
            ce.softmax_minus_onehot(x, tgt, 32000))

  def lowered(fn):  # a new function each time: jit's trace cache would keep the first kernels
    return jax.jit(lambda *a: fn(*a)).trace(x, row, row, row, tgt).lower(
        lowering_platforms=("cuda",)).as_text()

  try:
    text = lowered(all_three)
  except ImportError as e:  # a jaxlib built without the Triton lowering
    pytest.skip(f"cannot lower for cuda here: {e}")
  assert text.count("triton") >= 3
  # Each kernel takes its exponentials as the attention kernels do: fused multiply-add and
  # flush-to-zero ex2 in inline PTX, and jnp's exp2 with fast_exp2 off.
  kernels = {"lse": lambda x, lse, soft, tgt_w, tgt: ce.logsumexp(x, 32000),
             "grad": lambda x, lse, soft, tgt_w, tgt: ce.logit_grad(x, lse, soft, tgt_w, tgt,
                                                                    32000),
             "sweeps": lambda x, lse, soft, tgt_w, tgt: ce.softmax_minus_onehot(x, tgt, 32000)}
  for name, fn in kernels.items():
    one = lowered(fn)
    assert "ex2.approx.ftz.f32" in one and "fma.rn.f32" in one, name
    with fa.override_default_blocks(fast_exp2=False):
      one = lowered(fn)
    assert "ex2.approx.ftz.f32" not in one and "fma.rn.f32" not in one, name

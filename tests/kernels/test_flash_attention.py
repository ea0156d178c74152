"""Pallas flash attention against the float32 reference: forward and the three gradients.

On a CPU the kernels run through the Pallas interpreter (`interpret=True`), once per kernel family
(the Triton-backend kernels and the Mosaic TPU kernels). The `gpu`-marked cases run the same
checks compiled, on the GPU, where there is one. Inputs are fresh random draws on every run; the
seed is part of every failure message.
"""

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinystories_jax.kernels import cross_entropy as ce
from tinystories_jax.kernels import flash_attention as fa

SMALL_BLOCKS = fa.BlockSizes(*(32,) * 6)
# Every kernel with its own tile shape: exercises the padding to the largest of them (and, on a
# GPU, compiler settings other than the defaults).
MIXED_BLOCKS = fa.BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=32,
                             block_k_dkv=16, num_warps=2, num_stages=1)
# The head dim read as power-of-two column tiles (GPU kernels: 48 as 32 + 16, 40 as 32 + 16 with
# 8 columns masked, 112 as 64 + 32 + 16).
SPLIT_BLOCKS = fa.BlockSizes(*(32,) * 6, split_head_dim=True)
MIXED_SPLIT_BLOCKS = fa.BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                                   block_q_dkv=32, block_k_dkv=16, split_head_dim=True)


def _inputs(seed, b, t, s, h, k, d, dtype, segments):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  kk = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, k, d)), dtype)
  do = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  seg = {}
  if segments:
    assert t == s
    # Packed rows: a few stories of random lengths, then padding (id 0) at the end.
    ids = np.zeros((b, t), np.int32)
    for row in range(b):
      cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
      ids[row, :cuts[0]] = 1
      ids[row, cuts[0]:cuts[1]] = 2
      ids[row, cuts[1]:cuts[2]] = 3
    seg = dict(q_segment_ids_bt=jnp.asarray(ids), kv_segment_ids_bs=jnp.asarray(ids))
  return q, kk, v, do, seg


def _run(fn, q, k, v, do, kwargs):
  o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kwargs), q, k, v)
  return (o,) + vjp(do)


def _rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-6))


def _check(backend, interpret, *, b, t, s, h, k, d, dtype=jnp.float32, causal=True, window=None,
           segments=False, scale=None, block_sizes=SMALL_BLOCKS):
  seed = secrets.randbits(32)
  q, kk, v, do, seg = _inputs(seed, b, t, s, h, k, d, dtype, segments)
  kwargs = dict(causal=causal, window=window, scale=scale, **seg)
  got = _run(lambda *a, **kw: fa.flash_attention(*a, interpret=interpret, backend=backend,
                                                 block_sizes=block_sizes, **kw),
             q, kk, v, do, kwargs)
  # The oracle sees the same (rounded) inputs, in float32.
  f32 = [x.astype(jnp.float32) for x in (q, kk, v, do)]
  want = _run(fa.flash_attention_reference, *f32, kwargs)
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
    assert g.dtype == dtype, (name, g.dtype)
    assert g.shape == w.shape, (name, g.shape, w.shape)
    assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name} has NaN/inf (seed {seed})"
    err = _rel_err(g, w)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol} (seed {seed})"
  if segments:
    padding = np.asarray(seg["q_segment_ids_bt"]) == 0
    assert not np.asarray(got[0], np.float32)[padding].any(), f"padding rows not zero ({seed})"
  return got


# (name, shape and mask options): small, but covering padding, windows, segments, GQA and MQA.
CASES = {
    "causal": dict(b=1, t=64, s=64, h=2, k=2, d=16),
    "pad_window_segments_gqa_d48": dict(b=2, t=100, s=100, h=4, k=2, d=48, window=40,
                                        segments=True),
    "noncausal_pad_mqa": dict(b=1, t=70, s=70, h=3, k=1, d=32, causal=False, scale=1.0),
    "bf16_window": dict(b=1, t=96, s=96, h=2, k=2, d=64, dtype=jnp.bfloat16, window=33),
    "cross_lengths_d128_mixed_blocks": dict(b=1, t=40, s=72, h=2, k=1, d=128, window=20,
                                            block_sizes=MIXED_BLOCKS),
    "more_queries_than_keys": dict(b=1, t=72, s=40, h=2, k=2, d=16),
    "split_d48_pad_window_segments_gqa": dict(b=2, t=100, s=100, h=4, k=2, d=48, window=40,
                                              segments=True, block_sizes=SPLIT_BLOCKS),
    "split_d40_bf16_noncausal_mqa": dict(b=1, t=70, s=70, h=3, k=1, d=40, dtype=jnp.bfloat16,
                                         causal=False, block_sizes=SPLIT_BLOCKS),
    "split_d112_cross_lengths_mixed_blocks": dict(b=1, t=40, s=72, h=2, k=1, d=112, window=20,
                                                  block_sizes=MIXED_SPLIT_BLOCKS),
    "split_d64_is_one_tile": dict(b=1, t=64, s=64, h=2, k=2, d=64, block_sizes=SPLIT_BLOCKS),
    # The forward takes its row maximum over unscaled scores (masked with MASK_VALUE, whose
    # product with c = scale·log2 e overflows to -inf where c > 1) and drops its second mask
    # (on the exponentials) where every row sees key 0: a scale far above 1 with fully masked
    # (padding) rows; causal queries that are the last T of S; and more queries than keys with
    # the rows that see none inside a query block that also has rows that do.
    "large_scale_segments": dict(b=2, t=100, s=100, h=2, k=1, d=32, segments=True, scale=4.0),
    "cross_lengths_causal_pad": dict(b=1, t=40, s=70, h=2, k=2, d=16, scale=2.0),
    "more_queries_than_keys_unaligned": dict(b=1, t=72, s=50, h=2, k=2, d=16),
}
TPU_CASES = ("causal", "pad_window_segments_gqa_d48", "noncausal_pad_mqa")


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_kernels_interpreted(case):
  _check("gpu", True, **CASES[case])


@pytest.mark.parametrize("case", TPU_CASES)
def test_tpu_kernels_interpreted(case):
  _check("tpu", True, **CASES[case])


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_kernels_compiled(case):
  _check(None, False, **{"block_sizes": None, **CASES[case]})


@pytest.mark.gpu
def test_gpu_compiled_default_blocks_long_window():
  _check(None, False, b=2, t=1000, s=1000, h=4, k=2, d=64, dtype=jnp.bfloat16, window=256,
         block_sizes=None)


def test_rows_with_no_visible_key_are_zero_without_nan():
  seed = secrets.randbits(32)
  q, k, v, do, _ = _inputs(seed, 1, 48, 48, 2, 2, 16, jnp.float32, False)
  q_seg = jnp.asarray(np.r_[np.full(20, 5), np.full(28, 7)][None], jnp.int32)
  kv_seg = jnp.asarray(np.r_[np.full(20, 5), np.full(28, 9)][None], jnp.int32)  # no 7 among keys
  for backend in ("gpu", "tpu"):
    o, dq, dk, dv = _run(
        lambda *a, **kw: fa.flash_attention(*a, interpret=True, backend=backend,
                                            block_sizes=SMALL_BLOCKS, **kw),
        q, k, v, do, dict(q_segment_ids_bt=q_seg, kv_segment_ids_bs=kv_seg, causal=False))
    for x in (o, dq, dk, dv):
      assert np.isfinite(np.asarray(x)).all(), (backend, seed)
    assert not np.asarray(o)[0, 20:].any() and not np.asarray(dq)[0, 20:].any(), (backend, seed)
    assert not np.asarray(dk)[0, 20:].any(), (backend, seed)  # keys nobody sees get no gradient
    assert np.abs(np.asarray(o)[0, :20]).sum() > 0, (backend, seed)


def test_force_interpret_switch_runs_without_the_keyword():
  seed = secrets.randbits(32)
  q, k, v, _, _ = _inputs(seed, 1, 32, 32, 2, 2, 16, jnp.float32, False)
  with fa.force_interpret():
    got = fa.flash_attention(q, k, v, block_sizes=SMALL_BLOCKS)
  np.testing.assert_allclose(got, fa.flash_attention_reference(q, k, v), atol=2e-5,
                             err_msg=f"seed {seed}")


def test_supports_names_xla_for_what_the_kernels_do_not_take():
  assert fa.supports(48, jnp.bfloat16, "gpu") == (True, "")
  assert fa.supports(64, jnp.float32, "tpu") == (True, "")
  for args in ((8, jnp.bfloat16, "gpu"), (4, jnp.float32, "tpu"), (256, jnp.bfloat16, "gpu"),
               (64, jnp.int8, "gpu"), (64, jnp.bfloat16, "cpu")):
    ok, reason = fa.supports(*args)
    assert not ok and "xla" in reason, args


def test_clear_errors():
  q = jnp.zeros((1, 32, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match="xla"):
    fa.flash_attention(q, q, q, interpret=True)  # head_dim 8
  q = jnp.zeros((1, 32, 2, 16), jnp.float32)
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="xla"):
      fa.flash_attention(q, q, q)  # compiled kernels need a GPU or TPU
  with pytest.raises(ValueError, match="causal"):
    fa.flash_attention(q, q, q, causal=False, window=8, interpret=True)
  with pytest.raises(ValueError, match="divide"):
    fa.flash_attention(q, jnp.zeros((1, 32, 3, 16)), jnp.zeros((1, 32, 3, 16)), interpret=True)


def test_column_parts_split_the_head_dim_into_powers_of_two():
  gpu = fa._kernels("gpu")  # noqa: SLF001

  def parts(head_dim, block_d, split):  # (offset, width, real columns where masked)
    return [(o, w, None if m is None else int(np.asarray(m).sum()))
            for o, w, m in gpu._column_parts(head_dim, block_d, split)]  # noqa: SLF001
  assert parts(48, 64, False) == [(None, 64, 48)]
  assert parts(48, 64, True) == [(0, 32, None), (32, 16, None)]
  assert parts(40, 64, True) == [(0, 32, None), (32, 16, 8)]
  assert parts(112, 128, True) == [(0, 64, None), (64, 32, None), (96, 16, None)]
  assert parts(64, 64, True) == [(0, 64, None)]


def test_split_blocks_reach_every_kernel(monkeypatch):
  """With split_head_dim the forward, dQ and dK/dV kernels all read split column tiles."""
  gpu = fa._kernels("gpu")  # noqa: SLF001
  seen = []
  column_parts = gpu._column_parts  # noqa: SLF001
  monkeypatch.setattr(gpu, "_column_parts",
                      lambda *a: seen.append(a[2]) or column_parts(*a))
  q = jnp.ones((1, 32, 2, 48), jnp.float32)
  _run(lambda *a, **kw: fa.flash_attention(*a, interpret=True, backend="gpu",
                                           block_sizes=SPLIT_BLOCKS, **kw), q, q, q, q, {})
  assert len(seen) >= 5 and all(seen), seen  # forward 1, dQ 2, dK/dV 2


def test_override_default_blocks_changes_what_calls_without_blocks_get(monkeypatch):
  """Inside the context, the default block sizes (and so a model's attention calls) get the
  changes; outside they are the defaults again; a wrong field or value is refused at once."""
  assert not fa.default_block_sizes("gpu", 48).split_head_dim
  with fa.override_default_blocks(split_head_dim=True):
    assert fa.default_block_sizes("gpu", 48).split_head_dim
    assert fa.default_block_sizes("gpu", 128).block_q == 64  # the rest as without the context
    with fa.override_default_blocks(num_stages=3):
      assert fa.default_block_sizes("gpu", 48) == fa.BlockSizes(
          128, 64, 64, 64, 64, 64, num_stages=3, split_head_dim=True)
    gpu = fa._kernels("gpu")  # noqa: SLF001
    seen = []
    forward = gpu.forward
    monkeypatch.setattr(gpu, "forward", lambda *a, **k: seen.append(k["block_sizes"]) or
                        forward(*a, **k))
    q = jnp.zeros((1, 32, 2, 48), jnp.float32)
    fa.flash_attention(q, q, q, interpret=True, backend="gpu")
    assert seen and seen[0].split_head_dim
  assert fa.default_block_sizes("gpu", 48) == fa.BlockSizes()
  with pytest.raises(ValueError, match="BlockSizes has no field split"):
    with fa.override_default_blocks(split=True):
      pass
  with pytest.raises(ValueError, match="split_head_dim must be True or False"):
    with fa.override_default_blocks(split_head_dim="yes"):
      pass
  assert fa.default_block_sizes("gpu", 48) == fa.BlockSizes()


@pytest.mark.parametrize("stacked", [False, True])
def test_fast_exp2_puts_the_fused_exponent_in_every_kernel(stacked, monkeypatch,
                                                           cuda_lowering):
  """Lowered for CUDA, the forward, dQ and dK/dV kernels take each softmax exponential as the
  inline PTX fma + ex2.approx.ftz with fast_exp2 (the default), and jnp's exp2 without it."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the stacked wrapper checks it
  counts = {}
  for fast in (True, False):
    blocks = fa.BlockSizes(*(32,) * 6, fast_exp2=fast)
    if stacked:
      y = jax.ShapeDtypeStruct((1, 64, 4, 32), jnp.bfloat16)  # 1 kv head: k, v, then 2 queries
      tables = jax.ShapeDtypeStruct((1, 64, 16), jnp.float32)
      fn = lambda y, c, s: fa.flash_attention_stacked(  # noqa: E731
          y, c, s, kv_heads=1, interpret=False, block_sizes=blocks)
      args = (y, tables, tables)
    else:
      q = jax.ShapeDtypeStruct((1, 64, 2, 32), jnp.bfloat16)
      fn = lambda q, k, v: fa.flash_attention(  # noqa: E731
          q, k, v, backend="gpu", interpret=False, block_sizes=blocks)
      args = (q, q, q)

    def fwd_bwd(*a, fn=fn):  # every gradient: jax may drop a kernel whose outputs go unused
      o, vjp = jax.vjp(fn, *a)
      return vjp(o)

    try:
      text = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:
      pytest.skip(f"cannot lower for cuda here: {e}")
    counts[fast] = (text.count("ex2.approx.ftz.f32"), text.count("fma.rn.f32"))
  # The forward's alpha and scores, dQ's and dK/dV's scores: at least four exponentials.
  assert counts[True][0] >= 4 and counts[True][1] >= 3, counts
  assert counts[False] == (0, 0), counts


def test_no_inline_ptx_on_amd_gpus(monkeypatch, cuda_lowering):
  """ROCm's Triton takes no PTX: there the kernels keep jnp's exponentials."""
  gpu = fa._kernels("gpu")  # noqa: SLF001
  assert gpu.ptx_available()  # this CPU counts as compiling for NVIDIA's GPUs

  class Rocm:
    platform = "gpu"
    client = type("Client", (), {"platform_version": "rocm 60302"})()

  gpu.ptx_available.cache_clear()
  try:
    with monkeypatch.context() as m:  # only while asked: lowering asks jax for devices too
      m.setattr(jax, "local_devices", lambda *a, **k: [Rocm()])
      assert not gpu.ptx_available()  # and so it stays until the cache is cleared
    q = jax.ShapeDtypeStruct((1, 64, 2, 32), jnp.bfloat16)

    def fwd_bwd(q, k, v):  # the forward, dQ and dK/dV kernels
      o, vjp = jax.vjp(lambda *a: fa.flash_attention(*a, backend="gpu", interpret=False),
                       q, k, v)
      return vjp(o)

    text = jax.jit(fwd_bwd).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3 and "ex2.approx.ftz" not in text
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the loss kernels check it
    x = jax.ShapeDtypeStruct((1, 64, 256), jnp.bfloat16)
    text = jax.jit(lambda x: ce.logsumexp(x, 256)).trace(x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "triton" in text and "ex2.approx.ftz" not in text
  finally:
    gpu.ptx_available.cache_clear()


def test_gpu_kernels_refuse_a_scale_that_is_not_positive(monkeypatch):
  q = jnp.zeros((1, 32, 2, 16), jnp.float32)
  for scale in (0.0, -0.5, 1e-31):
    with pytest.raises(ValueError, match="positive scale of at least 1e-30.*attention='xla'"):
      fa.flash_attention(q, q, q, scale=scale, interpret=True, backend="gpu")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the stacked wrapper checks it
  y, table = jnp.zeros((1, 32, 3, 16), jnp.float32), jnp.zeros((1, 32, 8), jnp.float32)
  with pytest.raises(ValueError, match="positive scale"):
    fa.flash_attention_stacked(y, table, table, kv_heads=1, scale=0.0, interpret=True)
  got = fa.flash_attention(q, q, q, scale=1e-30, interpret=True, backend="gpu")
  assert np.isfinite(np.asarray(got)).all()
  # The TPU kernels scale before the maximum and take any scale.
  got = fa.flash_attention(q, q, q, scale=-0.5, interpret=True, backend="tpu")
  assert np.isfinite(np.asarray(got)).all()
  with pytest.raises(ValueError, match="fast_exp2 must be True or False"):
    fa.BlockSizes(fast_exp2=1)


def test_reference_matches_a_dense_softmax():
  seed = secrets.randbits(32)
  q, k, v, _, _ = _inputs(seed, 2, 24, 24, 4, 2, 16, jnp.float32, False)
  got = fa.flash_attention_reference(q, k, v, window=5, scale=0.3)
  k_h = jnp.repeat(k, 2, axis=2)
  v_h = jnp.repeat(v, 2, axis=2)
  logits = jnp.einsum("bthd,bshd->bhts", q, k_h) * 0.3
  i, j = np.arange(24)[:, None], np.arange(24)[None]
  logits = jnp.where((j <= i) & (j > i - 5), logits, -jnp.inf)
  want = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v_h)
  np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"seed {seed}")


def test_through_models_attention_matches_its_reference():
  attention = pytest.importorskip("tinystories_jax.models.attention")
  seed = secrets.randbits(32)
  q, k, v, do, seg = _inputs(seed, 2, 80, 80, 4, 2, 16, jnp.float32, True)
  for kwargs in (dict(window=24, **seg), dict(causal=True, scale=1.0)):
    def run(impl):
      with fa.force_interpret():
        return _run(lambda *a, **kw: attention.attention(*a, impl=impl, **kw), q, k, v, do, kwargs)
    for name, g, w in zip(("o", "dq", "dk", "dv"), run("pallas"), run("reference")):
      assert _rel_err(g, w) < 2e-5, (name, kwargs.keys(), seed)
  # Queries that are the last T of S positions (a prefix already in the cache).
  k_long, v_long = jnp.concatenate([k, k], axis=1), jnp.concatenate([v, v], axis=1)
  with fa.force_interpret():
    got = attention.attention(q, k_long, v_long, impl="pallas", window=50)
  want = attention.attention(q, k_long, v_long, impl="reference", window=50)
  assert _rel_err(got, want) < 2e-5, seed


@pytest.mark.parametrize("platform,backend,marker,split", [
    ("cuda", "gpu", "triton", False), ("cuda", "gpu", "triton", True),
    ("tpu", "tpu", "tpu_custom_call", False)])
def test_kernels_lower_for_their_platform(platform, backend, marker, split, request):
  """Pallas lowers both kernel families on a CPU: catches constructs a backend rejects."""
  if platform == "cuda":
    request.getfixturevalue("cuda_lowering")
  q = jax.ShapeDtypeStruct((2, 200, 4, 48), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 200, 2, 48), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 200), jnp.int32)
  blocks = fa.BlockSizes(split_head_dim=True) if split else None  # None: the platform's own

  def fwd_bwd(q, k, v, seg):
    fn = lambda q, k, v: fa.flash_attention(q, k, v, window=64, q_segment_ids_bt=seg,  # noqa: E731
                                            kv_segment_ids_bs=seg, backend=backend,
                                            interpret=False, block_sizes=blocks)
    o, vjp = jax.vjp(fn, q, k, v)
    return vjp(o)

  try:
    text = jax.jit(fwd_bwd).trace(q, kv, kv, seg).lower(
        lowering_platforms=(platform,)).as_text()
  except ImportError as e:  # a jaxlib built without that backend's lowering support
    pytest.skip(f"cannot lower for {platform} here: {e}")
  assert text.count(marker) >= 3, "expected the forward, dQ and dK/dV kernels"


def test_sharded_over_batch_and_heads_under_a_mesh():
  """Under jax.set_mesh the kernel runs per (batch, head) shard and still matches the reference."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake CPU) devices")
  auto = (jax.sharding.AxisType.Auto,) * 3
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
  seed = secrets.randbits(32)
  q, k, v, do, seg = _inputs(seed, 4, 32, 32, 4, 2, 16, jnp.float32, True)
  kwargs = dict(window=16, **seg)
  want = _run(fa.flash_attention_reference, q, k, v, do, kwargs)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: _run(
        lambda *x, **kw: fa.flash_attention(*x, interpret=True, block_sizes=SMALL_BLOCKS, **kw),
        *a, kwargs))(q, k, v, do)
  for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
    assert _rel_err(g, w) < 2e-5, (name, seed)


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(num_heads=4, num_kv_heads=2, num_layers=1)),  # grouped-query heads, rotary
    ("gpt_neo", dict(num_heads=4, num_layers=2, window=12,  # a local layer, no score scaling
                     attention_layers=("global", "local"))),
])
def test_tiny_models_agree_with_pallas_attention(family, overrides):
  """A whole model's logits and parameter gradients: `attention_impl` pallas vs reference."""
  models = pytest.importorskip("tinystories_jax.models")
  nnx = pytest.importorskip("flax.nnx")
  name = "260k" if family == "llama" else "1m"
  seed = secrets.randbits(32)
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 128, (2, 40)), jnp.int32)

  def loss_and_grads(impl):
    cfg = models.presets.get(family, name, vocab_size=128, attention_impl=impl, **overrides)
    graphdef, params = nnx.split(models.build(cfg, nnx.Rngs(0)), nnx.Param)

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits

    with fa.force_interpret():
      (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, jax.tree.leaves(grads)

  logits, grads = loss_and_grads("pallas")
  want_logits, want_grads = loss_and_grads("reference")
  assert _rel_err(logits, want_logits) < 1e-4, seed
  for g, w in zip(grads, want_grads):
    assert _rel_err(g, w) < 1e-3, seed

"""Both model families: presets, parameter counts, logical axes, packing, dtypes, remat."""

import dataclasses
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tinystories_jax import models
from tinystories_jax.models import presets
from tinystories_jax.models.config import ModelConfig

AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "positions", "norm"}


def tiny(family, **kw):
  base = dict(family=family, vocab_size=61, d_model=32, num_layers=2, num_heads=4,
              max_positions=64, window=4, attention_impl="xla")
  if family == "llama":
    base.update(num_kv_heads=2, multiple_of=8)
  base.update(kw)
  return ModelConfig(**base)


def _params(model):
  return nnx.state(model, nnx.Param)


@pytest.mark.parametrize("family,name", [("gpt_neo", n) for n in presets.names("gpt_neo")]
                         + [("llama", n) for n in presets.names("llama")])
def test_every_preset_builds_with_the_counted_parameters(family, name):
  cfg = presets.get(family, name, vocab_size=50257 if family == "gpt_neo" else 32000)
  model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(_params(model)))
  assert n == models.count_params(cfg)


def test_paper_sizes():
  assert models.count_params(presets.gpt_neo("33m", vocab_size=50257)) == 68_514_048  # 68.5 M
  assert models.count_params(presets.llama("260k")) == 260_032  # llama2.c's stories260K
  assert models.count_params(presets.llama("15m", vocab_size=32000)) == 15_191_712


@pytest.mark.parametrize("family,name", [("gpt_neo", n) for n in presets.names("gpt_neo")]
                         + [("llama", n) for n in presets.names("llama")])
def test_parameter_counts_match_transformers(family, name):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tinystories_jax.interop import hf  # noqa: PLC0415

  cfg = presets.get(family, name, vocab_size=50257 if family == "gpt_neo" else 32000)
  hf_cfg = hf.hf_config_from_model(cfg, bos_id=None, eos_id=None)
  cls = (transformers.GPTNeoForCausalLM if family == "gpt_neo"
         else transformers.LlamaForCausalLM)
  config_cls = (transformers.GPTNeoConfig if family == "gpt_neo" else transformers.LlamaConfig)
  with torch.device("meta"):
    model = cls(config_cls(**hf_cfg))
  assert sum(p.numel() for p in model.parameters()) == models.count_params(cfg)


def test_preset_errors():
  with pytest.raises(ValueError, match="33m"):
    presets.gpt_neo("34m", vocab_size=100)
  with pytest.raises(ValueError, match="vocab_size"):
    presets.llama("15m")
  assert presets.llama("15m", vocab_size=4096, dtype="bfloat16").dtype == "bfloat16"
  assert presets.gpt_neo("33m", vocab_size=50257).attention_layers == ("global", "local") * 2


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_every_parameter_has_logical_axes(family):
  model = nnx.eval_shape(lambda: models.build(tiny(family), nnx.Rngs(0)))
  specs = nnx.get_partition_spec(_params(model))
  leaves = jax.tree.leaves(nnx.to_pure_dict(specs),
                           is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert leaves
  for spec, value in zip(leaves, jax.tree.leaves(nnx.to_pure_dict(_params(model)))):
    assert len(spec) == value.ndim
    assert set(spec) <= AXES, spec


def test_config_round_trips_through_json():
  cfg = presets.gpt_neo("33m", vocab_size=50257, dtype="bfloat16")
  again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
  assert again == cfg
  with pytest.raises(ValueError, match="no field"):
    ModelConfig.from_dict(dict(cfg.to_dict(), d_modle=3))


@pytest.mark.parametrize("kw,match", [
    (dict(num_heads=5, num_kv_heads=5), "divisible"),
    (dict(num_kv_heads=3), "divide"),
    (dict(attention_layers=("global",)), "attention_layers"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat="some"), "remat"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    tiny("llama", **kw)
  with pytest.raises(ValueError, match="family"):
    dataclasses.replace(tiny("llama"), family="gpt2")


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_outputs_and_dtypes(family):
  cfg = tiny(family, dtype="bfloat16")
  model = models.build(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)))
  logits, h = nnx.jit(lambda m, t: (m(t), m.hidden(t)))(model, tokens)
  assert logits.shape == (2, 9, 61) and logits.dtype == jnp.float32
  assert h.shape == (2, 9, 32) and h.dtype == jnp.bfloat16
  assert model.output_embedding().shape == (61, 32)
  assert model.output_embedding().dtype == jnp.float32
  leaves = jax.tree.leaves(nnx.to_pure_dict(_params(model)))
  assert all(x.dtype == jnp.float32 for x in leaves)


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_packed_rows_equal_separate_sequences(family):
  """Two stories packed in one row (segment ids, restarting positions) give the logits each
  gives alone; padding after them changes nothing."""
  cfg = tiny(family, window=3)
  model = models.build(cfg, nnx.Rngs(1))
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 61, 7), rng.integers(0, 61, 5)
  packed = np.concatenate([a, b, np.zeros(4, int)])[None]
  seg = np.asarray([[1] * 7 + [2] * 5 + [0] * 4])
  pos = np.asarray([list(range(7)) + list(range(5)) + [0] * 4])
  out = np.asarray(jax.jit(lambda t, p, s: model(t, positions_bt=p, segment_ids_bt=s))(
      packed, pos, seg))
  alone = nnx.jit(lambda m, t: m(t))
  np.testing.assert_allclose(out[0, :7], np.asarray(alone(model, a[None]))[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 7:12], np.asarray(alone(model, b[None]))[0], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neo", "llama"])
def test_attention_implementations_agree_inside_the_model(family):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 11)))
  outs = {}
  for impl in ("reference", "xla", "cpu", "auto"):
    model = models.build(tiny(family, attention_impl=impl), nnx.Rngs(0))
    outs[impl] = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  for impl in ("xla", "cpu", "auto"):
    np.testing.assert_allclose(outs[impl], outs["reference"], atol=1e-5)


def test_gpt_neo_does_not_scale_scores_and_llama_does():
  neo = models.build(tiny("gpt_neo"), nnx.Rngs(0))
  lla = models.build(tiny("llama"), nnx.Rngs(0))
  assert neo.blocks[0].attn.scale == 1.0
  assert lla.blocks[0].attn.scale is None  # 1/sqrt(head_dim) inside attention()
  assert [b.attn.window for b in neo.blocks] == [None, 4]


def test_remat_changes_nothing_numerically():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 8)))

  def loss_and_grads(cfg):
    model = models.build(cfg, nnx.Rngs(0))

    def loss(model):
      return jnp.mean(model(tokens) ** 2)

    return nnx.jit(nnx.value_and_grad(loss))(model)

  l0, g0 = loss_and_grads(tiny("llama"))
  l1, g1 = loss_and_grads(tiny("llama", remat="block"))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _packed_loss_and_grads(cfg, tokens):
  """(loss, parameter gradients) and the parameters of `cfg`'s model on two packed rows."""
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1] * 8])
  model = models.build(cfg, nnx.Rngs(0))

  def loss(model):
    return jnp.mean(model(tokens, segment_ids_bt=segments) ** 2)

  return nnx.jit(nnx.value_and_grad(loss))(model), _params(model)


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(num_layers=3)),
    ("gpt_neo", dict(num_layers=4)),                                     # global, local x 2
    ("gpt_neo", dict(num_layers=3, attention_layers=("global", "local", "local"))),  # no repeat
    ("llama", dict(num_layers=2, remat="block")),
])
def test_scanned_layers_equal_the_loop(family, overrides):
  """scan_layers: same parameter tree, same logits and gradients as the Python loop."""
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 8)))
  (l0, g0), p0 = _packed_loss_and_grads(tiny(family, **overrides), tokens)
  (l1, g1), p1 = _packed_loss_and_grads(tiny(family, scan_layers=True, **overrides), tokens)
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(), dict(remat="block"), dict(scan_layers=True),
                                       dict(dtype="bfloat16")])
def test_pallas_norm_equals_xla_inside_the_model(overrides):
  """model.norm_impl="pallas" (the residual add + RMSNorm kernels, through the interpreter):
  the llama model's loss and every parameter gradient as with the jnp norms."""
  fa = pytest.importorskip("tinystories_jax.kernels.flash_attention")
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 61, (2, 8)))
  (l0, g0), _ = _packed_loss_and_grads(tiny("llama", num_layers=3, **overrides), tokens)
  with fa.force_interpret():
    (l1, g1), _ = _packed_loss_and_grads(
        tiny("llama", num_layers=3, norm_impl="pallas", **overrides), tokens)
  # Each gradient against its own largest entry (they span 1e-5 to 1e-2 here); in bf16 XLA may
  # normalise the unrounded sum where the kernel normalises the stored one.
  tol = 1e-4 if "dtype" not in overrides else 5e-2
  np.testing.assert_allclose(l1, l0, rtol=tol)
  norm_grads = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    norm_grads += "norm" in jax.tree_util.keystr(path)
    assert np.abs(a).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(b, a, atol=tol * np.abs(a).max(), rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  assert norm_grads == 2 * 3 + 1  # two norms a block and the final one, all compared


def test_pallas_norm_is_llamas_only():
  with pytest.raises(ValueError, match="GPT-Neo's LayerNorm"):
    tiny("gpt_neo", norm_impl="pallas")
  with pytest.raises(ValueError, match="norm_impl 'triton'"):
    tiny("llama", norm_impl="triton")


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=4), dict(scan_layers=True),
                                       dict(remat="block", norm_impl="pallas"),
                                       dict(dtype="bfloat16")])
def test_pallas_qkv_equals_xla_inside_the_model(overrides, monkeypatch):
  """model.qkv_impl="pallas" (attention read from the stacked projection, its gradient written
  whole, through the interpreter): the llama model's loss and every parameter gradient as with
  q/k/v split and rotated by XLA, with grouped heads (the default here) and without."""
  fa = pytest.importorskip("tinystories_jax.kernels.flash_attention")
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 8)))
  base = dict(num_layers=2, head_dim=16, **overrides)
  calls = []
  stacked = fa.flash_attention_stacked
  monkeypatch.setattr(fa, "flash_attention_stacked",
                      lambda *a, **k: calls.append(1) or stacked(*a, **k))
  with fa.force_interpret():
    (l0, g0), _ = _packed_loss_and_grads(tiny("llama", **base, attention_impl="pallas"), tokens)
    (l1, g1), _ = _packed_loss_and_grads(
        tiny("llama", **base, attention_impl="pallas", qkv_impl="pallas"), tokens)
  assert calls, "the stacked path never ran"
  tol = 1e-4 if "dtype" not in overrides else 5e-2
  np.testing.assert_allclose(l1, l0, rtol=tol)
  compared = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    compared += any(f"'{w}'" in jax.tree_util.keystr(path) for w in ("wq", "wk", "wv"))
    assert np.abs(a).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(b, a, atol=tol * np.abs(a).max(), rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  assert compared == 3 * 2  # wq, wk and wv of both layers, all compared


def test_pallas_qkv_is_llamas_only():
  with pytest.raises(ValueError, match="GPT-Neo has no rotary"):
    tiny("gpt_neo", qkv_impl="pallas")
  with pytest.raises(ValueError, match="qkv_impl 'fused'"):
    tiny("llama", qkv_impl="fused")
  with pytest.raises(ValueError, match=r"not attention_impl 'xla' \(model.attention\)"):
    tiny("llama", qkv_impl="pallas")  # tiny() runs attention_impl "xla"


@pytest.mark.parametrize("overrides", [dict(), dict(scan_layers=True), dict(remat="block"),
                                       dict(dtype="bfloat16")])
def test_pallas_mlp_equals_xla_inside_the_model(overrides, monkeypatch):
  """model.mlp_impl="pallas" (SwiGLU's backward through its activation as the Pallas kernel,
  through the interpreter): the llama model's loss and every parameter gradient as with jnp."""
  fa = pytest.importorskip("tinystories_jax.kernels.flash_attention")
  from tinystories_jax.kernels import swiglu as swiglu_kernels  # noqa: PLC0415
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 61, (2, 8)))
  calls = []
  grad = swiglu_kernels.swiglu_grad
  monkeypatch.setattr(swiglu_kernels, "swiglu_grad",
                      lambda *a, **k: calls.append(1) or grad(*a, **k))
  (l0, g0), _ = _packed_loss_and_grads(tiny("llama", num_layers=2, **overrides), tokens)
  assert not calls
  with fa.force_interpret():
    (l1, g1), _ = _packed_loss_and_grads(
        tiny("llama", num_layers=2, mlp_impl="pallas", **overrides), tokens)
  assert calls, "the kernel never ran"
  # bf16: XLA rounds after each operation of the activation's gradient, the kernel once.
  tol = 1e-5 if "dtype" not in overrides else 5e-2
  np.testing.assert_allclose(l1, l0, rtol=tol)
  compared = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    compared += any(f"'{w}'" in jax.tree_util.keystr(path) for w in ("w_gate", "w_up"))
    assert np.abs(a).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(b, a, atol=tol * np.abs(a).max(), rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  assert compared == 2 * 2  # w_gate and w_up of both layers


@pytest.mark.parametrize("mesh_shape, kernel_runs", [((4, 1), True), ((2, 2), False)])
def test_pallas_mlp_keeps_the_jnp_form_on_a_tensor_split_d_ff(mesh_shape, kernel_runs,
                                                             monkeypatch):
  """Under a data x tensor mesh, model.mlp_impl="pallas" runs the kernel (rows per device) only
  while d_ff is whole on each device; split over `tensor`, the jnp form, which leaves the split
  in place. The gradients are the same either way."""
  fa = pytest.importorskip("tinystories_jax.kernels.flash_attention")
  from tinystories_jax.kernels import swiglu as swiglu_kernels  # noqa: PLC0415
  calls = []
  grad = swiglu_kernels.swiglu_grad
  monkeypatch.setattr(swiglu_kernels, "swiglu_grad",
                      lambda *a, **k: calls.append(1) or grad(*a, **k))
  mlp = lambda impl: models.build(  # noqa: E731  (the same parameters for both)
      tiny("llama", num_layers=1, mlp_impl=impl), nnx.Rngs(0)).blocks[0].mlp
  (ref_def, state), (graphdef, _) = nnx.split(mlp("xla")), nnx.split(mlp("pallas"))
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 8, state["w_up"].shape[0])),
                  jnp.float32)
  loss = lambda g: lambda s, x: jnp.sum(jnp.sin(nnx.merge(g, s)(x)))  # noqa: E731
  want = jax.grad(loss(ref_def), argnums=(0, 1))(state, x)
  assert not calls
  mesh = jax.make_mesh(mesh_shape, ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with fa.force_interpret(), jax.set_mesh(mesh):
    got = jax.jit(jax.grad(loss(graphdef), argnums=(0, 1)))(state, x)
  assert bool(calls) == kernel_runs
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_pallas_mlp_is_llamas_only():
  with pytest.raises(ValueError, match="GELU MLP has none"):
    tiny("gpt_neo", mlp_impl="pallas")
  with pytest.raises(ValueError, match="mlp_impl 'triton'"):
    tiny("llama", mlp_impl="triton")


def test_layer_period():
  from tinystories_jax.models import scan  # noqa: PLC0415
  assert scan.layer_period(("global",) * 6) == 1
  assert scan.layer_period(("global", "local") * 3) == 2
  assert scan.layer_period(("global", "local", "local")) == 3


def test_untied_llama_has_a_separate_output_layer():
  cfg = tiny("llama", tie_embeddings=False)
  model = models.build(cfg, nnx.Rngs(0))
  assert model.output_embedding() is not model.embedding[...]
  n = sum(x.size for x in jax.tree.leaves(_params(model)))
  assert n == models.count_params(cfg) == models.count_params(
      dataclasses.replace(cfg, tie_embeddings=True)) + 61 * 32


def test_flops_per_token_is_the_palm_count():
  cfg = presets.llama("15m", vocab_size=32000)
  non_embedding = models.count_params(cfg) - 32000 * 288
  assert models.count_flops_per_token(cfg, 256) == (
      6 * (non_embedding + 32000 * 288) + 12 * 6 * 288 * 256)


def test_build_under_a_mesh_with_logical_rules():
  devices = np.asarray(jax.devices()[:2])
  mesh = jax.sharding.Mesh(devices, ("tensor",),
                           axis_types=(jax.sharding.AxisType.Explicit,))
  rules = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
           ("embed", None), ("head_dim", None), ("norm", None), ("positions", None))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = models.build(tiny("llama", vocab_size=64), nnx.Rngs(0))
  wq = model.blocks[0].attn.wq[...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)


@pytest.mark.parametrize("form", ["swiglu", "swiglu_split", "swiglu_paired"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 6e-2)])
def test_swiglu_backward_matches_autodiff(dtype, tol, form):
  """`layers.swiglu` has a hand-written backward in two forms (the CPU runs the split one);
  each must equal autodiff of the formula, in value and dtype."""
  from tinystories_jax.models import layers  # pylint: disable=import-outside-toplevel
  fn = getattr(layers, form)
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.standard_normal(s) * 0.5, dtype)
          for s in ((2, 5, 16), (16, 24), (16, 24), (24, 16))]
  ct = jnp.asarray(rng.standard_normal((2, 5, 16)), dtype)

  def plain(x, wg, wu, wd):
    return jnp.einsum("btf,fd->btd", jax.nn.silu(x @ wg) * (x @ wu), wd)

  def grads(f):
    return jax.grad(lambda *a: jnp.sum((f(*a) * ct).astype(jnp.float32)), argnums=(0, 1, 2, 3))(
        *args)

  np.testing.assert_allclose(np.asarray(fn(*args), np.float32),
                             np.asarray(plain(*args), np.float32), atol=tol, rtol=tol)
  for a, b in zip(grads(fn), grads(plain)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol,
                               rtol=tol)


def test_swiglu_picks_its_form_per_platform():
  """Lowered for a GPU (from this CPU) the MLP is the paired form, for the CPU the split one."""
  from tinystories_jax.models import layers  # pylint: disable=import-outside-toplevel
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2, 8, 16), (16, 24), (16, 24),
                                                          (24, 16))]
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(layers.swiglu(*a).astype(jnp.float32)),
                          argnums=(0, 1, 2, 3)))

  def paired_matmuls(platform):  # contractions with the [., 2, F] pair
    text = grad.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return [line for line in text.splitlines() if "dot_general" in line and "x2x24x" in line]

  assert len(paired_matmuls("cuda")) >= 3  # forward, dx, dW
  assert not paired_matmuls("cpu")


@pytest.mark.parametrize("head_dim", [4, 48, 64])
def test_rotary_forms_agree(head_dim):
  """Both forms rotate pairs (i, i + D/2) by position; values and gradients match exactly."""
  from tinystories_jax.models import layers  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.key(head_dim), 3)
  x = jax.random.normal(keys[0], (2, 5, 3, head_dim))
  ct = jax.random.normal(keys[1], x.shape)
  pos = jax.random.randint(keys[2], (2, 5), 0, 1000)
  outs = [jax.vjp(lambda x, f=f: f(x, pos, 10000.0), x) for f in (
      layers.rotary_by_concatenate, layers.rotary_by_reverse, layers.rotary)]
  for out, vjp in outs[1:]:
    np.testing.assert_array_equal(out, outs[0][0])
    np.testing.assert_array_equal(vjp(ct)[0], outs[0][1](ct)[0])
  # Position 0 is the identity; a rotation keeps each pair's norm.
  np.testing.assert_allclose(layers.rotary(x, jnp.zeros((2, 5), jnp.int32), 10000.0), x)
  half = head_dim // 2
  pair_norms = lambda y: y[..., :half] ** 2 + y[..., half:] ** 2  # noqa: E731
  np.testing.assert_allclose(pair_norms(outs[0][0]), pair_norms(x), rtol=1e-5, atol=1e-5)


def test_rotary_picks_its_form_per_platform():
  """Lowered for an NVIDIA GPU (from this CPU) rotary swaps halves with a reverse; for the CPU
  it concatenates them."""
  from tinystories_jax.models import layers  # pylint: disable=import-outside-toplevel
  x = jax.ShapeDtypeStruct((2, 8, 3, 48), jnp.bfloat16)
  pos = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  fn = jax.jit(lambda x, p: layers.rotary(x, p, 10000.0))

  def ops(platform):
    text = fn.trace(x, pos).lower(lowering_platforms=(platform,)).as_text()
    return "stablehlo.reverse" in text, "stablehlo.concatenate" in text

  assert ops("cuda") == (True, False)
  assert ops("cpu") == (False, True)


def test_swiglu_paired_keeps_a_tensor_sharded_d_ff_in_place():
  """On a data x tensor mesh with d_ff split over tensor (the MLP's sharding rule), the paired
  form needs only the all-reduces the split one does: no shards moved between devices."""
  from tinystories_jax.models import layers  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = jax.sharding.PartitionSpec
  shard = lambda *s: jax.sharding.NamedSharding(mesh, spec(*s))  # noqa: E731
  args = [jax.ShapeDtypeStruct((4, 8, 16), jnp.bfloat16, sharding=shard("data")),
          jax.ShapeDtypeStruct((16, 24), jnp.bfloat16, sharding=shard(None, "tensor")),
          jax.ShapeDtypeStruct((16, 24), jnp.bfloat16, sharding=shard(None, "tensor")),
          jax.ShapeDtypeStruct((24, 16), jnp.bfloat16, sharding=shard("tensor", None))]

  def collectives(fn):
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                            argnums=(0, 1, 2, 3)))
    text = grad.trace(*args).lower().compile().as_text()
    return {op: text.count(f" {op}(") for op in ("all-to-all", "collective-permute",
                                                 "all-gather", "all-reduce")}

  split, paired = collectives(layers.swiglu_split), collectives(layers.swiglu_paired)
  assert paired["all-to-all"] == paired["collective-permute"] == 0, paired
  assert paired == split, (paired, split)


def test_gelu_mlp_keeps_no_tanh_for_its_backward():
  """GPT-Neo's MLP saves its matmul output and its activation for the backward, and recomputes
  gelu_new's tanh there from the first: one [B, T, d_ff] array less written and read per layer."""
  cfg = tiny("gpt_neo", d_model=16)
  mlp = models.build(cfg, nnx.Rngs(0)).blocks[0].mlp
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 16)), jnp.float32)
  graphdef, state = nnx.split(mlp)
  _, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  wide = [r for r in jax.tree.leaves(vjp) if getattr(r, "shape", ()) == (2, 5, cfg.d_ff)]
  assert len(wide) == 2, [r.shape for r in jax.tree.leaves(vjp)]
  # Same gradient as plain autodiff of the formula.
  def plain(s, x):
    m = nnx.merge(graphdef, s)
    h = jax.nn.gelu(x @ m.w_in[...] + m.b_in[...], approximate=True)
    return h @ m.w_out[...] + m.b_out[...]
  ct = jnp.ones((2, 5, 16))
  got = vjp(ct)
  want = jax.vjp(plain, state, x)[1](ct)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _separate_qkv(x, wq, wk, wv):
  return tuple(jnp.einsum("btd,dhk->bthk", x, w) for w in (wq, wk, wv))


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_qkv_projection_equals_three_matmuls(heads, kv_heads):
  """The stacked q/k/v matmul and its hand-written backward against autodiff of three einsums,
  grouped-query heads included (each kv head's query heads must stay its own)."""
  from tinystories_jax.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  d, hd = 16, 8
  args = [jnp.asarray(rng.standard_normal(s), jnp.float32)
          for s in ((2, 5, d), (d, heads, hd), (d, kv_heads, hd), (d, kv_heads, hd))]
  cts = [jnp.asarray(rng.standard_normal((2, 5, n, hd)), jnp.float32)
         for n in (heads, kv_heads, kv_heads)]

  def loss(fn):
    return lambda *a: sum(jnp.sum(o * c) for o, c in zip(fn(*a), cts))

  for got, want in zip(layers.qkv_projection(*args), _separate_qkv(*args)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  grads = lambda fn: jax.grad(loss(fn), argnums=(0, 1, 2, 3))(*args)  # noqa: E731
  for got, want in zip(grads(layers.qkv_projection), grads(_separate_qkv)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_qkv_projection_keeps_tensor_sharded_heads_in_place():
  """On a data x tensor mesh with heads and kv heads split over tensor, the stacked projection
  moves no shards between devices and needs no more collectives than three matmuls do."""
  from tinystories_jax.models import layers  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = jax.sharding.PartitionSpec
  shard = lambda *s: jax.sharding.NamedSharding(mesh, spec(*s))  # noqa: E731
  args = [jax.ShapeDtypeStruct((4, 8, 16), jnp.bfloat16, sharding=shard("data")),
          jax.ShapeDtypeStruct((16, 4, 8), jnp.bfloat16, sharding=shard(None, "tensor")),
          jax.ShapeDtypeStruct((16, 2, 8), jnp.bfloat16, sharding=shard(None, "tensor")),
          jax.ShapeDtypeStruct((16, 2, 8), jnp.bfloat16, sharding=shard(None, "tensor"))]

  def collectives(fn):
    def f(*a):
      q, k, v = fn(*a)
      return sum(jnp.sum(jnp.square(o.astype(jnp.float32))) for o in (q, k, v))
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3))).trace(*args).lower().compile().as_text()
    return {op: text.count(f" {op}(") for op in ("all-to-all", "collective-permute",
                                                 "all-gather", "all-reduce")}

  separate, stacked = collectives(_separate_qkv), collectives(layers.qkv_projection)
  assert stacked["all-to-all"] == stacked["collective-permute"] == 0, stacked
  assert stacked["all-gather"] <= separate["all-gather"], (stacked, separate)
  assert stacked["all-reduce"] <= separate["all-reduce"], (stacked, separate)


def test_qkv_picks_its_form_per_platform():
  """Lowered for a GPU (from this CPU) llama's q/k/v is the stacked matmul, for the CPU three."""
  cfg = tiny("llama", d_model=16, num_heads=4, num_kv_heads=2)  # head_dim 4, group 2
  attn = models.build(cfg, nnx.Rngs(0)).blocks[0].attn
  graphdef, state = nnx.split(attn)
  x = jax.ShapeDtypeStruct((2, 8, 16), jnp.float32)
  grad = jax.jit(jax.grad(lambda s, x: sum(jnp.sum(o) for o in nnx.merge(graphdef, s).qkv(x)),
                          argnums=(0, 1)))

  def stacked_matmuls(platform):  # contractions with the [d, kv, group + 2, head_dim] weight
    text = grad.trace(state, x).lower(lowering_platforms=(platform,)).as_text()
    return [line for line in text.splitlines() if "dot_general" in line and "16x2x4x4x" in line]

  assert stacked_matmuls("cuda")  # dx against the stacked weight
  assert not stacked_matmuls("cpu")
  # Heads split over an abstract 4-way `tensor` axis but kv heads (2) not: three matmuls, as the
  # stacked weight would move shards; on a 2-way axis both are split and it stacks.
  axes = ("data", "fsdp", "tensor")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1, 1, 4), axes)):
    assert not stacked_matmuls("cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1, 1, 2), axes)):
    assert stacked_matmuls("cuda")


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_norms_keep_no_float32_activations_for_the_backward(family, scan_layers):
  """A bf16 model's norms compute in float32 but save only their bf16 input for the backward
  (which recomputes the rest). Unrolled, XLA recomputes the float32 copies anyway; in a scan
  each saved value becomes a [layers, B, T, d_model] buffer written in the forward and read in
  the backward, so the float32 copies cost twice a bf16 activation's traffic each."""
  cfg = tiny(family, num_layers=2, dtype="bfloat16", scan_layers=scan_layers)
  model = models.build(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 8)))
  _, vjp = jax.vjp(lambda s: nnx.merge(graphdef, s).hidden(tokens), state)
  saved = [r for r in jax.tree.leaves(vjp) if hasattr(r, "dtype") and r.ndim >= 3
           and r.shape[-3:] == (2, 8, cfg.d_model)]
  assert saved, "no activation-shaped residuals found: the check inspects nothing"
  wide = [(r.shape, r.dtype) for r in saved if r.dtype == jnp.float32]
  assert not wide, wide


def _drawn_one_by_one(cfg, seed):
  """The model with every parameter drawn by its own initialiser call (no grouping)."""
  cls = models.GPTNeo if cfg.family == "gpt_neo" else models.Llama
  with nnx.use_eager_sharding(False):
    return cls(cfg, nnx.Rngs(seed))


@pytest.mark.parametrize("family,partitionable",
                         [("gpt_neo", True), ("llama", True), ("llama", False)])
def test_grouped_draws_give_every_parameter_its_own_draw(family, partitionable):
  # build() draws the normally initialised parameters of one shape together (one vmap over
  # their keys). That gives each parameter its own draw's random bits, so its values to the
  # last place, eagerly and compiled (the trainer's initialiser), whichever way threefry lays
  # out its bits (jax 0.10.2 gives them bit for bit; jax 0.12 rounds the batched transform
  # to a normal differently in the last place).
  cfg = tiny(family, num_layers=3, tie_embeddings=family == "gpt_neo")
  leaves = lambda model: jax.tree.leaves(nnx.to_pure_dict(_params(model)))  # noqa: E731
  with jax.threefry_partitionable(partitionable):
    alone = leaves(_drawn_one_by_one(cfg, 5))
    alone_jit = jax.jit(lambda: leaves(_drawn_one_by_one(cfg, 5)))()
    grouped = leaves(models.build(cfg, nnx.Rngs(5)))
    grouped_jit = jax.jit(lambda: leaves(models.build(cfg, nnx.Rngs(5))))()
  assert len(alone) == len(grouped) == len(grouped_jit) == len(alone_jit) > 10
  for a, aj, g, gj in zip(alone, alone_jit, grouped, grouped_jit):
    assert a.dtype == g.dtype == gj.dtype
    np.testing.assert_array_max_ulp(np.asarray(g), np.asarray(a), maxulp=1)
    np.testing.assert_array_max_ulp(np.asarray(gj), np.asarray(aj), maxulp=1)
  # Different draws really were made (not one array repeated): the blocks' largest leaves
  # (drawn from a normal) differ.
  blocks = nnx.to_pure_dict(_params(models.build(cfg, nnx.Rngs(5))))["blocks"]
  first, second = (max(jax.tree.leaves(blocks[i]), key=lambda x: x.size) for i in (0, 1))
  assert float(jnp.std(first)) > 0 and not np.array_equal(np.asarray(first), np.asarray(second))


def _random_calls(fn) -> int:
  """How many random-number computations a function's jaxpr holds (at any depth)."""
  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name in ("random_bits", "threefry2x32")
      for v in eqn.params.values():
        inner = getattr(v, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          n += count(inner)
        elif hasattr(v, "eqns"):
          n += count(v)
    return n
  return count(jax.make_jaxpr(fn)().jaxpr)


def test_build_draws_each_parameter_shape_once():
  cfg = tiny("llama", num_layers=4)
  grouped = _random_calls(lambda: nnx.to_pure_dict(_params(models.build(cfg, nnx.Rngs(0)))))
  alone = _random_calls(lambda: nnx.to_pure_dict(_params(_drawn_one_by_one(cfg, 0))))
  normal = [x for p, x in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(_params(_drawn_one_by_one(cfg, 0)))) if "scale" not in str(p)]
  shapes = {x.shape for x in normal}
  assert alone >= len(normal) > len(shapes)
  assert 0 < grouped <= alone * len(shapes) // len(normal)


def test_grouped_draws_scale_each_member_by_its_own_std():
  # One group (same shape and dtype) with three stds, a second dtype, a zeros parameter and a
  # draw from a non-threefry key (drawn at once): each is its own initialiser's value.
  from tinystories_jax.models import layers  # noqa: PLC0415

  def make():
    rngs = nnx.Rngs(7)
    specs = [(layers.normal(0.02), (8, 4), jnp.float32), (layers.normal(1.0), (8, 4), jnp.float32),
             (layers.zeros, (8, 4), jnp.float32), (layers.normal(0.5), (8, 4), jnp.float32),
             (layers.normal(0.1), (8, 4), jnp.bfloat16)]
    with nnx.use_eager_sharding(False):
      return [layers.param(rngs, init, shape, ("embed", "mlp"), dtype)
              for init, shape, dtype in specs], specs

  with layers.grouped_normal_draws():
    params, specs = make()
    assert isinstance(params[0].get_raw_value(), jax.ShapeDtypeStruct)  # drawn at the end
  keys = nnx.Rngs(7)
  for p, (init, shape, dtype) in zip(params, specs):
    want = init(keys.params(), shape, dtype)
    assert p[...].dtype == want.dtype
    if want.dtype == jnp.float32:
      np.testing.assert_array_max_ulp(np.asarray(p[...]), np.asarray(want), maxulp=1)
    else:  # bfloat16: one unit in its last place is at most 2^-7 of the value
      np.testing.assert_allclose(np.asarray(p[...], np.float32), np.asarray(want, np.float32),
                                 rtol=2**-7, atol=0)
  assert float(jnp.std(params[1][...])) > 10 * float(jnp.std(params[0][...]))

  rbg = nnx.Rngs(jax.random.key(3, impl="rbg"))
  with layers.grouped_normal_draws(), nnx.use_eager_sharding(False):
    p = layers.param(rbg, layers.normal(1.0), (8, 4), ("embed", "mlp"), jnp.float32)
    assert isinstance(p.get_raw_value(), jax.Array)  # not deferred: vmap may change rbg's bits

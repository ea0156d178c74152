"""Learning-rate schedules, the weight-decay mask and the grouped (flat) update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tinystories_jax.training import optimizer as opt_lib


def _lr(**kw):
  cfg = opt_lib.OptimizerConfig(**kw)
  return lambda s: float(opt_lib.learning_rate(cfg, 100)(s))


def test_constant_with_warmup():
  lr = _lr(lr=1e-3, schedule="constant", warmup_steps=10)
  assert lr(0) == pytest.approx(1e-4)
  assert lr(9) == pytest.approx(1e-3)
  assert lr(50) == pytest.approx(1e-3)
  assert lr(99) == pytest.approx(1e-3)


def test_cosine_decays_to_the_final_ratio():
  lr = _lr(lr=1e-3, schedule="cosine", warmup_steps=10, final_lr_ratio=0.1)
  assert lr(10) == pytest.approx(1e-3)
  assert lr(55) == pytest.approx(0.55e-3, rel=1e-3)
  assert lr(100) == pytest.approx(1e-4, rel=1e-4)
  assert lr(40) > lr(60) > lr(80)


def test_linear_decay_without_warmup():
  lr = _lr(lr=2e-3, schedule="linear", warmup_steps=0, final_lr_ratio=0.0)
  assert lr(0) == pytest.approx(2e-3)
  assert lr(50) == pytest.approx(1e-3)
  assert lr(100) == pytest.approx(0.0, abs=1e-12)


def test_unknown_schedule():
  with pytest.raises(ValueError, match="schedule"):
    _lr(schedule="step")(0)


def _tree():
  params = {"embedding": jnp.ones((8, 4)), "w": jnp.ones((4, 4)), "norm": jnp.ones((4,)),
            "pos": jnp.ones((6, 4))}
  names = {"embedding": ("vocab", "embed"), "w": ("embed", "mlp"), "norm": ("norm",),
           "pos": ("positions", "embed")}
  return params, names


def test_decay_mask_defaults_and_switches():
  params, names = _tree()
  mask = opt_lib.decay_mask(names, params, opt_lib.OptimizerConfig())
  assert mask == {"embedding": False, "w": True, "norm": False, "pos": False}
  mask = opt_lib.decay_mask(names, params, opt_lib.OptimizerConfig(
      decay_embeddings=True, decay_norms_and_biases=True))
  assert all(mask.values())


def test_weight_decay_only_touches_masked_in_parameters():
  params, names = _tree()
  cfg = opt_lib.OptimizerConfig(lr=0.1, weight_decay=0.5, clip_norm=1.0)
  tx = opt_lib.make_optimizer(cfg, 10, names, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # Zero gradients: only decoupled decay moves a parameter, by lr * weight_decay * value.
  np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5, rtol=1e-6)
  for k in ("embedding", "norm", "pos"):
    np.testing.assert_array_equal(new[k], params[k])


def _mixed_tree(seed=0):
  """Parameters of several sizes and both decay settings, and their logical names."""
  keys = jax.random.split(jax.random.key(seed), 6)
  shapes = {"embedding": (50, 8), "w1": (8, 16), "w2": (16, 8), "norm1": (8,), "norm2": (8,),
            "out": (8, 40)}
  params = {k: jax.random.normal(key, shape) for key, (k, shape) in zip(keys, shapes.items())}
  names = {"embedding": ("vocab", "embed"), "w1": ("embed", "mlp"), "w2": ("mlp", "embed"),
           "norm1": ("norm",), "norm2": ("norm",), "out": ("embed", "vocab")}
  return params, names


def _train(tx, params, steps=3, scale=1.0):
  state = tx.init(params)
  for i in range(steps):
    grads = jax.tree.map(lambda x, i=i: scale * jnp.sin(x * (i + 2.0)), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_leaf_groups_put_small_parameters_in_one_flat_vector_per_decay_setting():
  params, names = _mixed_tree()
  mask = opt_lib.decay_mask(names, params, opt_lib.OptimizerConfig())
  groups = opt_lib.LeafGroups(params, mask, below=200)  # w1, w2 (128 each) and the norms
  grouped = groups.group(params)
  assert sorted(grouped["flat"]) == ["decayed_float32", "exempt_float32"]
  assert grouped["flat"]["decayed_float32"].shape == (256,)  # w1, w2
  assert grouped["flat"]["exempt_float32"].shape == (16,)  # norm1, norm2
  assert [x.shape for x in grouped["leaves"]] == [(50, 8), (8, 40)]  # embedding, out
  assert groups.grouped_mask() == {"flat": {"decayed_float32": True, "exempt_float32": False},
                                   "leaves": (False, False)}
  back = groups.ungroup(grouped)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for k in params:
    np.testing.assert_array_equal(back[k], params[k])


@pytest.mark.parametrize("below", [200, 10**9])
def test_the_grouped_update_is_each_parameters_update(below):
  """Without clipping, every element goes through the same arithmetic: equal bit for bit.
  With it, only the norm's sum runs in another order."""
  params, names = _mixed_tree()
  for clip, scale in ((0.0, 1.0), (1.0, 10.0)):
    cfg = opt_lib.OptimizerConfig(lr=0.05, weight_decay=0.3, clip_norm=clip)
    plain = opt_lib.make_optimizer(cfg, 10, names, params)
    grouped = opt_lib.make_optimizer(dataclasses.replace(cfg, flatten_below=below), 10, names,
                                     params)
    assert getattr(plain, "groups", None) is None and grouped.groups.flat
    a, b = _train(plain, params, scale=scale), _train(grouped, params, scale=scale)
    for k in params:
      if clip:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
      else:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Clipping was active in the second round, so the comparison covered it.
    grads = jax.tree.map(lambda x: scale * jnp.sin(x * 2.0), params)
    assert float(optax.tree.norm(grads)) > 1.0 or not clip
    np.testing.assert_allclose(float(opt_lib.global_norm(grouped, grads)),
                               float(optax.tree.norm(grads)), rtol=1e-6)


def test_flatten_below_with_no_parameter_that_small_is_the_plain_update():
  params, names = _mixed_tree()
  cfg = opt_lib.OptimizerConfig(flatten_below=8)  # the smallest parameter has 8 elements
  assert getattr(opt_lib.make_optimizer(cfg, 10, names, params), "groups", None) is None

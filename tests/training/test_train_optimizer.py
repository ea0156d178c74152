"""Learning-rate schedules and the weight-decay mask."""

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

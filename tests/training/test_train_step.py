"""The pure train step: accumulation, masking, non-finite handling, sharded init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinystories_jax.models.config import ModelConfig
from tinystories_jax.parallel import mesh as mesh_lib
from tinystories_jax.parallel import placement, rules
from tinystories_jax.training import optimizer as opt_lib
from tinystories_jax.training import state as state_lib
from tinystories_jax.training import step as step_lib

MODEL = ModelConfig(family="llama", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_positions=64, attention_impl="reference")


def _setup(step_cfg, *, lr=1e-2, mesh_shape=(1, 1, 1), devices=1, model=MODEL,
           flatten_below=0, clip_norm=1.0):
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*mesh_shape), jax.devices()[:devices])
  layout = state_lib.model_layout(model)
  opt_cfg = opt_lib.OptimizerConfig(lr=lr, clip_norm=clip_norm, weight_decay=0.1,
                                    flatten_below=flatten_below)
  tx = opt_lib.make_optimizer(opt_cfg, 10, layout.logical_names, layout.abstract_params)
  sh = state_lib.state_shardings(layout, tx, mesh)
  state, extra = state_lib.init_state(model, tx, sh, seed=0)
  fn = step_lib.make_train_step(layout.graphdef, tx, opt_lib.learning_rate(opt_cfg, 10), step_cfg)
  return mesh, layout, sh, state, extra, fn


def _batch(b=8, t=16, seed=0, vocab=64):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  mask = np.ones((b, t), np.float32)
  mask[:, -3:] = 0
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": mask}


def _run(fn, mesh, sh, state, extra, batches):
  bsh = {k: rules.batch_sharding(mesh, 2) for k in batches[0]}
  jitted = step_lib.jit_train_step(fn, sh.state, sh.extra, bsh, mesh)
  out = []
  for b in batches:
    state, m = jitted(state, extra, placement.place_batch(b, mesh))
    out.append(jax.device_get(m))
  return state, out


def test_gradient_accumulation_matches_one_big_batch():
  batches = [_batch(seed=s) for s in range(2)]
  mesh, _, sh, state, extra, fn = _setup(step_lib.StepConfig())
  big, m_big = _run(fn, mesh, sh, state, extra, batches)
  mesh, _, sh, state, extra, fn = _setup(step_lib.StepConfig(grad_accum_steps=4))
  acc, m_acc = _run(fn, mesh, sh, state, extra, batches)
  for a, b in zip(m_big, m_acc):
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=2e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               big.params, acc.params)


def test_fused_loss_step_equals_plain_loss_step():
  """The whole step (z-loss, tied embeddings, masking) through the fused loss's own backward."""
  batches = [_batch(seed=s) for s in range(2)]
  results = []
  for impl in ("plain", "fused"):
    mesh, _, sh, state, extra, fn = _setup(step_lib.StepConfig(loss_impl=impl, z_loss=1e-3))
    results.append(_run(fn, mesh, sh, state, extra, batches))
  (p_plain, m_plain), (p_fused, m_fused) = results
  for a, b in zip(m_plain, m_fused):
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5),
               p_plain.params, p_fused.params)


def test_without_a_z_loss_the_fused_backward_runs_no_z_terms():
  """`train.z_loss` 0 leaves z out of what the step differentiates: with the forward-made loss
  gradient, the z-loss's scatter into the output embedding's gradient is not in the step."""
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  counts = {}
  for z in (0.0, 1e-3):
    _, _, _, state, extra, fn = _setup(step_lib.StepConfig(loss_kernel="pallas_fwd_grad",
                                                           loss_vocab_multiple=64, z_loss=z))
    with fa.force_interpret():
      counts[z] = str(jax.make_jaxpr(fn)(state, extra, batch)).count("scatter-add")
  assert counts[0.0] < counts[1e-3], counts


def test_loss_falls_and_counts_only_unmasked_targets():
  batch = _batch()
  mesh, _, sh, state, extra, fn = _setup(step_lib.StepConfig(loss_impl="plain"), lr=3e-2)
  _, ms = _run(fn, mesh, sh, state, extra, [batch] * 12)
  assert ms[0]["targets"] == batch["loss_mask"].sum()
  assert ms[-1]["train_loss"] < ms[0]["train_loss"] - 0.5
  assert abs(ms[0]["train_loss"] - np.log(64)) < 0.2


def test_packing_padding_carries_no_loss():
  batch = _batch()
  batch["segment_ids"] = np.ones_like(batch["inputs"])
  batch["segment_ids"][:, 10:] = 0
  batch["positions"] = np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()
  mask = step_lib.target_mask({k: jnp.asarray(v) for k, v in batch.items()})
  assert float(mask.sum()) == 8 * 10


@pytest.mark.parametrize("skip", [False, True])
def test_non_finite_updates(skip):
  mesh, _, sh, state, extra, fn = _setup(step_lib.StepConfig(skip_nonfinite=skip), lr=1e30)
  before = jax.device_get(state.params)
  state, ms = _run(fn, mesh, sh, state, extra, [_batch(seed=s) for s in range(3)])
  finite = [bool(m["finite"]) for m in ms]
  assert finite[0] and not all(finite)
  params = jax.device_get(state.params)
  if skip:
    leaves = jax.tree.leaves(params)
    assert all(np.isfinite(x).all() for x in leaves)
    assert int(state.step) == 3
  else:
    assert not all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  del before


def test_parameters_are_created_sharded_from_logical_axes():
  mesh, layout, sh, state, *_ = _setup(step_lib.StepConfig(), mesh_shape=(2, 2, 2), devices=8)
  p = state.params
  emb = p["embedding"].sharding.spec
  assert tuple(emb) == ("tensor", "fsdp")  # vocab -> tensor, embed -> fsdp
  wq = p["blocks"][0]["attn"]["wq"]
  assert tuple(wq.sharding.spec) == ("fsdp", "tensor")  # embed, heads, head_dim (replicated)
  assert wq.addressable_shards[0].data.shape == (16, 2, 8)
  assert tuple(p["final_norm"]["scale"].sharding.spec) == ()
  mu = state.opt_state[1][0].mu
  assert mu["blocks"][0]["attn"]["wq"].sharding == wq.sharding
  del layout


def test_small_parameters_updated_as_flat_vectors_train_as_each_alone():
  """optimizer.flatten_below: the same steps (the clipping norm summed in another order) on a
  data-parallel mesh, the moments of the flattened parameters replicated there."""
  batches = [_batch(seed=s) for s in range(3)]
  runs = {}
  for below in (0, 2048):  # the attention matrices and the norms, not the MLP's
    mesh, _, sh, state, extra, fn = _setup(step_lib.StepConfig(), mesh_shape=(2, 1, 1),
                                           devices=2, flatten_below=below, clip_norm=0.5)
    runs[below] = _run(fn, mesh, sh, state, extra, batches)
  (plain, plain_m), (flat, flat_m) = runs[0], runs[2048]
  for a, b in zip(plain_m, flat_m):
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-6)
    assert a["grad_norm"] > 0.5  # clipping was active in every step
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-6)
  # Adam scales each entry by its own RMS (sqrt(v)), so an entry whose gradient is tiny next to
  # the rest (a sum that nearly cancels: ~1e-6 where most are ~1e-3) carries its large relative
  # rounding error into a full-size step, and the two programs round differently. Each step
  # (lr 1e-2) moves a weight by up to about 1e-2; atol is a thousandth of one. (jax 0.12 on a
  # CPU: one entry of 1024 off by 1.5e-6.)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain.params),
                          jax.tree.leaves(flat.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  inner = flat.opt_state[1][0]
  sizes = [x.size for x in jax.tree.leaves(flat.params)]
  assert set(inner.mu["flat"]) == {"decayed_float32", "exempt_float32"}
  assert sum(x.size for x in inner.mu["flat"].values()) == sum(n for n in sizes if n < 2048)
  assert sorted(x.size for x in inner.mu["leaves"]) == sorted(n for n in sizes if n >= 2048)
  assert all(x.sharding.is_fully_replicated for x in inner.mu["flat"].values())


def test_flattening_parameters_the_mesh_splits_is_refused():
  with pytest.raises(opt_lib.FlattenedSplitError,
                     match="optimizer.flatten_below flattens .* parameters that "
                                       "this mesh splits over its fsdp or tensor axis"):
    _setup(step_lib.StepConfig(), mesh_shape=(1, 2, 1), devices=2, flatten_below=2048)

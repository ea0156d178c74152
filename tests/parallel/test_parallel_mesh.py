"""Meshes, logical sharding rules, and the same training on every mesh shape (8 CPU devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tinystories_jax.models.config import ModelConfig
from tinystories_jax.parallel import mesh as mesh_lib
from tinystories_jax.parallel import placement, rules
from tinystories_jax.training import optimizer as opt_lib
from tinystories_jax.training import state as state_lib
from tinystories_jax.training import step as step_lib

# Heads and MLP width divide an 8-way tensor axis; the 4 kv heads do not (they stay replicated).
MODEL = ModelConfig(family="llama", vocab_size=64, d_model=64, num_layers=2, num_heads=8,
                    num_kv_heads=4, max_positions=64, attention_impl="reference")


def test_resolve_shape_fills_the_rest():
  assert mesh_lib.resolve_shape(mesh_lib.MeshConfig(-1, 1, 1), 8) == (8, 1, 1)
  assert mesh_lib.resolve_shape(mesh_lib.MeshConfig(2, -1, 2), 8) == (2, 2, 2)
  assert mesh_lib.resolve_shape(mesh_lib.MeshConfig(1, 1, 8), 8) == (1, 1, 8)


@pytest.mark.parametrize("sizes, match", [
    ((3, -1, 1), "does not divide the 8 available devices"),
    ((2, 2, 1), "uses 4 devices but 8 are available"),
    ((4, 4, 1), "uses 16 devices but 8 are available.*mesh.cpu_devices=16 splits it"),
    ((-1, -1, 1), "At most one mesh axis may be -1"),
    ((0, 1, 1), "must be positive or -1"),
])
def test_bad_meshes_are_one_sentence(sizes, match):
  with pytest.raises(mesh_lib.MeshError, match=match) as e:
    mesh_lib.make_mesh(mesh_lib.MeshConfig(*sizes))
  assert "\n" not in str(e.value)


def test_logical_rules_replicate_what_does_not_divide():
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))
  spec = rules.logical_to_mesh_spec(("vocab", "embed"), (64, 32), mesh)
  assert spec == P("tensor", "fsdp")
  assert rules.logical_to_mesh_spec(("embed", "kv_heads", "head_dim"), (32, 3, 8), mesh) == P(
      "fsdp")
  assert rules.logical_to_mesh_spec(("norm",), (32,), mesh) == P()
  with pytest.raises(ValueError, match="no sharding rule"):
    rules.logical_to_mesh_spec(("nonsense",), (4,), mesh)


def _train(shape, batches, steps=3, loss_impl="fused", loss_kernel="xla"):
  n = int(np.prod(shape))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(*shape), jax.devices()[:n])
  layout = state_lib.model_layout(MODEL)
  opt_cfg = opt_lib.OptimizerConfig(lr=1e-2, clip_norm=1.0)
  tx = opt_lib.make_optimizer(opt_cfg, 10, layout.logical_names, layout.abstract_params)
  sh = state_lib.state_shardings(layout, tx, mesh)
  state, extra = state_lib.init_state(MODEL, tx, sh, seed=0)
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(layout.graphdef, tx, opt_lib.learning_rate(opt_cfg, 10),
                               step_lib.StepConfig(loss_impl=loss_impl, loss_chunk=8,
                                                   loss_kernel=loss_kernel)),
      sh.state, sh.extra, {k: rules.batch_sharding(mesh, 2) for k in batches[0]}, mesh)
  losses = []
  for b in batches[:steps]:
    state, m = fn(state, extra, placement.place_batch(b, mesh))
    losses.append(float(m["train_loss"]))
  return state, losses


def _batches(n=3, b=8, t=16):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tok = rng.integers(0, MODEL.vocab_size, (b, t + 1)).astype(np.int32)
    out.append({"inputs": tok[:, :-1], "targets": tok[:, 1:],
                "loss_mask": np.ones((b, t), np.float32)})
  return out


EXPECTED = {
    # mesh: (embedding, wq, wk, w_gate) partition specs
    (8, 1, 1): (P(), P(), P(), P()),
    (2, 4, 1): (P(None, "fsdp"), P("fsdp"), P("fsdp"), P("fsdp")),
    (2, 2, 2): (P("tensor", "fsdp"), P("fsdp", "tensor"), P("fsdp", "tensor"),
                P("fsdp", "tensor")),
    (1, 1, 8): (P("tensor"), P(None, "tensor"), P(), P(None, "tensor")),
}


@pytest.mark.parametrize("loss_impl, loss_kernel", [("fused", "xla"), ("chunked", "xla"),
                                                     ("fused", "pallas"),
                                                     ("fused", "pallas_fwd_grad")])
def test_every_mesh_trains_like_one_device(loss_impl, loss_kernel):
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415

  batches = _batches()
  _, reference = _train((1, 1, 1), batches, loss_impl=loss_impl)
  assert reference[-1] < reference[0]
  for shape, (emb, wq, wk, gate) in EXPECTED.items():
    # The Pallas loss kernels (per device, on the mesh's rows) through the interpreter.
    with fa.force_interpret(loss_kernel.startswith("pallas")):
      state, losses = _train(shape, batches, loss_impl=loss_impl, loss_kernel=loss_kernel)
    np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=str(shape))
    p = state.params
    block = p["blocks"][0]
    got = (p["embedding"].sharding.spec, block["attn"]["wq"].sharding.spec,
           block["attn"]["wk"].sharding.spec, block["mlp"]["w_gate"].sharding.spec)
    assert got == (emb, wq, wk, gate), shape
    # Optimizer moments live where their parameters do.
    mu = state.opt_state[1][0].mu
    assert mu["embedding"].sharding == p["embedding"].sharding


def test_pallas_kernels_run_per_shard_in_the_step():
  """The jitted step sets its mesh, so the Pallas attention and loss kernels trace under
  `shard_map` (per device) rather than as one call XLA would feed whole batches to."""
  from tinystories_jax.kernels import flash_attention as fa  # noqa: PLC0415

  model = ModelConfig(family="llama", vocab_size=128, d_model=64, num_layers=1, num_heads=4,
                      max_positions=64, attention_impl="pallas")
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 1, 1), jax.devices()[:2])
  layout = state_lib.model_layout(model)
  opt_cfg = opt_lib.OptimizerConfig(lr=1e-2)
  tx = opt_lib.make_optimizer(opt_cfg, 10, layout.logical_names, layout.abstract_params)
  sh = state_lib.state_shardings(layout, tx, mesh)
  abstract = state_lib.abstract_state(layout, tx, sh)
  batch = {k: jax.ShapeDtypeStruct((4, 16), np.int32 if k != "loss_mask" else np.float32)
           for k in ("inputs", "targets", "loss_mask")}
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(layout.graphdef, tx, opt_lib.learning_rate(opt_cfg, 10),
                               step_lib.StepConfig(loss_kernel="pallas")),
      sh.state, sh.extra, {k: rules.batch_sharding(mesh, 2) for k in batch}, mesh)
  with fa.force_interpret():
    text = fn.trace(abstract, {}, batch).jaxpr.pretty_print()
  # Attention's forward and backward, and the loss's two kernels, each in its own shard_map.
  assert text.count("shard_map") == 4, text.count("shard_map")
  for kernel in ("cross_entropy_lse", "cross_entropy_grad", "flash_attention_fwd"):
    assert kernel in text, kernel

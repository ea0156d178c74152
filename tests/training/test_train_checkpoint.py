"""Orbax checkpoints: round trip, damaged-latest fallback, half-written steps, mesh changes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tinystories_jax.training import checkpoint as ckpt_lib


def _mesh(shape):
  n = int(np.prod(shape))
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]).reshape(shape), ("data", "fsdp"))


def _tree(scale=1.0):
  return {"layers": {0: {"w": jnp.arange(64.0).reshape(8, 8) * scale}},
          "norm": jnp.ones(8) * scale}


def _abstract(tree, mesh, spec=P()):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
          mesh, spec if x.ndim == 2 else P())), tree)


def _save(ck, step, scale):
  tree = _tree(scale)
  ck.save(step, params=tree, opt_state={"mu": tree}, data_iter={"next": step},
          meta={"rng": [0, step]})


def test_round_trip_and_mesh_change(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  _save(ck, 3, 1.0)
  _save(ck, 6, 2.0)
  _save(ck, 9, 3.0)
  ck.wait()
  assert ck.steps() == [6, 9]  # keep=2
  # Written unsharded; read back sharded 4 x 2 over the rows and columns.
  mesh = _mesh((4, 2))
  ap = _abstract(_tree(), mesh, P("data", "fsdp"))
  r = ck.restore_latest(ap, {"mu": ap})
  assert r.step == 9 and r.data_iter == {"next": 9} and r.meta["rng"] == [0, 9]
  w = r.params["layers"][0]["w"]
  assert w.sharding.spec == P("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(w), np.asarray(_tree(3.0)["layers"][0]["w"]))
  ck.close()


def test_damaged_latest_falls_back_with_a_warning(tmp_path, caplog):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  _save(ck, 1, 1.0)
  _save(ck, 2, 2.0)
  ck.wait()
  # Damage every array file of the newest step's parameters.
  damaged = 0
  for root, _, files in os.walk(tmp_path / "2" / "params"):
    for f in files:
      path = os.path.join(root, f)
      if os.path.getsize(path) > 0 and not f.startswith("_"):
        with open(path, "r+b") as fh:
          fh.truncate(max(0, os.path.getsize(path) // 3))
        damaged += 1
  assert damaged
  ap = _abstract(_tree(), _mesh((1, 1)))
  with caplog.at_level("WARNING"):
    r = ck.restore_latest(ap, {"mu": ap})
  assert r.step == 1
  np.testing.assert_array_equal(np.asarray(r.params["norm"]), np.ones(8))
  assert any("step 2" in m and "falling back to step 1" in m for m in caplog.messages)
  # The damaged step is set aside, not deleted, and the resumed run can write step 2 again.
  [moved] = os.listdir(str(tmp_path) + "-unreadable")
  assert moved.startswith("2-") and ck.steps() == [1]
  _save(ck, 2, 3.0)
  ck.wait()
  assert ck.steps() == [1, 2]
  ck.close()


def test_half_written_step_is_never_restored(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  _save(ck, 4, 1.0)
  ck.wait()
  ck.close()
  # What a kill during a save leaves behind: a temporary directory that was never renamed.
  tmp = tmp_path / "8.orbax-checkpoint-tmp-1234"
  (tmp / "params").mkdir(parents=True)
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  assert ck.steps() == [4]
  ap = _abstract(_tree(), _mesh((1, 1)))
  assert ck.restore_latest(ap, {"mu": ap}).step == 4
  ck.close()


def test_params_only_checkpoint_restores_without_optimizer(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(_tree(5.0))))
    mgr.wait_until_finished()
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  ap = _abstract(_tree(), _mesh((1, 1)))
  r = ck.restore_latest(ap, {"mu": ap})
  assert r.step == 0 and r.opt_state is None and r.meta is None
  np.testing.assert_array_equal(np.asarray(r.params["norm"]), np.full(8, 5.0))
  ck.close()


def test_training_steps_come_before_an_imported_params_only_step(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(50, args=ocp.args.Composite(params=ocp.args.StandardSave(_tree(5.0))))
    mgr.wait_until_finished()
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  _save(ck, 3, 1.0)
  ck.wait()
  ap = _abstract(_tree(), _mesh((1, 1)))
  r = ck.restore_latest(ap, {"mu": ap})
  assert r.step == 3 and r.opt_state is not None
  ck.close()


def test_empty_directory_restores_nothing(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=1)
  ap = _abstract(_tree(), _mesh((1, 1)))
  assert ck.restore_latest(ap, {"mu": ap}) is None
  ck.close()
